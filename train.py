"""Training: the step, the budget and learning-rate schedule, EMA, Ctrl-C, the epoch loop and its log.

    from train import TrainSettings, train
    train(TrainSettings(data_dir="dataset/mnist", epochs=1), {"channels": (8, 16, 32)})

Under torchrun each process runs the same Trainer on its share of every batch (distributed.py); rank 0 alone
writes, and the processes agree at every step boundary on the budget and on Ctrl-C, so they stop together.

A run is defined by its settings (DEFAULTS, overridden by those given; on resume, the checkpoint's) and
limited by a budget of epochs, optimizer steps and/or minutes that the learning-rate schedule follows. Like improved-
diffusion's TrainLoop, the Trainer reads top to bottom: run() -> run_epoch() -> run_step(), end_epoch(), save().
"""
import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import evaluate
import figures
import sample
from ckpt import (FORMAT, MLP_OBJECTIVE, UNET_SETTINGS, checkpoint_path, clean_temporary, fmt, load_checkpoint,
                  new_run_dir, prune_checkpoints, reconcile, save_checkpoint, save_figure, training_lock, write_atomic)
from data import load_data, to_model_range
from diffusion import Diffusion
from distributed import World, peer_failed, peer_lost
from errors import UserError
from hardware import autocast, maybe_compile, rng_state, set_rng_state
from model import MLPConfig, PointMLPConfig, UNetConfig, build_network, count_parameters

# The settings that define a run. A new run takes these unless told otherwise; a resumed run takes its
# checkpoint's, and a setting given on resume must agree with the checkpoint's.
DEFAULTS = dict(dataset="mnist", arch="unet", channels=UNetConfig.channels, blocks=UNetConfig.blocks,
                width=MLPConfig.width, depth=MLPConfig.depth, objective="v", loss="mse", timesteps=1000,
                batch_size=64, lr=1e-3, adam_beta2=0.999, warmup=200, schedule="cosine", ema_decay=0.999,
                ema_length=0.1, seed=0, conditional=True, label_dropout=0.1, weighting="p2",
                timestep_draw="independent", attention=False,
                up_conv=UNetConfig.up_conv, scale_shift=UNetConfig.scale_shift, label_silu=UNetConfig.label_silu,
                emb_dim=UNetConfig.emb_dim)
# A new posterior-mean run on MNIST under the bound (vlb): T = 100, where the bound weighs the last steps less
# than at 1000 and the mean's own ancestral sampler takes 100 steps; at the default's 20-minute steps it drew FID
# 153 with dpm2m (106 with its own DDPM step) against 213 at T = 1000 (docs/variants.md).
MEAN_TIMESTEPS = 100
DEFAULT_EPOCHS = {"mnist": 10, "heart": 25}  # a new run given no budget: 9,370 steps; 4,875 steps
SCHEDULES = ("cosine", "linear", "constant")  # the lr after warm-up (learning_rate)
NO_LABEL = 10  # the label embedding's last entry: digits are 0-9
LOG_EVERY = 50  # steps per point of the loss history (and per host sync)
# Up to about this many steps the default network draws better MNIST digits predicting x0 than v (docs/recipe.md,
# fifteenth and sixteenth sessions, nine paired draws each: x0 0.90 FID better at 2,242 steps and 1.07 at 3,000,
# v 0.49 better at 4,685 and 0.36 at 9,370; the crossing, unmeasured, near 4,200 if it runs straight), so a v run
# that ends within it says so.
SHORT_RUN_STEPS = 3000


@dataclass
class TrainSettings:
    """Where and how long to train; what is trained is the run's settings (DEFAULTS and those given)."""
    data_dir: str = "dataset/mnist"
    ckpt_dir: str = "checkpoints"  # new runs go in ckpt_dir/run_NNN; the eval classifier is cached here
    resume: Optional[str] = None  # a checkpoint to continue, instead of a new run
    epochs: Optional[int] = None  # the budget, whichever ends first; none of the three means DEFAULT_EPOCHS
    minutes: Optional[float] = None
    steps: Optional[int] = None
    keep: Optional[int] = None  # keep the newest K end-of-epoch checkpoints (and the last); None keeps all
    eval_every: Optional[int] = None  # a quick FID every K epochs
    device: torch.device = torch.device("cpu")
    amp: Optional[torch.dtype] = None  # bf16 autocast, or None for fp32
    compile: bool = False


