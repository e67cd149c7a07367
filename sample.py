"""Sampling from a checkpoint: the guided denoiser, batched generation, and the sample mode's figures.

    from sample import SampleSettings, load_sampler, sample
    sample(SampleSettings(checkpoint="checkpoints/run_001/ckpt_00004680.pt", digit=7))

The sampler math itself (DDPM, DDIM, DPM-Solver++, Heun) lives in diffusion.py; this file turns a
checkpoint's EMA weights into an eps(x, t) function, with classifier-free guidance for labelled runs,
and draws with it. A labelled checkpoint asks for the digits in the training set's class frequencies (the
class prior), so its pictures show what it draws when asked, in the data's proportions.
"""
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

import figures
from ckpt import load_checkpoint, make_folder, run_checkpoints, save_figure, write_atomic
from data import heart_points, heart_trace, load_mnist, sample_shape, to_model_range
from diffusion import SPACINGS, Diffusion
from errors import UserError
from hardware import autocast, maybe_compile
from model import build_network

DEFAULT_GUIDANCE = 1.5  # classifier-free guidance weight W without a guide; 1 is plain conditional, 0 unconditional
GUIDED_GUIDANCE = 1.3  # W beside autoguidance, which sharpens the digits itself (docs/sampling.md)
DEFAULT_GUIDE_WEIGHT = 2.0  # autoguidance weight A (docs/sampling.md)
NO_GUIDE = "none"  # --guide-checkpoint none: no autoguidance, even where the run has its own guide
# Guidance applies where lo <= t <= hi (Kynkaanniemi et al. 2024), by default at t from 10% to 60% of T:
# for T = 1000, [100, 600], about EDM2's sigma 0.28 to 5.4 (docs/sampling.md).
DEFAULT_INTERVAL_SHARE = (0.1, 0.6)
EVERYWHERE = (0, 10_000)
SAMPLERS = ("ddpm", "ddim", "dpm2m", "dpm2m-sde", "heun")
# EDM's Heun at 10 steps (19 network calls): level with dpm2m 20 at the end of a 5- or 10-epoch run, and better on
# the checkpoints before it (1.5 FID at epoch 3 of 10, 0.6 at 5; docs/sampling.md, fourteenth session).
DEFAULT_SAMPLER = "heun"
# Steps when --steps is not given: each solver's at about DDIM-50's quality here (docs/sampling.md).
DEFAULT_STEPS = {"ddim": 50, "dpm2m": 20, "dpm2m-sde": 20, "heun": 10}
BATCH = 500  # images per sampling batch: memory stays bounded whatever --n-samples asks for


@dataclass
class SampleSettings:
    """What to draw from which checkpoint, with which sampler; None means the default."""
    checkpoint: str
    out_dir: str = "gen"
    data_dir: str = "dataset/mnist"  # real digits for forward.png (and eval's reference)
    n_samples: Optional[int] = None  # sample 256, eval 1000
    sampler: Optional[str] = None  # one of SAMPLERS; default DEFAULT_SAMPLER, ddpm for a posterior-mean network
    steps: Optional[int] = None  # solver steps, default DEFAULT_STEPS[sampler]
    eta: Optional[float] = None  # DDIM noise, default 1
    churn: Optional[float] = None  # Heun's S_churn, default 0
    spacing: Optional[str] = None  # where the steps fall (SPACINGS); default linspace for ddim, trailing otherwise
    seed: int = 0
    dataset: Optional[str] = None  # the data set the checkpoint must have been trained on; None: whichever
    digit: Optional[int] = None  # a grid of one digit (labelled runs)
    guidance: Optional[float] = None  # labelled runs: GUIDED_GUIDANCE with a guide, else DEFAULT_GUIDANCE; 0: no label
    interval: Optional[tuple] = None  # the timesteps (lo, hi) where guidance applies, default default_interval(T)
    guide: Optional[str] = None  # a weaker checkpoint to guide away from (autoguidance), at every timestep;
    # None: a labelled MNIST checkpoint's own_guide, if its run kept one; NO_GUIDE: none
    guide_weight: Optional[float] = None  # its weight, above 1; default DEFAULT_GUIDE_WEIGHT
    device: torch.device = torch.device("cpu")
    amp: Optional[torch.dtype] = None
    compile: bool = False


