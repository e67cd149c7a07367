"""Sampling from a checkpoint: the guided denoiser, batched generation, and the sample mode's figures.

    from sample import SampleSettings, load_sampler, sample
    sample(SampleSettings(checkpoint="checkpoints/run_001/ckpt_00004680.pt", digit=7))

The sampler math itself (DDPM, DDIM) lives in diffusion.py; this file turns a checkpoint's EMA weights
into an eps(x, t) function, with classifier-free guidance for labelled runs, and draws with it.
"""
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

import figures
from ckpt import load_checkpoint, make_folder, save_figure, write_atomic
from data import load_mnist, to_model_range
from diffusion import Diffusion
from errors import UserError
from hardware import autocast, maybe_compile
from model import build_network

DEFAULT_GUIDANCE = 2.0  # classifier-free guidance weight W; 1 is plain conditional, 0 unconditional


@dataclass
class SampleSettings:
    """What to draw from which checkpoint, with which sampler; None means the default."""
    checkpoint: str
    out_dir: str = "gen"
    data_dir: str = "dataset/mnist"  # real digits for forward.png (and eval's reference)
    n_samples: Optional[int] = None  # sample 256, eval 1000
    sampler: str = "ddim"
    steps: Optional[int] = None  # DDIM steps, default 50
    eta: Optional[float] = None  # DDIM noise, default 1
    seed: int = 0
    digit: Optional[int] = None  # a grid of one digit (labelled runs)
    guidance: Optional[float] = None  # default DEFAULT_GUIDANCE for labelled runs
    device: torch.device = torch.device("cpu")
    amp: Optional[torch.dtype] = None
    compile: bool = False


def sampler_steps(sampler, steps, eta, timesteps):
    """(steps, eta) for the chosen sampler; DDPM means every step with the posterior variance."""
    if sampler == "ddpm":
        if steps not in (None, timesteps):
            raise UserError(f"--sampler ddpm always runs all {timesteps} steps; use --sampler ddim for --steps")
        if eta not in (None, 1.0):
            raise UserError("--sampler ddpm has eta 1 by definition; use --sampler ddim to set --eta")
        return timesteps, 1.0
    elif sampler == "ddim":
        steps = steps or min(50, timesteps)
        if steps > timesteps:
            raise UserError(f"--steps {steps} exceeds the checkpoint's {timesteps} timesteps")
        if eta is not None and not 0 <= eta <= 1:
            raise UserError(f"--eta must be between 0 and 1, got {eta}")
        # eta 1 by default: at 50 steps it matched 1000-step DDPM in FID here, and eta 0 was far worse.
        return steps, 1.0 if eta is None else eta
    else:
        raise UserError(f"unknown --sampler {sampler!r}; choose ddpm or ddim")


def denoiser(model, device, amp):
    """model as an eps(x, t, y=None, w=1) function, under autocast when amp is set.

    With labels y and guidance w, classifier-free guidance (Ho & Salimans 2022, with w shifted by one):
    eps_u + w (eps_c - eps_u), so w = 1 is plain conditional and w = 0 unconditional. Both branches come
    from one network call on the batch stacked twice.
    """
    no_label = model.cfg.num_classes  # the "no label" entry (a compiled model passes cfg through)

    def denoise(x, t, y=None, w=1.0):
        with autocast(device, amp):
            if y is None or w == 0:
                return model(x, t, None).float()
            if w == 1:
                return model(x, t, y).float()
            eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, no_label)]))
        cond, uncond = eps.float().chunk(2)  # (B, 1, 28, 28) each
        return uncond + w * (cond - uncond)
    return denoise


def generate(denoise, diffusion, n, steps, eta, device, seed, labels=None, guidance=1.0, batch_size=500,
             desc="sampling"):
    """n final samples (n, 1, 28, 28) on the CPU, drawn in batches, for labels (n,) or unconditionally;
    the same seed gives the same images."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with tqdm(total=n * steps, unit="img-step", desc=desc, mininterval=1, leave=False) as bar:
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            y = None if labels is None else labels[i:i + m].to(device)
            model = lambda x, t: denoise(x, t, y, guidance)  # noqa: E731
            for _, x, _ in diffusion.sample_loop(model, (m, 1, 28, 28), steps=steps, eta=eta, device=device,
                                                 generator=g):
                bar.update(m)
            out.append(x.float().cpu())
    return torch.cat(out)


@dataclass
class Sampler:
    """A checkpoint ready to draw from: its EMA network as a denoiser, its schedule, the sampler's steps."""
    path: str
    ckpt: dict
    diffusion: Diffusion
    denoise: object  # eps(x, t, y=None, w=1)
    steps: int
    eta: float
    guidance: Optional[float]  # None for an unlabelled checkpoint
    device: torch.device

    def generate(self, n, seed, labels=None, desc="sampling"):
        """n images from seed, guided towards labels (n,) if given."""
        return generate(self.denoise, self.diffusion, n, self.steps, self.eta, self.device, seed, labels=labels,
                        guidance=self.guidance if labels is not None else 1.0, desc=desc)