def train(settings, given=None, world=None):
    """Train a new run, or continue settings.resume; given: the run's settings asked for (None means not
    given); world: the processes of a torchrun run (distributed.start), None for one. Returns the exit
    status: 0 when the budget is spent, 130 after Ctrl-C."""
    world = world or World(device=settings.device)
    ckpt = load_checkpoint(settings.resume) if settings.resume else None
    # The folder that holds the run's folder: one training at a time writes there (rank 0 holds the lock).
    runs = os.path.dirname(os.path.dirname(os.path.abspath(settings.resume))) if ckpt else settings.ckpt_dir
    with contextlib.ExitStack() as held:
        with together(world, "taking the training lock"):
            if world.main:
                held.enter_context(training_lock(runs))
                if ckpt:  # we hold the lock: any temporary file in the run's folder is a killed write's leftover
                    clean_temporary(os.path.dirname(settings.resume))
        if ckpt:  # on several machines each process reads its own copy: they must hold the same run
            world.same(ckpt["step"], "resume from checkpoints whose steps")
        cfg = reconcile(given or {}, DEFAULTS, ckpt, settings.resume)
        if not ckpt:
            cfg = for_dataset(cfg, given or {})
        elif cfg["arch"] == "mlp" and cfg["objective"] != MLP_OBJECTIVE:  # here: reconcile also describes such runs
            raise UserError(f"--resume: {settings.resume} is an MLP predicting {cfg['objective']}, which draws noise "
                            f"(docs/variants.md); train a new MLP run, which predicts x0", everywhere=True)
        world.check_batch(cfg["batch_size"])
        try:
            return Trainer(settings, cfg, ckpt, world).run()
        except (RuntimeError, torch.distributed.DistError) as e:
            if world.size > 1 and peer_lost(e):
                raise peer_failed(e) from None
            raise


@contextlib.contextmanager
def together(world, what):
    """Run the body (often on rank 0 alone), then agree: if it failed in any process, all of them stop here
    (the one that failed with its own error)."""
    ok = False
    try:
        yield
        ok = True
    finally:
        world.all_ok(ok, what)


def for_dataset(cfg, given):
    """A new run's settings that follow from its data set: on MNIST, a posterior-mean run under the bound trains
    at T = MEAN_TIMESTEPS unless --timesteps is given; the heart's 2D points train the point MLP, without
    labels, predicting eps with DDPM's unweighted loss (tiny-diffusion's recipe, which drew points nearer the
    curve than x0 with p2 here) in batches of 256 (4x nearer than 64 at the same steps: docs/variants.md),
    unless told otherwise."""
    if cfg["dataset"] != "heart":
        if cfg["objective"] == "mean" and cfg["weighting"] == "vlb" and given.get("timesteps") is None:
            return dict(cfg, timesteps=MEAN_TIMESTEPS)
        return cfg
    wrong = [k for k in ("arch", *UNET_SETTINGS, "label_dropout") if given.get(k) is not None]
    if wrong:
        raise UserError(f"--{wrong[0].replace('_', '-')} does not apply to --dataset heart (2D points without labels, "
                        f"drawn by its own point MLP: --width, --depth); drop it", everywhere=True)
    points, objective = PointMLPConfig(), given.get("objective") or "eps"
    return dict(cfg, arch="points", conditional=False, batch_size=given.get("batch_size") or 256,
                width=given.get("width") or points.width,
                depth=given.get("depth") or points.depth, objective=objective,
                weighting=given.get("weighting") or ("vlb" if objective == "mean" else "uniform"))


def run_budget(epochs, minutes, ckpt=None, steps=None, dataset="mnist"):
    """(epochs, minutes, steps) of the run: those given, else the checkpoint's; None means no limit."""
    saved = ckpt.get("budget", {}) if ckpt else {}
    epochs = epochs if epochs is not None else saved.get("epochs")
    minutes = minutes if minutes is not None else saved.get("minutes")
    steps = steps if steps is not None else saved.get("steps")
    if epochs is None and minutes is None and steps is None:
        epochs = DEFAULT_EPOCHS[dataset]
    return epochs, minutes, steps