@dataclass
class Plan:
    """How to sample: the diffusion solver, its steps and spacing, DDIM's eta and Heun's churn."""
    solver: str
    steps: int
    spacing: str
    eta: float = 1.0
    churn: float = 0.0

    def kwargs(self):
        return dict(solver=self.solver, steps=self.steps, spacing=self.spacing, eta=self.eta, churn=self.churn)

    def describe(self, sampler):
        extra = {"ddim": f", eta {self.eta:g}", "heun": f", churn {self.churn:g}"}.get(self.solver, "")
        spaced = "" if self.spacing == default_spacing(self.solver) else f" ({self.spacing} spacing)"
        return f"{sampler} with {self.steps} steps{spaced}{extra}"


def default_spacing(solver):
    """DDIM's evenly spaced steps from T-1 to 0; the newer solvers end their last step on the data rather than
    spend a call at t=0."""
    return "linspace" if solver == "ddim" else "trailing"


def sampler_plan(sampler, steps, eta, churn, timesteps, spacing=None):
    """The Plan for the chosen sampler; DDPM means every step with the posterior variance."""
    if eta is not None and sampler != "ddim":
        raise UserError(f"--eta is DDIM's; --sampler {sampler} " + (
            "has eta 1 by definition" if sampler == "ddpm" else "does not take it") + "; use --sampler ddim")
    if churn is not None and sampler != "heun":
        raise UserError(f"--churn is for --sampler heun; drop it for --sampler {sampler}")
    if spacing is not None and spacing not in SPACINGS:
        raise UserError(f"unknown --spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if sampler == "ddpm":
        if steps not in (None, timesteps):
            raise UserError(f"--sampler ddpm always runs all {timesteps} steps; use --sampler ddim for --steps")
        if spacing is not None:
            raise UserError("--sampler ddpm visits every timestep, so it has no --spacing; use --sampler ddim")
        return Plan("ddim", timesteps, "linspace", eta=1.0)
    elif sampler in SAMPLERS:
        steps = steps or min(DEFAULT_STEPS[sampler], timesteps)
        if steps > timesteps:
            raise UserError(f"--steps {steps} exceeds the checkpoint's {timesteps} timesteps")
        if eta is not None and not 0 <= eta <= 1:
            raise UserError(f"--eta must be between 0 and 1, got {eta}")
        if churn is not None and not 0 <= churn <= 1000:
            raise UserError(f"--churn must be between 0 and 1000, got {churn}")
        spacing = spacing or default_spacing(sampler)
        if sampler == "ddim":
            # eta 1 by default: at 50 steps it matched 1000-step DDPM in FID here, and eta 0 was far worse.
            return Plan("ddim", steps, spacing, eta=1.0 if eta is None else eta)
        return Plan(sampler, steps, spacing, churn=churn or 0.0)
    else:
        raise UserError(f"unknown --sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def default_interval(timesteps):
    """The timesteps (lo, hi) where guidance applies unless --guidance-interval says otherwise."""
    return tuple(round(share * timesteps) for share in DEFAULT_INTERVAL_SHARE)


def denoiser(model, device, amp, interval=EVERYWHERE, guide=None, guide_weight=DEFAULT_GUIDE_WEIGHT):
    """model as an eps(x, t, y=None, w=1) function, under autocast when amp is set.

    With labels y and guidance w, classifier-free guidance (Ho & Salimans 2022, with w shifted by one):
    eps_u + w (eps_c - eps_u), so w = 1 is plain conditional and w = 0 unconditional. Both branches come
    from one network call on the batch stacked twice. Guidance applies only at timesteps inside interval
    (lo, hi); elsewhere the conditional output is used alone (Kynkaanniemi et al. 2024, "Applying guidance
    in a limited interval"): guidance at high noise mostly costs variety, at low noise it does little.

    With a guide network, autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of
    itself") adds guide_weight - 1 times the step away from the guide's output for the same label (or none)
    at every timestep: eps + (a - 1) (eps_c - eps_g). The guide, a weaker network, makes the same errors more
    strongly, so the push corrects them and, in the paper, keeps the variety that the label's push costs. The two
    networks share their objective and schedule (load_guide checks), so the sum means the same in eps, x0, v or mean
    units (each is linear in the others at a given x_t).
    """
    no_label = model.cfg.num_classes  # the "no label" entry (a compiled model passes cfg through)
    lo, hi = interval
    limited = tuple(interval) != EVERYWHERE  # only then read t back (a host sync on a GPU)

    def denoise(x, t, y=None, w=1.0):
        if limited and w not in (0, 1) and not lo <= float(t[0]) <= hi:
            w = 1.0  # outside the interval: conditional, one network call
        if y is None or w == 0:
            y, w = None, 1.0  # unconditional: the network's own output, autoguided like a conditional one
        with autocast(device, amp):
            if w == 1:
                out = cond = model(x, t, y).float()
            else:
                eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, no_label)]))
                cond, uncond = eps.float().chunk(2)  # (B, 1, 28, 28) each
                out = uncond + w * (cond - uncond)
            if guide is not None:
                out = out + (guide_weight - 1) * (cond - guide(x, t, y).float())
        return out
    return denoise