def load_sampler(s):
    """The checkpoint s.checkpoint as a Sampler, its settings checked against what s asks for."""
    ckpt = load_checkpoint(s.checkpoint)
    diffusion = Diffusion(**ckpt["diffusion_config"])
    steps, eta = sampler_steps(s.sampler, s.steps, s.eta, diffusion.timesteps)
    model = build_network(ckpt["model_config"]).to(s.device)
    model.load_state_dict(ckpt["ema"])  # the EMA weights: what every sample and figure is drawn with
    model.eval()
    labelled = model.cfg.num_classes > 0
    if not labelled and (s.digit is not None or s.guidance is not None):
        flag = "--digit" if s.digit is not None else "--guidance"
        raise UserError(f"{s.checkpoint} was trained without labels (--unconditional), so {flag} cannot apply; "
                        f"drop {flag} or pick a checkpoint trained with labels")
    guidance = (DEFAULT_GUIDANCE if s.guidance is None else s.guidance) if labelled else None
    print(f"{s.checkpoint}: epoch {ckpt['epoch']}, step {ckpt['step']}, "
          f"{f'labelled, guidance {guidance:g}' if labelled else 'unconditional'}; {s.sampler} with "
          f"{steps} steps, eta {eta}; {s.device.type}, {'bf16' if s.amp else 'fp32'}")
    return Sampler(s.checkpoint, ckpt, diffusion, denoiser(maybe_compile(model, s.compile), s.device, s.amp),
                   steps, eta, guidance, s.device)


def sample(s):
    """The sample mode: sample.png, process.png, process.gif, digits.png and forward.png in s.out_dir."""
    sp = load_sampler(s)
    n = s.n_samples or 256
    x, strip, strip_labels, anim, seconds = draw_with_frames(sp, n, s.digit, s.seed)
    make_folder(s.out_dir, "--out-dir")
    out = lambda name: os.path.join(s.out_dir, name)  # noqa: E731
    write_atomic(out("sample.png"), lambda f: figures.grid(x, math.ceil(math.sqrt(n))).save(f, format="PNG"))
    what = "" if s.digit is None else f", digit {s.digit}, guidance {sp.guidance:g}"
    save_figure(figures.strips(strip, strip_labels, f"reverse process, {s.sampler} {sp.steps} steps{what}"),
                out("process.png"))
    frames = figures.animation(anim, math.ceil(math.sqrt(anim.shape[1])))
    durations = [80] * (len(frames) - 1) + [1500]  # hold the finished digits
    write_atomic(out("process.gif"), lambda f: frames[0].save(
        f, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0))
    written = ["sample.png", "process.png", "process.gif"]
    if sp.guidance is not None and s.digit is None:
        # One row per digit, guided, from a seed derived from the sample seed: reruns give the same figure.
        per_row = 10
        rows = sp.generate(10 * per_row, s.seed + 2, labels=torch.arange(10).repeat_interleave(per_row),
                           desc="digits")
        write_atomic(out("digits.png"), lambda f: figures.grid(rows, per_row).save(f, format="PNG"))
        written.append("digits.png")
    try:
        save_figure(forward_figure(sp.diffusion, s.data_dir, s.seed), out("forward.png"))
        written.append("forward.png")
    except UserError as e:
        print(f"skipped forward.png: {e}")
    print(f"sampled {n} images in {seconds:.1f} s; wrote {', '.join(out(w) for w in written)}")
    return 0


def draw_with_frames(sp, n, digit, seed):
    """One sampling run that gives the grid, the strips and the animation: n final images, and a few frames
    of a few of them. Returns (images, strip frames, strip labels, animation frames, seconds)."""
    n_strip, n_anim, steps = min(6, n), min(64, n), sp.steps
    strip_at = set(torch.linspace(0, steps, min(12, steps + 1)).round().long().tolist())
    anim_at = set(torch.linspace(0, steps, min(40, steps + 1)).round().long().tolist())
    noise = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    strip, labels, anim = [noise[:n_strip]], ["noise"], [noise[:n_anim]]
    t0 = time.time()
    y = None if digit is None else torch.full((n,), digit, device=sp.device)
    model = lambda x, t: sp.denoise(x, t, y, sp.guidance)  # noqa: E731
    loop = sp.diffusion.sample_loop(model, noise.shape, steps=steps, eta=sp.eta, device=sp.device,
                                    generator=torch.Generator().manual_seed(seed + 1), noise=noise)
    for k, (t, x, _) in enumerate(tqdm(loop, total=steps, desc="sampling", mininterval=1), start=1):
        if k in strip_at:
            strip.append(x[:n_strip].cpu())
            labels.append(f"t={t}" if t >= 0 else "x0")
        if k in anim_at:
            anim.append(x[:n_anim].cpu())
    return x.cpu(), torch.stack(strip), labels, torch.stack(anim), time.time() - t0


def forward_figure(diffusion, data_dir, seed):
    """Six real digits noised to ten timesteps: the forward process q(x_t | x_0)."""
    real = to_model_range(load_mnist(data_dir)[0][:6])
    ts = torch.linspace(0, diffusion.timesteps - 1, 10).round().long()
    g = torch.Generator().manual_seed(seed)
    noised = [diffusion.q_sample(real, t.repeat(len(real)), torch.randn(real.shape, generator=g)) for t in ts]
    return figures.strips(torch.stack([real] + noised), ["x0"] + [f"t={t}" for t in ts.tolist()],
                          "forward process q(x_t | x_0) on real digits")