def learning_rate(cfg, step, progress):
    """Linear warm-up over cfg['warmup'] steps, then constant, or a cosine or linear decay to 0 at progress 1."""
    warm, progress = min(1.0, (step + 1) / cfg["warmup"]), min(progress, 1.0)
    if cfg["schedule"] == "cosine":
        return cfg["lr"] * warm * 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg["schedule"] == "linear":
        return cfg["lr"] * warm * (1 - progress)
    elif cfg["schedule"] == "constant":
        return cfg["lr"] * warm
    else:
        raise UserError(f"unknown --schedule {cfg['schedule']!r}; choose {', '.join(SCHEDULES)}")


def network_config(cfg, num_classes):
    """The checkpoint's model_config for the run's settings, and a short description of its shape."""
    if cfg["arch"] == "unet":
        config = UNetConfig(cfg["channels"], cfg["blocks"], num_classes=num_classes, attention=cfg["attention"],
                            up_conv=cfg["up_conv"], scale_shift=cfg["scale_shift"], label_silu=cfg["label_silu"],
                            emb_dim=cfg["emb_dim"])
        return ({"arch": "unet", **asdict(config)}, f"channels {fmt(cfg['channels'])}, blocks {fmt(cfg['blocks'])}"
                + (", attention at the lowest level" if cfg["attention"] else "")
                + (", upsampling convs after the resize (high)" if cfg["up_conv"] == "high" else "")
                + (", the embedding scales and shifts the norms" if cfg["scale_shift"] else "")
                + (", the label before the embedding's last SiLU" if cfg["label_silu"] else "")
                + (f", a {cfg['emb_dim']}-wide embedding" if cfg["emb_dim"] else ""))
    elif cfg["arch"] == "mlp":
        return ({"arch": "mlp", **asdict(MLPConfig(cfg["width"], cfg["depth"], num_classes))},
                f"width {cfg['width']}, depth {cfg['depth']}")
    elif cfg["arch"] == "points":
        return ({"arch": "points", **asdict(PointMLPConfig(cfg["width"], cfg["depth"], num_classes))},
                f"width {cfg['width']}, depth {cfg['depth']}, sinusoidal features of each coordinate")
    else:
        raise UserError(f"unknown --arch {cfg['arch']!r}; choose unet or mlp")


def diffusion_for(cfg, **extra):
    """The noise process a run with settings cfg trains on (extra: a resumed checkpoint's mean_skip)."""
    return Diffusion(cfg["timesteps"], objective=cfg["objective"], loss=cfg["loss"], weighting=cfg["weighting"],
                     timestep_draw=cfg["timestep_draw"], **extra)


def power_ema_exponent(length):
    """EDM2's gamma for a relative standard deviation `length` of the averaging profile (Karras et al. 2024,
    eq. 3): length^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), the largest real root of
    gamma^3 + 7 gamma^2 + (16 - length^-2) gamma + 12 - length^-2."""
    inv = length ** -2
    return float(np.roots([1, 7, 16 - inv, 12 - inv]).real.max())


def ema_update(decay, length=None):
    """EMA with warm-up: after n updates the decay is min(decay, (1 + n) / (10 + n)); or, with a length,
    EDM2's power-function EMA, decay (n / (n + 1))^(gamma + 1), which averages the last `length` share of
    the run at any point of it, however long the run. Computed on the device from AveragedModel's update
    count and applied as one fused lerp: no host sync in the training step."""
    gamma = power_ema_exponent(length) if length else None

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        n = num_averaged.to(ema_params[0].dtype)
        beta = (n / (n + 1)) ** (gamma + 1) if gamma is not None else torch.clamp((1 + n) / (10 + n), max=decay)
        torch._foreach_lerp_(ema_params, params, 1 - beta)
    return update


def make_trainable(model_config, cfg, device):
    """The network, its EMA copy and the optimizer, on the device."""
    model = build_network(model_config).to(device)
    ema = AveragedModel(model, multi_avg_fn=ema_update(cfg["ema_decay"], cfg["ema_length"]), use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, cfg["adam_beta2"]),
                            fused=device.type in ("cuda", "cpu"))
    return model, ema, opt


def drop_labels(y, p, no_label):
    """Labels y (B,) with each replaced by no_label with probability p (classifier-free guidance training)."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, no_label, y)


def train_step(diffusion, model, ema, opt, x0, y, device, amp, part=slice(None)):
    """One optimizer step on a batch x0 (B, 1, 28, 28) with labels y (B,) or None, or on this process's part
    of it (its timesteps and noise drawn for the whole batch); returns the loss as a device tensor (no sync)."""
    with autocast(device, amp):
        loss = diffusion.loss(lambda x, t: model(x, t, None if y is None else y[part]), x0, part)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema.update_parameters(model)
    return loss.detach()


class StopFlag:
    """The first Ctrl-C asks training to stop at the next step boundary; a second one aborts at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")