def generate(denoise, diffusion, n, plan, device, seed, labels=None, guidance=1.0, batch_size=BATCH,
             desc="sampling", shape=(1, 28, 28)):
    """n final samples (n, *shape) on the CPU, drawn in batches, for labels (n,) or unconditionally;
    the same seed gives the same images."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with tqdm(total=n * plan.steps, unit="img-step", desc=desc, mininterval=1, leave=False) as bar:
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            y = None if labels is None else labels[i:i + m].to(device)
            model = lambda x, t: denoise(x, t, y, guidance)  # noqa: E731
            for _, x, _ in diffusion.sample_loop(model, (m, *shape), device=device, generator=g,
                                                 **plan.kwargs()):
                bar.update(m)
            out.append(x.float().cpu())
    return torch.cat(out)


def class_prior(ckpt):
    """The training set's digit frequencies (10,), recorded in the checkpoint; uniform for checkpoints
    from before they were (MNIST's are 9.0% to 11.2%)."""
    return torch.tensor(ckpt.get("class_prior") or [0.1] * 10, dtype=torch.float64)


def stratified_labels(prior, n, generator):
    """n digits (n,) in the proportions of prior (10,), in random order: digit k floor(n p_k) or ceil(n p_k) times."""
    # Systematic sampling: n evenly spaced points with one random offset on the prior's cumulative sum, so each
    # count is n p_k on average. Independent draws leave a count off by about 10 in 1,000, which alone moved
    # FID at N = 1000 by 1.5 (docs/recipe.md, "the class mix").
    cdf = prior.double().cumsum(0) / prior.sum()
    cdf[-1] = 1.0
    u = (torch.rand((), generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    labels = torch.searchsorted(cdf, u, right=True)
    return labels[torch.randperm(n, generator=generator)]


@dataclass
class Sampler:
    """A checkpoint ready to draw from: its EMA network as a denoiser, its schedule, the sampler's steps."""
    path: str
    ckpt: dict
    diffusion: Diffusion
    denoise: object  # eps(x, t, y=None, w=1)
    plan: Plan
    guidance: Optional[float]  # None for an unlabelled checkpoint
    interval: tuple  # the timesteps (lo, hi) where guidance applies
    device: torch.device
    sampler: str = DEFAULT_SAMPLER  # the plan's name, one of SAMPLERS
    dataset: str = "mnist"  # what the checkpoint was trained on (data.DATASETS)
    guide: Optional[str] = None  # the weaker checkpoint autoguidance pushes away from, if any
    guide_weight: Optional[float] = None  # its weight, None without a guide

    def labels(self, n, seed, digit=None):
        """What to ask for, (n,) or None: digit, else the digits in the class prior's proportions, in random order;
        None for an unlabelled checkpoint or guidance 0 ("no label")."""
        if not self.guidance:
            return None
        if digit is not None:
            return torch.full((n,), digit)
        g = torch.Generator().manual_seed(seed + 3)
        return stratified_labels(class_prior(self.ckpt), n, g)

    def generate(self, n, seed, labels=None, desc="sampling"):
        """n images from seed, guided towards labels (n,) if given."""
        return generate(self.denoise, self.diffusion, n, self.plan, self.device, seed, labels=labels,
                        guidance=self.guidance if labels is not None else 1.0, desc=desc,
                        shape=sample_shape(self.dataset))


def load_sampler(s):
    """The checkpoint s.checkpoint as a Sampler, its settings checked against what s asks for."""
    ckpt = load_checkpoint(s.checkpoint)
    dataset = ckpt["train_config"].get("dataset", "mnist")
    if s.dataset is not None and s.dataset != dataset:
        raise UserError(f"{s.checkpoint} was trained on {dataset}, so it cannot draw --dataset {s.dataset}; drop "
                        f"--dataset or pick a checkpoint trained with --dataset {s.dataset}")
    diffusion = Diffusion(**ckpt["diffusion_config"])
    whole_only = diffusion.whole_steps_only
    # The heart is a thin curve: solvers that skip steps cut across it (tests/test_heart.py), and all T steps of
    # a network this small take seconds.
    sampler = s.sampler or ("ddpm" if diffusion.objective == "mean" or dataset == "heart" else DEFAULT_SAMPLER)
    try:
        plan = sampler_plan(sampler, s.steps, s.eta, s.churn, diffusion.timesteps, s.spacing)
    except UserError:
        if not whole_only:
            raise
        plan = None  # a mean network's own message below says what it can take
    if whole_only and not (plan and plan.solver == "ddim" and plan.steps == diffusion.timesteps and plan.eta == 1):
        # x_0 = (mean - c_t x_t) / c_0, and c_0 falls to about 1e-4 at t = T-1 (Diffusion.posterior_coef_x0).
        raise UserError(f"{s.checkpoint} predicts the posterior mean of x_(t-1), which gives x_0 only divided by a "
                        f"coefficient as small as 1e-4, so a sampler that skips steps blows its error up into "
                        f"noise (docs/variants.md); use --sampler ddpm, its default, without --steps, --spacing or "
                        f"--eta")
    model = ema_network(ckpt, s.device)
    labelled = model.cfg.num_classes > 0
    given = [f for f, v in (("--digit", s.digit), ("--guidance", s.guidance), ("--guidance-interval", s.interval))
             if v is not None]
    if not labelled and given:
        why = "the heart has none" if dataset == "heart" else "--unconditional"
        raise UserError(f"{s.checkpoint} was trained without labels ({why}), so {given[0]} cannot "
                        f"apply; drop {given[0]} or pick a checkpoint trained with labels")
    if s.digit is not None and s.guidance == 0:
        raise UserError("--digit needs a label, and --guidance 0 draws with none; drop one of them")
    # The default guide: measured on labelled MNIST draws of x0 and eps networks, and its guidance and weight
    # checked again on three v runs, the default network since 2026-11-28 (docs/sampling.md).
    own = labelled and dataset == "mnist" and diffusion.objective != "mean" and s.guidance != 0
    guide_path, guide_weight = pick_guide(s, ckpt["step"], own)
    default_guidance = DEFAULT_GUIDANCE if guide_path is None else GUIDED_GUIDANCE
    guidance = (default_guidance if s.guidance is None else s.guidance) if labelled else None
    interval = s.interval or default_interval(diffusion.timesteps)
    what = "unconditional" if not labelled else "labelled, no label" if guidance == 0 else (
        f"labelled, guidance {guidance:g}" + (f" at t in [{interval[0]}, {interval[1]}]"
                                              if interval[0] > 0 or interval[1] < diffusion.timesteps - 1 else ""))
    guide = None
    if guide_path is not None:
        guide, guide_step = load_guide(guide_path, diffusion, dataset, model.cfg.num_classes, s.device,
                                       default=s.guide is None)
        whose = f"{guide_path} (step {guide_step})" if s.guide else f"the run's step-{guide_step} checkpoint"
        what += f", autoguidance {guide_weight:g} away from {whose}"
        guide = maybe_compile(guide, s.compile)
    elif own and s.guide is None:
        what += ", no guide (its run kept no checkpoint near half its steps)"
    print(f"{s.checkpoint}: epoch {ckpt['epoch']}, step {ckpt['step']}, {what}; {plan.describe(sampler)}; "
          f"{s.device.type}, {'bf16' if s.amp else 'fp32'}")
    denoise = denoiser(maybe_compile(model, s.compile), s.device, s.amp, interval, guide, guide_weight)
    return Sampler(s.checkpoint, ckpt, diffusion, denoise, plan, guidance, interval, s.device, sampler, dataset,
                   guide_path, guide_weight if guide_path is not None else None)


def pick_guide(s, step, own):
    """(guide path or None, its weight) for the SampleSettings s of a checkpoint of `step` steps: the guide given,
    none for NO_GUIDE, else, where `own` (the default guide applies), the run's own_guide."""
    path = None if s.guide == NO_GUIDE else s.guide
    if s.guide is None and own:
        path = own_guide(s.checkpoint, step)
    if s.guide_weight is not None and path is None:
        raise UserError("--guide-weight weighs the step away from a guide, and " + (
            "--guide-checkpoint none turns it off; drop one of them" if s.guide == NO_GUIDE else
            f"{s.checkpoint}'s run kept no checkpoint near half its steps to guide it; give --guide-checkpoint PATH "
            f"or drop --guide-weight" if own else
            "only labelled draws of MNIST checkpoints that do not predict the posterior mean get a default guide; "
            "give --guide-checkpoint PATH or drop --guide-weight"))
    weight = DEFAULT_GUIDE_WEIGHT if s.guide_weight is None else s.guide_weight
    if path is not None and not 1 < weight <= 100:
        raise UserError(f"--guide-weight must be above 1 (1 turns autoguidance off, below 1 pulls towards the weaker "
                        f"checkpoint) and at most 100, got {weight:g}")
    return path, weight


def own_guide(path, step):
    """The guide a checkpoint of `step` steps at path gets by default: the checkpoint of its own run (the folder
    it lies in, links followed) nearest to half its steps (the earlier of two as near), between a third and two
    thirds of them (the run keeps its end-of-epoch ones), else None. Half the training makes the same errors,
    only more, and the push away from them corrects them (docs/sampling.md)."""
    near = {s: p for s, p in run_checkpoints(os.path.dirname(os.path.realpath(path))).items()
            if step <= 3 * s <= 2 * step}
    return near[min(near, key=lambda s: abs(2 * s - step))] if near else None


def ema_network(ckpt, device):
    """A checkpoint's network with its EMA weights (what every sample and figure is drawn with), for inference."""
    model = build_network(ckpt["model_config"]).to(device)
    model.load_state_dict(ckpt["ema"])
    return model.eval()


def load_guide(path, diffusion, dataset, num_classes, device, default=False):
    """(EMA network, step) of the guide checkpoint at path, checked to fit the checkpoint it guides (its diffusion,
    data set and number of labels): the same objective and noise schedule, data and labels, so their outputs mix.
    `default`: path is the run's own guide, chosen by own_guide, not given."""
    try:
        other = load_checkpoint(path, "--guide-checkpoint")
    except UserError as e:
        if not default:
            raise
        raise UserError(f"the default guide (the run's checkpoint nearest half its steps) cannot be used: {e}; or "
                        f"sample without it: --guide-checkpoint none") from None
    mine, theirs = diffusion.config(), Diffusion(**other["diffusion_config"]).config()
    keys = ("timesteps", "beta_start", "beta_end", "objective") + (("mean_skip",) if mine["objective"] == "mean" else ())
    differ = [k for k in keys if mine[k] != theirs[k]]
    if other["train_config"].get("dataset", "mnist") != dataset:
        differ.insert(0, "dataset")
    if other["model_config"].get("num_classes", 0) != num_classes:
        differ.append("labels")
    if differ:
        raise UserError(f"the guide {path} differs from the checkpoint in {', '.join(differ)}, so their outputs "
                        f"do not mix; pick a guide trained with the same settings (an earlier checkpoint of the "
                        f"same run, or a shorter or smaller run), or none with --guide-checkpoint none")
    return ema_network(other, device), other["step"]


def sample(s):
    """The sample mode: sample.png, process.png, process.gif, digits.png and forward.png in s.out_dir (for the
    heart: sample.png and process.gif)."""
    sp = load_sampler(s)
    if sp.dataset == "heart":
        return sample_points(sp, s)
    n = s.n_samples or 256
    labels = sp.labels(n, s.seed, s.digit)
    x, strip, strip_labels, anim, seconds = draw_with_frames(sp, n, labels, s.seed)
    make_folder(s.out_dir, "--out-dir")
    out = lambda name: os.path.join(s.out_dir, name)  # noqa: E731
    write_atomic(out("sample.png"), lambda f: figures.grid(x, math.ceil(math.sqrt(n))).save(f, format="PNG"))
    what = "" if s.digit is None else f", digit {s.digit}, guidance {sp.guidance:g}"
    what += "" if sp.guide is None else f", autoguidance {sp.guide_weight:g}"
    save_figure(figures.strips(strip, strip_labels, f"reverse process, {sp.plan.describe(sp.sampler)}{what}"),
                out("process.png"))
    frames = figures.animation(anim, math.ceil(math.sqrt(anim.shape[1])))
    durations = [80] * (len(frames) - 1) + [1500]  # hold the finished digits
    write_atomic(out("process.gif"), lambda f: frames[0].save(
        f, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0))
    written = ["sample.png", "process.png", "process.gif"]
    if labels is not None and s.digit is None:
        rows = by_digit(x, labels, per_row=10)  # the same images, sorted by the digit asked for
        write_atomic(out("digits.png"), lambda f: figures.grid(rows, 10).save(f, format="PNG"))
        written.append("digits.png")
    try:
        save_figure(forward_figure(sp.diffusion, s.data_dir, s.seed), out("forward.png"))
        written.append("forward.png")
    except UserError as e:
        print(f"skipped forward.png: {e}")
    print(f"sampled {n} images in {seconds:.1f} s; wrote {', '.join(out(w) for w in written)}")
    return 0


def by_digit(x, labels, per_row):
    """One row per digit 0-9: the first per_row images of x (N, 1, 28, 28) asked to be that digit, padded
    with black where fewer were drawn."""
    rows = []
    for d in range(10):
        mine = x[labels == d][:per_row]
        rows += [mine, torch.full((per_row - len(mine), *x.shape[1:]), -1.0)]
    return torch.cat(rows)


def draw_with_frames(sp, n, labels, seed):
    """One sampling run that gives the grid, the strips and the animation: n final images, and a few frames
    of a few of the first batch. Returns (images, strip frames, strip labels, animation frames, seconds)."""
    n, rest = min(n, BATCH), n - min(n, BATCH)
    n_strip, n_anim, steps = min(6, n), min(64, n), sp.plan.steps
    strip_at = set(torch.linspace(0, steps, min(12, steps + 1)).round().long().tolist())
    anim_at = set(torch.linspace(0, steps, min(40, steps + 1)).round().long().tolist())
    noise = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    strip, names, anim = [noise[:n_strip]], ["noise"], [noise[:n_anim]]
    t0 = time.time()
    y = None if labels is None else labels[:n].to(sp.device)
    model = lambda x, t: sp.denoise(x, t, y, sp.guidance)  # noqa: E731
    loop = sp.diffusion.sample_loop(model, noise.shape, device=sp.device, noise=noise,
                                    generator=torch.Generator().manual_seed(seed + 1), **sp.plan.kwargs())
    for k, (t, x, _) in enumerate(tqdm(loop, total=steps, desc="sampling", mininterval=1), start=1):
        if k in strip_at:
            strip.append(x[:n_strip].cpu())
            names.append(f"t={t}" if t >= 0 else "x0")
        if k in anim_at:
            anim.append(x[:n_anim].cpu())
    x = x.cpu()
    if rest:  # the others in batches too, as eval draws them
        x = torch.cat([x, sp.generate(rest, seed + 4, labels=None if labels is None else labels[n:])])
    return x, torch.stack(strip), names, torch.stack(anim), time.time() - t0


def forward_figure(diffusion, data_dir, seed):
    """Six real digits noised to ten timesteps: the forward process q(x_t | x_0)."""
    real = to_model_range(load_mnist(data_dir)[0][:6])
    ts = torch.linspace(0, diffusion.timesteps - 1, 10).round().long()
    g = torch.Generator().manual_seed(seed)
    noised = [diffusion.q_sample(real, t.repeat(len(real)), torch.randn(real.shape, generator=g)) for t in ts]
    return figures.strips(torch.stack([real] + noised), ["x0"] + [f"t={t}" for t in ts.tolist()],
                          "forward process q(x_t | x_0) on real digits")


def sample_points(sp, s):
    """The heart's sample mode: sample.png, s.n_samples (default 1000) points drawn over the true curve, and
    process.gif, the cloud through the forward process (real points to noise) and then the reverse one."""
    n, steps = s.n_samples or 1000, sp.plan.steps
    g = torch.Generator().manual_seed(s.seed)
    real = heart_points(n, seed=s.seed + 1)
    ts = torch.linspace(0, sp.diffusion.timesteps - 1, 20).round().long()
    forward = [sp.diffusion.q_sample(real, t.repeat(n), torch.randn(real.shape, generator=g)) for t in ts]
    noise = torch.randn((n, 2), generator=g)
    t0 = time.time()
    loop = sp.diffusion.sample_loop(lambda x, t: sp.denoise(x, t), noise.shape, device=sp.device, noise=noise,
                                    generator=torch.Generator().manual_seed(s.seed + 1), **sp.plan.kwargs())
    keep = torch.linspace(0, steps, min(41, steps + 1)).round().long().tolist()  # about 40 frames of the way
    reverse = [noise]
    for k, (t, x, _) in enumerate(tqdm(loop, total=steps, desc="sampling", mininterval=1), start=1):
        if k in keep:
            reverse.append(x.float().cpu())
    seconds = time.time() - t0
    curve = heart_trace(400)
    make_folder(s.out_dir, "--out-dir")
    out = lambda name: os.path.join(s.out_dir, name)  # noqa: E731
    save_figure(figures.point_cloud(reverse[-1], curve, f"{n} points drawn, {sp.plan.describe(sp.sampler)}"),
                out("sample.png"))
    titles = [f"forward, t={t}" for t in ts.tolist()] + [f"reverse, step {k}/{steps}" for k in keep]
    frames = figures.point_frames(forward + reverse, titles, curve)
    durations = [120] * (len(frames) - 1) + [1500]  # hold the finished heart
    write_atomic(out("process.gif"), lambda f: frames[0].save(
        f, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0))
    print(f"sampled {n} points in {seconds:.1f} s; wrote {out('sample.png')}, {out('process.gif')}")
    return 0