class RunningLoss:
    """The losses since the last log point, summed on the device: one host sync per log point."""

    def __init__(self, device, world):
        self.world = world
        self.total, self.count = torch.zeros((), device=device), 0
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # the first step with a non-finite loss

    def add(self, loss, step):
        self.total += loss
        self.count += 1
        self.first_bad = torch.where((self.first_bad == 0) & ~torch.isfinite(loss), step, self.first_bad)

    def take(self):
        """(mean loss over all processes, steps) since the last take; an error naming the first bad step if it
        is not finite (in every process alike: DDP has shared the non-finite gradients)."""
        mean, count = self.world.mean_(self.total).item() / self.count, self.count
        if not math.isfinite(mean):
            raise UserError(f"the loss became non-finite at step {self.first_bad.item() or 'before this'}; stopped "
                            f"without saving (the last good checkpoint is kept); try a lower --lr", everywhere=True)
        self.total.zero_()
        self.count = 0
        return mean, count


class Trainer:
    """One run: the data in memory, the network, its EMA and optimizer, and where the run stands."""

    def __init__(self, settings, cfg, ckpt=None, world=None):
        self.s, self.cfg, self.device, self.amp = settings, cfg, settings.device, settings.amp
        self.world = world or World(device=self.device)
        self.epochs, self.minutes, self.steps = run_budget(settings.epochs, settings.minutes, ckpt, settings.steps,
                                                           cfg["dataset"])
        if settings.eval_every and cfg["dataset"] != "mnist":
            raise UserError(f"--eval-every measures digits; for --dataset {cfg['dataset']} drop it and use --mode eval "
                            f"after training", everywhere=True)
        # The first process of each machine first: two processes never download into one folder at once.
        with together(self.world, "loading the data"):
            loaded = load_data(cfg["dataset"], settings.data_dir) if self.world.machine_main else None
        # MNIST: (N, 28, 28) uint8 and labels (N,); the heart: (N, 2) points and None. The whole set in memory.
        data, labels = loaded or load_data(cfg["dataset"], settings.data_dir)
        self.data = data.to(self.device)
        self.labels = labels.to(self.device) if labels is not None else None
        # The digits' frequencies: sampling asks for the digits in these proportions.
        self.class_prior = (torch.bincount(labels, minlength=NO_LABEL).double().div(len(labels)).tolist()
                            if labels is not None else None)
        self.n_batches = max(1, len(data) // cfg["batch_size"])  # the last partial batch is dropped
        if ckpt and self.progress(ckpt["step"], ckpt.get("elapsed", 0.0)) >= 1:
            raise UserError(f"{settings.resume} has already used its budget ({ckpt['epoch']} epochs, step "
                            f"{ckpt['step']}); pass a larger --epochs, --train-steps or --minutes to train on",
                            everywhere=True)
        with together(self.world, "preparing the --eval-every evaluation"):  # may train its classifier first
            self.judge = (evaluate.Judge(settings.data_dir, settings.ckpt_dir, self.device)
                          if settings.eval_every and self.world.main else None)

        torch.manual_seed(cfg["seed"])
        self.diffusion = diffusion_for(cfg, **({"mean_skip": ckpt["diffusion_config"]["mean_skip"]} if ckpt else {}))
        self.model_config, self.shape = network_config(cfg, NO_LABEL if cfg["conditional"] else 0)
        self.model, self.ema, self.opt = make_trainable(self.model_config, cfg, self.device)
        self.net = maybe_compile(self.world.wrap(self.model), settings.compile)  # what the training step calls
        self.epoch, self.batch, self.step, self.history, self.log, elapsed = 0, 0, 0, [], [], 0.0
        if ckpt:
            self.model.load_state_dict(ckpt["model"])
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.n_averaged.fill_(ckpt["ema_updates"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.epoch, self.batch, self.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
            if self.batch >= self.n_batches:  # saved by a Ctrl-C in an epoch's last step before that closed it
                self.epoch, self.batch = self.epoch + 1, 0
            self.history, self.log, elapsed = ckpt["history"], ckpt["log"], ckpt.get("elapsed", 0.0)
            set_rng_state(ckpt["rng"], self.device)
            self.run_dir = os.path.dirname(settings.resume)
        else:
            self.run_dir = None
            with together(self.world, "making the run's folder"):
                if self.world.main:
                    self.run_dir = new_run_dir(settings.ckpt_dir)
        self.clock = time.time() - elapsed  # the run's clock continues across --resume
        self.saved_clock = self.elapsed()  # the clock in the newest checkpoint

    def elapsed(self):
        return time.time() - self.clock

    def progress(self, step=None, seconds=None):
        """How much of the budget is spent, from 0 to 1: the largest of the epoch, step and time fractions."""
        step = self.step if step is None else step
        seconds = self.elapsed() if seconds is None else seconds
        return max(step / (self.epochs * self.n_batches) if self.epochs else 0.0,
                   step / self.steps if self.steps else 0.0,
                   seconds / (60 * self.minutes) if self.minutes else 0.0)

    def agreed_progress(self):
        """progress(), the same in every process (their clocks differ a little): the largest of them."""
        return self.world.largest(self.progress())[0]

    def run(self):
        """Train until the budget is spent or Ctrl-C; returns the exit status."""
        self.print_summary()
        stop = StopFlag()
        previous_handler = signal.signal(signal.SIGINT, stop)
        try:
            self.model.train()
            while self.agreed_progress() < 1:
                loss, count, seconds, stopping = self.run_epoch(stop)
                if stopping:
                    if self.batch < self.n_batches:
                        self.save()
                    else:  # Ctrl-C in the epoch's last step: the epoch is complete, so close it as usual
                        self.end_epoch(loss, count, seconds)
                    print(f"stopped at epoch {self.epoch + 1}, batch {self.batch}/{self.n_batches} (step "
                          f"{self.step}); continue with --resume")
                    return 130
                if count == 0 or not self.end_epoch(loss, count, seconds):
                    break  # the budget ended before this epoch's first step, or inside it
            if self.batch or self.progress(self.step, self.saved_clock) < 1:
                self.save()  # the budget ran out inside an epoch or during the last save: the final state and clock
            print(f"done: {self.epoch + self.batch / self.n_batches:.2f} epochs, {self.step} steps in "
                  f"{self.elapsed() / 60:.1f} minutes; sample with python run.py --mode sample")
            if self.step <= SHORT_RUN_STEPS and self.cfg["objective"] == "v" and self.cfg["dataset"] == "mnist":
                print(f"note: short runs drew better digits predicting x0: at 2,242 and 3,000 steps x0 drew FID 0.9 "
                      f"and 1.1 lower than v and a worst digit 4 and 2 points higher (nine draws each; v 0.5 lower "
                      f"at 4,685 steps, docs/recipe.md); for a run of up to about {SHORT_RUN_STEPS:,} steps add "
                      f"--objective x0")
            return 0
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            # a run that failed before its first checkpoint leaves no empty folder (rank 0 made it)
            if self.run_dir and not os.listdir(self.run_dir):
                os.rmdir(self.run_dir)

    def run_epoch(self, stop):
        """The current epoch's batches until its end, the budget's end or Ctrl-C (in any process); returns (mean
        loss, steps, seconds, stopped by Ctrl-C). The bar closes before any error is printed, so the error is
        the last line."""
        bs, part = self.cfg["batch_size"], self.world.share(self.cfg["batch_size"])
        # The order of each epoch derives from (seed, epoch) alone, so a resumed run sees the same data.
        g = torch.Generator().manual_seed(self.cfg["seed"] * 100_003 + self.epoch)
        order = torch.randperm(len(self.data), generator=g).to(self.device)
        bar = tqdm(total=self.n_batches * bs, initial=self.batch * bs, unit="img", mininterval=1, dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}" + (f"/{self.epochs}" if self.epochs else ""),
                   disable=not self.world.main)
        running, total, count, t0 = RunningLoss(self.device, self.world), 0.0, 0, time.time()
        done, stopping = self.agreed_progress(), False
        try:
            while self.batch < self.n_batches and done < 1:
                loss = self.run_step(order[self.batch * bs:(self.batch + 1) * bs], done, part)
                self.batch, self.step = self.batch + 1, self.step + 1
                running.add(loss, self.step)
                bar.update(bs)
                # Every process stops at the same step: the budget as the slowest clock has it, or Ctrl-C in any.
                done, stopping = self.world.largest(self.progress(), stop.requested)
                if running.count == LOG_EVERY or self.batch == self.n_batches or stopping or done >= 1:
                    mean, n = running.take()
                    self.history.append([self.step, mean])
                    total, count = total + mean * n, count + n
                    bar.set_postfix(loss=f"{mean:.4f}", budget=f"{done:.0%}")
                if stopping:
                    break
        finally:
            bar.close()
        return total / max(count, 1), count, time.time() - t0, bool(stopping)

    def run_step(self, idx, done, part):
        """One optimizer step on the images at idx (this process's part of them), at the learning rate for this
        point of the budget."""
        x0 = to_model_range(self.data[idx])  # (B, 1, 28, 28) or points (B, 2)
        y = drop_labels(self.labels[idx], self.cfg["label_dropout"], NO_LABEL) if self.cfg["conditional"] else None
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step, done)
        return train_step(self.diffusion, self.net, self.ema, self.opt, x0, y, self.device, self.amp, part)

    def end_epoch(self, loss, count, seconds):
        """Log the epoch; if it is complete, move to the next, evaluate when due and save. Returns False when
        the budget ended inside the epoch (then --resume with a larger budget continues it)."""
        row = {"epoch": self.epoch + 1, "step": self.step, "loss": loss,
               "images_per_s": round(count * self.cfg["batch_size"] / seconds, 1), "seconds": round(seconds, 1),
               "lr": self.opt.param_groups[0]["lr"]}
        if self.batch < self.n_batches:
            self.log.append(dict(row, batches=self.batch))
            return False
        self.log.append(row)
        self.epoch, self.batch = self.epoch + 1, 0
        if self.s.eval_every and self.epoch % self.s.eval_every == 0:
            with together(self.world, "the --eval-every evaluation"):
                if self.world.main:
                    self.quick_eval()
        self.save()
        return True

    def quick_eval(self):
        """FID and friends of 500 DDIM-20 samples of the EMA network (DDPM over every step for a posterior-mean
        network from before its output was the noise or x_0's scale, the only sampler it has: T network calls per
        image), drawn as the sample mode draws without a guide (digits from the class prior at DEFAULT_GUIDANCE
        for a labelled run), into the epoch's log row."""
        T = self.cfg["timesteps"]
        name, steps = ("ddpm", None) if self.diffusion.whole_steps_only else ("ddim", min(20, T))
        sp = sample.Sampler(self.run_dir, {"class_prior": self.class_prior}, self.diffusion,
                            sample.denoiser(self.ema.module, self.device, self.amp),
                            sample.sampler_plan(name, steps, None, None, T),
                            sample.DEFAULT_GUIDANCE if self.cfg["conditional"] else None,
                            sample.default_interval(T), self.device, sampler=name)
        fake = sp.generate(500, 0, labels=sp.labels(500, 0), desc="quick eval")
        quick, _ = self.judge(fake)
        self.log[-1].update({k: quick[k] for k in ("fid", "precision", "recall", "confident", "entropy")})
        tqdm.write(f"epoch {self.epoch}: FID {quick['fid']:.3f}, precision {quick['precision']:.3f}, recall "
                   f"{quick['recall']:.3f}, confident {quick['confident']:.3f} "
                   f"(500 samples, {sp.plan.describe(sp.sampler)})")

    def state(self):
        """The checkpoint: one self-describing dict of tensors and plain types."""
        return {"format": FORMAT, "model_config": self.model_config, "diffusion_config": self.diffusion.config(),
                "train_config": self.cfg, "budget": {"epochs": self.epochs, "minutes": self.minutes,
                                                              "steps": self.steps},
                "model": self.model.state_dict(), "ema": self.ema.module.state_dict(),
                "ema_updates": int(self.ema.n_averaged), "optimizer": self.opt.state_dict(), "epoch": self.epoch,
                "batch": self.batch, "step": self.step, "elapsed": self.saved_clock, "rng": rng_state(self.device),
                "history": self.history, "log": self.log, "class_prior": self.class_prior}

    def save(self):
        """Rank 0 writes; every process learns whether it worked (and stops with it if not)."""
        self.saved_clock = self.world.largest(self.elapsed())[0]
        with together(self.world, "writing the checkpoint"):
            if self.world.main:
                self.write()

    def write(self):
        """The checkpoint (refused if any weight is non-finite), pruning, log.jsonl and loss.png."""
        bad = [k for k, v in self.model.state_dict().items() if not torch.isfinite(v).all()]
        if bad:
            raise UserError(f"weights became non-finite ({bad[0]}) at step {self.step}; not saved, the last good "
                            f"checkpoint is kept; try a lower --lr")
        path = checkpoint_path(self.run_dir, self.step)
        save_checkpoint(self.state(), path)
        if self.s.keep:
            prune_checkpoints(self.run_dir, self.s.keep, self.n_batches)
        write_atomic(os.path.join(self.run_dir, "log.jsonl"),
                     lambda f: f.write("".join(json.dumps(r) + "\n" for r in self.log).encode()))
        evals = [(r["step"], r["fid"]) for r in self.log if "fid" in r]
        save_figure(figures.loss_curve(self.history, f"{self.run_dir}: step {self.step}, epoch {self.epoch}", evals,
                                       f"{self.cfg['loss']} loss on {self.cfg['objective']}"),
                    os.path.join(self.run_dir, "loss.png"))
        tqdm.write(f"saved {path}")

    def print_summary(self):
        cfg = self.cfg
        kind = f"labels, dropout {cfg['label_dropout']:g}" if cfg["conditional"] else "no labels"
        budget = " and ".join(([f"{self.epochs} epochs"] if self.epochs else [])
                              + ([f"{self.steps} steps"] if self.steps else [])
                              + ([f"{self.minutes:g} minutes"] if self.minutes else []))
        ema = f"power EMA {cfg['ema_length']:g}" if cfg["ema_length"] else f"EMA {cfg['ema_decay']:g}"
        w = self.world.size
        where = f"{w} processes (DDP, {cfg['batch_size'] // w} of each batch apiece), " if w > 1 else ""
        print(f"{cfg['arch']} {count_parameters(self.model):,} parameters, {self.shape}; predicts "
              f"{cfg['objective']}, {cfg['loss']} loss, {cfg['weighting']} weighting, t {cfg['timestep_draw']}; "
              f"T={cfg['timesteps']}; {kind}; "
              f"lr {cfg['lr']:g} {cfg['schedule']}, AdamW beta2 {cfg['adam_beta2']:g}, {ema}; {len(self.data):,} "
              f"{'images' if cfg['dataset'] == 'mnist' else 'points'}, {self.n_batches} batches of "
              f"{cfg['batch_size']}; budget {budget}; {where}device {self.device.type}, "
              f"{'bf16' if self.amp else 'fp32'}; run {self.run_dir}")
        if cfg["loss"] == "l1" and cfg["objective"] == "v" and cfg["dataset"] == "mnist":
            print("note: L1 on v drew far worse digits than L1 on x0, the L1 default: after 4,159 steps FID 66-92 "
                  "against 25-26 (docs/variants.md); a new run without --objective v predicts x0")
        if cfg["objective"] != "mean" or cfg["dataset"] != "mnist":
            return
        at_1000, bound, older = cfg["timesteps"] >= 1000, cfg["weighting"] == "vlb", self.diffusion.mean_skip != "eps"
        if older and at_1000 and (self.diffusion.whole_steps_only or bound):
            print("note: posterior-mean networks whose output is not the noise (eq. 11; older checkpoints) drew no "
                  "digits at T >= 1000 (docs/variants.md)")
        elif bound and not older and at_1000:
            print("note: at T >= 1000 the bound's weighting (vlb) drew worse digits than eps's p2 weighting: after "
                  "7,601 steps FID 100 and 79% confident, where --objective eps drew FID 17 and 98% "
                  "(docs/variants.md); --weighting p2 trains the same network and loss as --objective eps")
        elif bound and not older:
            print(f"note: at T = {cfg['timesteps']} the bound's weighting (vlb) still drew worse digits than eps's p2 "
                  "weighting at T = 1000: after 4,159 steps (measured at T = 100) FID 106 with its own DDPM step "
                  "(153 with dpm2m) and 77% confident, where --objective eps drew FID 18 and 96% with dpm2m "
                  "(docs/variants.md); --weighting p2 --timesteps 1000 trains the same network and loss as "
                  "--objective eps")
