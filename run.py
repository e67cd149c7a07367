"""Train a DDPM on MNIST, or sample from a checkpoint.

    python run.py --mode train     # checkpoints/run_NNN/ckpt_*.pt, log.jsonl, loss.png
    python run.py --mode sample    # gen/sample.png, process.png, process.gif, forward.png

See README.md for every flag.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import evaluate
import figures
from diffusion import Diffusion
from diffusion import LOSSES, OBJECTIVES
from model import MLPConfig, UNetConfig, build_network, count_parameters

FORMAT = "mnist-ddpm/1"  # written into every checkpoint, checked on load
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# Flags that define a run. Their defaults apply to a new run; with --resume, flags not given take the
# checkpoint's values and flags given must agree with them. --epochs may grow on resume.
TRAIN_DEFAULTS = dict(arch="unet", channels=UNetConfig.channels, blocks=UNetConfig.blocks, width=MLPConfig.width,
                      depth=MLPConfig.depth, objective="eps", loss="mse", timesteps=1000,
                      batch_size=128, lr=1e-3, warmup=200, schedule="cosine", ema_decay=0.999, seed=0,
                      conditional=True, label_dropout=0.1)
# Checkpoints from before labels, lr schedules, objectives and the MLP: unconditional, constant lr, eps, U-Net.
LEGACY = dict(TRAIN_DEFAULTS, conditional=False, label_dropout=0.0, schedule="constant")
TRAINING_FLAGS = (*TRAIN_DEFAULTS, "epochs", "minutes", "resume", "keep", "eval_every")
SAMPLING_FLAGS = ("n_samples", "sampler", "steps", "eta", "sample_seed", "digit", "guidance")
DEFAULT_GUIDANCE = 2.0  # classifier-free guidance weight W; 1 is plain conditional, 0 unconditional
DEFAULT_EPOCHS = 10  # a new run given neither --epochs nor --minutes


class UserError(Exception):
    """Bad input or environment: printed as one line naming the fix, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Arguments


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see python run.py --help)")


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def number_type(ok, what):
    """An argparse type: a float that passes ok(v), else an error saying it must be `what`."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            v = math.nan  # fails every check below
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        return v
    return parse


positive_float = number_type(lambda v: v > 0 and math.isfinite(v), "a positive number")
fraction = number_type(lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1")
guidance_weight = number_type(lambda v: 0 <= v <= 100, "a number from 0 to 100 (1 = plain conditional)")


def int_list(s):
    try:
        v = tuple(int(p) for p in s.split(","))
    except ValueError:
        v = ()
    if len(v) != 3 or min(v) < 1:
        raise argparse.ArgumentTypeError(f"must be three positive integers like 1,1,2, got {s!r}")
    return v


def channel_list(s):
    v = int_list(s)
    if any(c % UNetConfig.groups for c in v):
        raise argparse.ArgumentTypeError(f"must be three multiples of {UNetConfig.groups} (the GroupNorm groups) "
                                         f"like 16,64,256, got {s!r}")
    return v


def build_parser():
    D = TRAIN_DEFAULTS
    p = Parser(description="DDPM on MNIST: train a small U-Net, sample from it, or measure its samples.")
    p.add_argument("--mode", required=True, choices=["train", "sample", "eval"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="auto picks cuda, then mps, then cpu (default auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast with fp32 weights; auto: bf16 where measured faster (default auto)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network for training and sampling (CUDA, CPU; not MPS)")
    p.add_argument("--data-dir", default="dataset/mnist", metavar="DIR", help="MNIST root (default dataset/mnist)")
    p.add_argument("--ckpt-dir", default="checkpoints", metavar="DIR",
                   help="runs go in DIR/run_NNN; the eval classifier in DIR (default checkpoints)")
    p.add_argument("--out-dir", default="gen", metavar="DIR", help="figures and eval.json (default gen)")
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint to sample, evaluate or resume "
                                                        "(default: the newest under --ckpt-dir)")
    g = p.add_argument_group("training (a new run takes the defaults; --resume takes the checkpoint's)")
    g.add_argument("--resume", action="store_true", default=None, help="continue the newest run, or --checkpoint")
    g.add_argument("--epochs", type=positive_int, metavar="N",
                   help=f"total epochs of the run (default {DEFAULT_EPOCHS}, or no limit with --minutes)")
    g.add_argument("--minutes", type=positive_float, metavar="M",
                   help="wall-clock budget of the run in minutes, kept across --resume; with --epochs, "
                        "whichever ends first. The lr schedule and the end of training follow the budget")
    g.add_argument("--batch-size", type=positive_int, metavar="N", help=f"default {D['batch_size']}")
    g.add_argument("--lr", type=positive_float, help=f"AdamW learning rate (default {D['lr']})")
    g.add_argument("--warmup", type=positive_int, metavar="N", help=f"steps of linear lr warm-up (default {D['warmup']})")
    g.add_argument("--schedule", choices=["cosine", "constant"],
                   help=f"lr after warm-up: cosine decay to 0 at the end of the budget, or constant "
                        f"(default {D['schedule']})")
    g.add_argument("--ema-decay", type=positive_float, metavar="D",
                   help=f"EMA decay, approached as (1+n)/(10+n) (default {D['ema_decay']})")
    g.add_argument("--seed", type=int, help=f"initialisation, data order and noise (default {D['seed']})")
    g.add_argument("--arch", choices=["unet", "mlp"],
                   help="the network: a residual conv U-Net, or an MLP over the flattened image (default unet)")
    g.add_argument("--width", type=positive_int, metavar="N", help=f"MLP hidden width (default {D['width']})")
    g.add_argument("--depth", type=positive_int, metavar="N", help=f"MLP residual blocks (default {D['depth']})")
    g.add_argument("--objective", choices=OBJECTIVES,
                   help="what the network predicts: the noise eps (DDPM), the clean image x0, or the posterior "
                        "mean of x_{t-1} (default eps)")
    g.add_argument("--loss", choices=list(LOSSES), help="the regression loss on that target (default mse)")
    g.add_argument("--timesteps", type=positive_int, metavar="T", help=f"diffusion steps (default {D['timesteps']})")
    g.add_argument("--channels", type=channel_list, metavar="A,B,C",
                   help=f"U-Net widths at 28, 14 and 7 pixels (default {fmt(D['channels'])})")
    g.add_argument("--blocks", type=int_list, metavar="A,B,C",
                   help=f"residual blocks per level (default {fmt(D['blocks'])})")
    g.add_argument("--unconditional", dest="conditional", action="store_false", default=None,
                   help="train without digit labels (default: with labels, so the run can also draw a chosen digit)")
    g.add_argument("--label-dropout", type=fraction, metavar="P",
                   help=f"share of each batch trained with no label, so one run samples both ways "
                        f"(default {D['label_dropout']})")
    g.add_argument("--keep", type=positive_int, metavar="K",
                   help="keep only the newest K end-of-epoch checkpoints of the run, plus its last one "
                        "(default: keep all)")
    g.add_argument("--eval-every", type=positive_int, metavar="K",
                   help="every K epochs, FID etc. of 500 DDIM-20 samples into the log and loss.png")
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--n-samples", type=positive_int, metavar="N", help="images to draw (default: sample 256, eval 1000)")
    g.add_argument("--sampler", choices=["ddpm", "ddim"],
                   help="ddpm: ancestral, all T steps; ddim: --steps evenly spaced steps (default ddim)")
    g.add_argument("--steps", type=positive_int, metavar="N", help="DDIM steps (default 50)")
    g.add_argument("--eta", type=float, help="DDIM noise (Song et al. eq. 16): 0 is deterministic DDIM, 1 the "
                                             "ancestral step; default 1, measured best here (README)")
    g.add_argument("--digit", type=int, choices=range(10), metavar="D",
                   help="sample: a grid of digit D (0-9) instead of unconditional samples (labelled runs)")
    g.add_argument("--guidance", type=guidance_weight, metavar="W",
                   help=f"classifier-free guidance eps_u + W (eps_c - eps_u): 1 is plain conditional, 0 "
                        f"unconditional (default {DEFAULT_GUIDANCE:g}; labelled runs)")
    g.add_argument("--sample-seed", type=int, metavar="S",
                   help="same seed and checkpoint, same images (default 0)")
    return p


# ----------------------------------------------------------------------------------------------
# Device, precision, data


def pick_device(name):
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    elif name == "cuda":
        if not cuda:
            raise UserError("--device cuda: no CUDA GPU is available to PyTorch here; use --device cpu or auto")
        return torch.device("cuda")
    elif name == "mps":
        if not mps:
            raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
        return torch.device("mps")
    elif name == "cpu":
        return torch.device("cpu")
    else:
        raise UserError(f"unknown --device {name!r}; choose auto, cuda, mps or cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def bf16_is_faster(device):
    """Time a 1024x1024 matmul in fp32 and bf16 on the device: bf16 only pays where it is native."""
    a = torch.randn(1024, 1024, device=device)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        b = a.to(dtype)
        for i in range(8):
            if i == 3:
                _sync(device)
                t0 = time.perf_counter()
            b @ b
        _sync(device)
        times[dtype] = time.perf_counter() - t0
    return times[torch.bfloat16] < 0.7 * times[torch.float32]


def pick_precision(name, device):
    """The autocast dtype, or None for plain fp32."""
    if name == "fp32":
        return None
    elif name == "bf16":
        if device.type == "mps":
            raise UserError("--precision bf16 is not supported on MPS; use --precision fp32 or auto")
        return torch.bfloat16
    elif name == "auto":
        # Never on MPS (unproven there); elsewhere only where this device really runs bf16 faster.
        return torch.bfloat16 if device.type != "mps" and bf16_is_faster(device) else None
    else:
        raise UserError(f"unknown --precision {name!r}; choose auto, fp32 or bf16")


def pick_hardware(args):
    """(device, autocast dtype) from --device, --precision and --compile, each checked for this machine."""
    device = pick_device(args.device)
    if args.compile and device.type == "mps":
        raise UserError("--compile is not supported on MPS; drop --compile")
    return device, pick_precision(args.precision, device)


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def load_mnist(root, train=True):
    """MNIST images (N, 28, 28) uint8 and labels (N,), downloaded by torchvision if missing."""
    from torchvision.datasets import MNIST
    raw = os.path.join(root, "MNIST", "raw")
    try:
        ds = MNIST(root, train=train, download=True)
        return ds.data, ds.targets
    except Exception as e:  # torchvision raises RuntimeError, URLError or OSError here
        raise UserError(f"MNIST is missing from {raw} and could not be downloaded ({type(e).__name__}); "
                        f"put the four files {', '.join(MNIST_FILES)} in {raw}") from None


def to_model_range(images):
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [-1, 1]."""
    return images.unsqueeze(1).float().div(127.5).sub(1)


# ----------------------------------------------------------------------------------------------
# Files: every write goes through a temporary file and an atomic rename


def write_atomic(path, write):
    """write(f) into a temporary file beside path, then rename it over path: never a partial file.

    A process killed mid-write (SIGKILL) leaves its hidden temporary file; clean_temporary removes those.
    """
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); the previous file is untouched") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def make_folder(path, flag):
    """os.makedirs(path), or a one-line error naming the flag that chose the folder."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {path} ({e.strerror or e}); pass another {flag}") from None


def clean_temporary(folder):
    """Remove the temporary files of writes that were killed (call while holding the folder's lock)."""
    for path in glob.glob(os.path.join(folder, ".*.tmp*")):
        with contextlib.suppress(OSError):
            os.remove(path)


def save_figure(fig, path):
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    figures.plt.close(fig)


def latest_checkpoint(ckpt_dir):
    paths = glob.glob(os.path.join(ckpt_dir, "run_*", "ckpt_*.pt"))
    if not paths:
        raise UserError(f"no checkpoint under {ckpt_dir}/run_*/; train first (python run.py --mode train) "
                        f"or pass --checkpoint PATH")
    return max(paths, key=os.path.getmtime)


def save_checkpoint(state, path):
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path):
    """The checkpoint dict at path, with tensors on the CPU; a clear error for anything else."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; check the path or omit --checkpoint for the newest")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be truncated "
                        f"or not from run.py; pick another with --checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by run.py; pick another with --checkpoint")
    return ckpt


# ----------------------------------------------------------------------------------------------
# Training


def run_config(args, ckpt):
    """The run's settings: flags given, else the checkpoint's (on resume), else the defaults."""
    cfg = {**LEGACY, **ckpt["train_config"]} if ckpt else dict(TRAIN_DEFAULTS)
    for key in TRAIN_DEFAULTS:
        given = getattr(args, key)
        if given is None:
            continue
        if ckpt and given != cfg[key]:
            if key == "conditional":  # the one flag that is a switch: --unconditional
                flag, was = "--unconditional", "labels"
            else:
                flag = "--" + key.replace("_", "-")
                was = f"{flag} {fmt(cfg[key])}, not {fmt(given)}"
            raise UserError(f"--resume: {args.checkpoint_path} was trained with {was}; drop {flag} to resume, "
                            f"or train a new run without --resume")
        cfg[key] = given
    if not cfg["conditional"] and args.label_dropout is not None:
        raise UserError("--label-dropout needs labels; drop it or drop --unconditional")
    other = {"unet": ("width", "depth"), "mlp": ("channels", "blocks")}[cfg["arch"]]
    for key in other:
        if getattr(args, key) is not None:
            raise UserError(f"--{key} does not apply to --arch {cfg['arch']}; drop it (--channels and --blocks "
                            f"shape the U-Net, --width and --depth the MLP)")
    return cfg


def fmt(v):
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


@contextlib.contextmanager
def training_lock(ckpt_dir):
    """Hold ckpt_dir/.lock for the whole training: a second training into the same folder is refused.
    The operating system drops the lock when the process ends, however it ends (even SIGKILL)."""
    make_folder(ckpt_dir, "--ckpt-dir")
    path = os.path.join(ckpt_dir, ".lock")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; training works, unguarded
        yield
        return
    try:
        f = open(path, "a+")
    except OSError as e:
        raise UserError(f"cannot write into {ckpt_dir} ({e.strerror}); pick another --ckpt-dir") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            raise UserError(f"another training (pid {owner}) is writing into {ckpt_dir}; wait for it to finish "
                            f"or pass another --ckpt-dir") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def prune_checkpoints(run_dir, keep, steps_per_epoch):
    """Keep the newest `keep` end-of-epoch checkpoints of run_dir and its newest checkpoint; delete the rest."""
    steps = sorted(int(os.path.basename(p)[5:-3]) for p in glob.glob(os.path.join(run_dir, "ckpt_*.pt")))
    kept = set([s for s in steps if s % steps_per_epoch == 0][-keep:] + steps[-1:])
    for s in steps:
        if s not in kept:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, f"ckpt_{s:08d}.pt"))


def new_run_dir(ckpt_dir):
    """A fresh ckpt_dir/run_NNN. Leftovers of killed runs go first: temporary files, then empty run folders."""
    for d in glob.glob(os.path.join(ckpt_dir, "run_*")):
        clean_temporary(d)
        with contextlib.suppress(OSError):
            os.rmdir(d)  # only succeeds if empty
    n = 1 + max([int(d[4:]) for d in os.listdir(ckpt_dir) if d.startswith("run_") and d[4:].isdigit()],
                default=0)
    path = os.path.join(ckpt_dir, f"run_{n:03d}")
    os.makedirs(path)
    return path


def ema_update(decay):
    """EMA with warm-up: the decay grows as (1 + n) / (10 + n) towards its set value."""
    def update(ema_params, params, num_averaged):
        d = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        for e, p in zip(ema_params, params):
            e.lerp_(p.detach(), 1 - d)
    return update


def maybe_compile(model, args):
    """torch.compile when asked. The compiled wrapper shares the model's parameters, and checkpoints
    always save the plain model, so they load without compiling."""
    return torch.compile(model) if args.compile else model


def make_trainable(model_config, cfg, device):
    """The network, its EMA copy and the optimizer, on the device."""
    model = build_network(model_config).to(device)
    ema = AveragedModel(model, multi_avg_fn=ema_update(cfg["ema_decay"]), use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], fused=device.type in ("cuda", "cpu"))
    return model, ema, opt


def drop_labels(y, p, no_label):
    """Labels y (B,) with each replaced by no_label with probability p (classifier-free guidance training)."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, no_label, y)


def train_step(diffusion, model, ema, opt, x0, y, device, amp):
    """One optimizer step on a batch x0 (B, 1, 28, 28) with labels y (B,) or None; returns the loss as a
    device tensor (no sync)."""
    with autocast(device, amp):
        loss = diffusion.loss(lambda x, t: model(x, t, y), x0)
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


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def network_config(cfg, num_classes):
    """The checkpoint's model_config for the run's settings, and a short description of its shape."""
    if cfg["arch"] == "unet":
        return ({"arch": "unet", **asdict(UNetConfig(cfg["channels"], cfg["blocks"], num_classes=num_classes))},
                f"channels {fmt(cfg['channels'])}, blocks {fmt(cfg['blocks'])}")
    elif cfg["arch"] == "mlp":
        return ({"arch": "mlp", **asdict(MLPConfig(cfg["width"], cfg["depth"], num_classes))},
                f"width {cfg['width']}, depth {cfg['depth']}")
    else:
        raise UserError(f"unknown --arch {cfg['arch']!r}; choose unet or mlp")


def run_budget(args, ckpt):
    """(epochs, minutes) of the run: the flags given, else the checkpoint's; None means no limit."""
    saved = ckpt.get("budget", {}) if ckpt else {}
    epochs = args.epochs if args.epochs is not None else saved.get("epochs")
    minutes = args.minutes if args.minutes is not None else saved.get("minutes")
    if epochs is None and minutes is None:
        epochs = DEFAULT_EPOCHS
    return epochs, minutes


def learning_rate(cfg, step, progress):
    """Linear warm-up over cfg['warmup'] steps, then constant or a cosine decay to 0 at progress 1."""
    warm = min(1.0, (step + 1) / cfg["warmup"])
    if cfg["schedule"] == "cosine":
        return cfg["lr"] * warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    elif cfg["schedule"] == "constant":
        return cfg["lr"] * warm
    else:
        raise UserError(f"unknown --schedule {cfg['schedule']!r}; choose cosine or constant")


def train(args):
    """Train a new run, or continue one with --resume; returns the exit status."""
    device, amp = pick_hardware(args)
    ckpt = None
    if args.resume:
        args.checkpoint_path = args.checkpoint or latest_checkpoint(args.ckpt_dir)
        ckpt = load_checkpoint(args.checkpoint_path)
    elif args.checkpoint:
        raise UserError("--checkpoint in train mode needs --resume (to continue that run)")
    # The folder that holds the run's folder: one training at a time writes there.
    runs = os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint_path))) if ckpt else args.ckpt_dir
    with training_lock(runs):
        return train_locked(args, device, amp, ckpt)


def train_locked(args, device, amp, ckpt):
    if ckpt:  # we hold the lock: any temporary file in the run's folder is a killed write's leftover
        clean_temporary(os.path.dirname(args.checkpoint_path))
    cfg = run_config(args, ckpt)
    epochs, minutes = run_budget(args, ckpt)
    images, labels = load_mnist(args.data_dir)  # (N, 28, 28) uint8, (N,): the whole set in memory
    images, labels = images.to(device), labels.to(device)
    n, bs = images.shape[0], cfg["batch_size"]
    n_batches = max(1, n // bs)  # the last partial batch is dropped, a fresh order each epoch

    def progress(step, seconds):
        """How much of the budget is spent, from 0 to 1: the larger of the step and the time fraction."""
        return max(step / (epochs * n_batches) if epochs else 0.0, seconds / (60 * minutes) if minutes else 0.0)

    if ckpt and progress(ckpt["step"], ckpt.get("elapsed", 0.0)) >= 1:
        raise UserError(f"{args.checkpoint_path} has already used its budget ({ckpt['epoch']} epochs, step "
                        f"{ckpt['step']}); pass a larger --epochs or --minutes to train on")
    judge = Judge(args, device) if args.eval_every else None

    torch.manual_seed(cfg["seed"])
    diffusion = Diffusion(cfg["timesteps"], objective=cfg["objective"], loss=cfg["loss"])
    no_label = 10  # the label embedding's last entry
    model_config, shape = network_config(cfg, no_label if cfg["conditional"] else 0)
    model, ema, opt = make_trainable(model_config, cfg, device)
    net = maybe_compile(model, args)  # what the training step calls
    epoch, batch, step, history, log, elapsed = 0, 0, 0, [], [], 0.0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.module.load_state_dict(ckpt["ema"])
        ema.n_averaged.fill_(ckpt["ema_updates"])
        opt.load_state_dict(ckpt["optimizer"])
        epoch, batch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        history, log, elapsed = ckpt["history"], ckpt["log"], ckpt.get("elapsed", 0.0)
        set_rng_state(ckpt["rng"], device)
        run_dir = os.path.dirname(args.checkpoint_path)
    else:
        run_dir = new_run_dir(args.ckpt_dir)

    kind = f"labels, dropout {cfg['label_dropout']:g}" if cfg["conditional"] else "no labels"
    budget = " and ".join(([f"{epochs} epochs"] if epochs else []) + ([f"{minutes:g} minutes"] if minutes else []))
    print(f"{cfg['arch']} {count_parameters(model):,} parameters, {shape}; predicts {cfg['objective']}, "
          f"{cfg['loss']} loss; T={cfg['timesteps']}; "
          f"{kind}; {n:,} images, {n_batches} batches of {bs}; "
          f"budget {budget}; device {device.type}, {'bf16' if amp else 'fp32'}; run {run_dir}")
    clock = time.time() - elapsed  # elapsed() continues the run's clock across --resume
    elapsed = lambda: time.time() - clock  # noqa: E731

    saved_clock = elapsed()  # the clock in the newest checkpoint

    def save():
        nonlocal saved_clock
        saved_clock = elapsed()
        bad = [k for k, v in model.state_dict().items() if not torch.isfinite(v).all()]
        if bad:
            raise UserError(f"weights became non-finite ({bad[0]}) at step {step}; not saved, the last good "
                            f"checkpoint is kept; try a lower --lr")
        state = {"format": FORMAT, "model_config": model_config, "diffusion_config": diffusion.config(),
                 "train_config": cfg, "budget": {"epochs": epochs, "minutes": minutes},
                 "model": model.state_dict(), "ema": ema.module.state_dict(),
                 "ema_updates": int(ema.n_averaged), "optimizer": opt.state_dict(), "epoch": epoch,
                 "batch": batch, "step": step, "elapsed": saved_clock, "rng": rng_state(device),
                 "history": history, "log": log}
        path = os.path.join(run_dir, f"ckpt_{step:08d}.pt")
        save_checkpoint(state, path)
        if args.keep:
            prune_checkpoints(run_dir, args.keep, n_batches)
        write_atomic(os.path.join(run_dir, "log.jsonl"),
                     lambda f: f.write("".join(json.dumps(r) + "\n" for r in log).encode()))
        evals = [(r["step"], r["fid"]) for r in log if "fid" in r]
        save_figure(figures.loss_curve(history, f"{run_dir}: step {step}, epoch {epoch}", evals,
                                       f"{cfg['loss']} loss on {cfg['objective']}"),
                    os.path.join(run_dir, "loss.png"))
        tqdm.write(f"saved {path}")

    stop = StopFlag()
    previous_handler = signal.signal(signal.SIGINT, stop)
    log_every = 50
    try:
        model.train()
        while progress(step, elapsed()) < 1:
            # The order of each epoch derives from (seed, epoch) alone, so a resumed run sees the same data.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"] * 100_003 + epoch))
            order = order.to(device)
            bar = tqdm(total=n_batches * bs, initial=batch * bs, unit="img", mininterval=1, dynamic_ncols=True,
                       desc=f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else ""))
            running, count, epoch_loss, epoch_count, t0 = torch.zeros((), device=device), 0, 0.0, 0, time.time()
            first_bad = torch.zeros((), dtype=torch.long, device=device)  # the first step with a non-finite loss
            done = progress(step, elapsed())
            try:  # the bar closes before any error is printed, so the error is the last line
                while batch < n_batches and done < 1:
                    idx = order[batch * bs:(batch + 1) * bs]
                    x0 = to_model_range(images[idx])  # (B, 1, 28, 28)
                    y = drop_labels(labels[idx], cfg["label_dropout"], no_label) if cfg["conditional"] else None
                    for group in opt.param_groups:
                        group["lr"] = learning_rate(cfg, step, done)
                    loss = train_step(diffusion, net, ema, opt, x0, y, device, amp)
                    running += loss
                    count += 1
                    batch += 1
                    step += 1
                    first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss), step, first_bad)  # no sync
                    bar.update(bs)
                    done = progress(step, elapsed())
                    if count == log_every or batch == n_batches or stop.requested or done >= 1:
                        mean = running.item() / count  # one host sync per log_every steps
                        if not math.isfinite(mean):
                            raise UserError(f"the loss became non-finite at step {first_bad.item()}; stopped without "
                                            f"saving (the last good checkpoint is kept); try a lower --lr")
                        history.append([step, mean])
                        epoch_loss, epoch_count = epoch_loss + mean * count, epoch_count + count
                        running.zero_()
                        count = 0
                        bar.set_postfix(loss=f"{mean:.4f}", budget=f"{done:.0%}")
                    if stop.requested:
                        break
            finally:
                bar.close()
            if stop.requested:
                save()
                print(f"stopped at epoch {epoch + 1}, batch {batch}/{n_batches} (step {step}); "
                      f"continue with --resume")
                return 130
            if epoch_count == 0:
                break  # the budget ended before this epoch's first step
            seconds = time.time() - t0
            row = {"epoch": epoch + 1, "step": step, "loss": epoch_loss / max(epoch_count, 1),
                   "images_per_s": round(epoch_count * bs / seconds, 1), "seconds": round(seconds, 1),
                   "lr": opt.param_groups[0]["lr"]}
            if batch < n_batches:  # the budget ended inside this epoch; --resume with more continues it
                row["batches"] = batch
                log.append(row)
                break
            log.append(row)
            epoch, batch = epoch + 1, 0
            if judge and epoch % args.eval_every == 0:
                fake = generate(denoiser(ema.module, device, amp), diffusion, 500, min(20, cfg["timesteps"]), 1.0,
                                device, seed=0, desc="quick eval")
                quick, _ = judge(fake)
                log[-1].update({k: quick[k] for k in ("fid", "precision", "recall", "confident", "entropy")})
                tqdm.write(f"epoch {epoch}: FID {quick['fid']:.3f}, precision {quick['precision']:.3f}, recall "
                           f"{quick['recall']:.3f}, confident {quick['confident']:.3f} (500 DDIM-20 samples)")
            save()
        if batch or progress(step, saved_clock) < 1:
            save()  # the budget ran out inside an epoch or during the last save: the final state and clock
        print(f"done: {epoch + batch / n_batches:.2f} epochs, {step} steps in {elapsed() / 60:.1f} minutes; "
              f"sample with python run.py --mode sample")
        return 0
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if not os.listdir(run_dir):  # a run that failed before its first checkpoint leaves no empty folder
            os.rmdir(run_dir)


# ----------------------------------------------------------------------------------------------
# Sampling


def sampler_settings(args, timesteps):
    """(steps, eta) for the chosen sampler; DDPM means every step with the posterior variance."""
    if args.sampler == "ddpm":
        if args.steps not in (None, timesteps):
            raise UserError(f"--sampler ddpm always runs all {timesteps} steps; use --sampler ddim for --steps")
        if args.eta not in (None, 1.0):
            raise UserError("--sampler ddpm has eta 1 by definition; use --sampler ddim to set --eta")
        return timesteps, 1.0
    elif args.sampler == "ddim":
        steps = args.steps or min(50, timesteps)
        if steps > timesteps:
            raise UserError(f"--steps {steps} exceeds the checkpoint's {timesteps} timesteps")
        if args.eta is not None and not 0 <= args.eta <= 1:
            raise UserError(f"--eta must be between 0 and 1, got {args.eta}")
        # eta 1 by default: at 50 steps it matched 1000-step DDPM in FID here, and eta 0 was far worse.
        return steps, 1.0 if args.eta is None else args.eta
    else:
        raise UserError(f"unknown --sampler {args.sampler!r}; choose ddpm or ddim")


def load_for_sampling(args):
    """Everything sampling needs from a checkpoint: (path, ckpt, device, diffusion, denoise, steps, eta)."""
    device, amp = pick_hardware(args)
    path = args.checkpoint or latest_checkpoint(args.ckpt_dir)
    ckpt = load_checkpoint(path)
    diffusion = Diffusion(**ckpt["diffusion_config"])
    steps, eta = sampler_settings(args, diffusion.timesteps)
    model = build_network(ckpt["model_config"]).to(device)
    model.load_state_dict(ckpt["ema"])
    model.eval()
    labelled = model.cfg.num_classes > 0
    if not labelled and (args.digit is not None or args.guidance is not None):
        flag = "--digit" if args.digit is not None else "--guidance"
        raise UserError(f"{path} was trained without labels (--unconditional), so {flag} cannot apply; "
                        f"drop {flag} or pick a checkpoint trained with labels")
    args.guidance = (DEFAULT_GUIDANCE if args.guidance is None else args.guidance) if labelled else None
    print(f"{path}: epoch {ckpt['epoch']}, step {ckpt['step']}, "
          f"{f'labelled, guidance {args.guidance:g}' if labelled else 'unconditional'}; {args.sampler} with "
          f"{steps} steps, eta {eta}; {device.type}, {'bf16' if amp else 'fp32'}")
    return path, ckpt, device, diffusion, denoiser(maybe_compile(model, args), device, amp), steps, eta


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


def sample(args):
    path, ckpt, device, diffusion, denoise, steps, eta = load_for_sampling(args)

    # One sampling run gives the grid, the strips and the animation: keep a few frames of a few samples.
    n = args.n_samples or 256
    n_strip, n_anim = min(6, n), min(64, n)
    strip_at = set(torch.linspace(0, steps, min(12, steps + 1)).round().long().tolist())
    anim_at = set(torch.linspace(0, steps, min(40, steps + 1)).round().long().tolist())
    noise = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(args.sample_seed))
    strip, labels, anim = [noise[:n_strip]], ["noise"], [noise[:n_anim]]
    t0 = time.time()
    y = None if args.digit is None else torch.full((n,), args.digit, device=device)
    model = lambda x, t: denoise(x, t, y, args.guidance)  # noqa: E731
    loop = diffusion.sample_loop(model, noise.shape, steps=steps, eta=eta, device=device,
                                 generator=torch.Generator().manual_seed(args.sample_seed + 1), noise=noise)
    for k, (t, x, _) in enumerate(tqdm(loop, total=steps, desc="sampling", mininterval=1), start=1):
        if k in strip_at:
            strip.append(x[:n_strip].cpu())
            labels.append(f"t={t}" if t >= 0 else "x0")
        if k in anim_at:
            anim.append(x[:n_anim].cpu())
    seconds = time.time() - t0
    x = x.cpu()

    make_folder(args.out_dir, "--out-dir")
    out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    nrow = math.ceil(math.sqrt(n))
    write_atomic(out("sample.png"), lambda f: figures.grid(x, nrow).save(f, format="PNG"))
    what = "" if args.digit is None else f", digit {args.digit}, guidance {args.guidance:g}"
    save_figure(figures.strips(torch.stack(strip), labels, f"reverse process, {args.sampler} {steps} steps{what}"),
                out("process.png"))
    frames = figures.animation(torch.stack(anim), math.ceil(math.sqrt(n_anim)))
    durations = [80] * (len(frames) - 1) + [1500]  # hold the finished digits
    write_atomic(out("process.gif"), lambda f: frames[0].save(
        f, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0))
    written = ["sample.png", "process.png", "process.gif"]
    if args.guidance is not None and args.digit is None:
        # One row per digit, guided, from a seed derived from --sample-seed: reruns give the same figure.
        per_row = 10
        digits = torch.arange(10).repeat_interleave(per_row)
        rows = generate(denoise, diffusion, len(digits), steps, eta, device, args.sample_seed + 2, labels=digits,
                        guidance=args.guidance, desc="digits")
        write_atomic(out("digits.png"), lambda f: figures.grid(rows, per_row).save(f, format="PNG"))
        written.append("digits.png")
    try:
        real = to_model_range(load_mnist(args.data_dir)[0][:6])
        ts = torch.linspace(0, diffusion.timesteps - 1, 10).round().long()
        g = torch.Generator().manual_seed(args.sample_seed)
        noised = [diffusion.q_sample(real, t.repeat(len(real)), torch.randn(real.shape, generator=g)) for t in ts]
        save_figure(figures.strips(torch.stack([real] + noised), ["x0"] + [f"t={t}" for t in ts.tolist()],
                                   "forward process q(x_t | x_0) on real digits"), out("forward.png"))
        written.append("forward.png")
    except UserError as e:
        print(f"skipped forward.png: {e}")
    print(f"sampled {n} images in {seconds:.1f} s; wrote {', '.join(out(w) for w in written)}")
    return 0


# ----------------------------------------------------------------------------------------------
# Evaluation


class Judge:
    """The cached MNIST classifier and the real-data features every quality figure is measured against."""

    def __init__(self, args, device):
        self.device = device
        train_x, train_y = load_mnist(args.data_dir)
        test_x, test_y = load_mnist(args.data_dir, train=False)
        self.train_x, self.test_x = to_model_range(train_x), to_model_range(test_x)
        path = os.path.join(args.ckpt_dir, "classifier.pt")
        fingerprint = evaluate.data_fingerprint(train_x, train_y)
        self.model = evaluate.Classifier().to(device)
        cached = self._cached(path, fingerprint)
        if cached:
            self.model.load_state_dict(cached["model"])
            self.model.eval()
            self.accuracy = cached["test_accuracy"]
        else:
            print(f"training the evaluation classifier on {len(train_x):,} MNIST images (once; cached in {path})")
            self.model = evaluate.train_classifier(self.train_x, train_y, device, log=tqdm.write)
            self.accuracy = evaluate.accuracy(self.model, self.test_x, test_y, device)
            print(f"evaluation classifier: test accuracy {self.accuracy:.2%}")
            make_folder(args.ckpt_dir, "--ckpt-dir")
            save_checkpoint({"format": "mnist-classifier", "version": evaluate.CLASSIFIER_VERSION,
                             "data": fingerprint, "test_accuracy": self.accuracy,
                             "model": self.model.state_dict()}, path)
        self.test_feats, _ = evaluate.embed(self.model, self.test_x, device)
        self.test_stats = evaluate.gaussian_stats(self.test_feats)

    @staticmethod
    def _cached(path, fingerprint):
        """The cached classifier if it exists and was trained by this version on this data, else None."""
        if not os.path.exists(path):
            return None
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            cached = None
        if (isinstance(cached, dict) and cached.get("format") == "mnist-classifier"
                and cached.get("version") == evaluate.CLASSIFIER_VERSION and cached.get("data") == fingerprint):
            return cached
        print(f"{path} was not trained by this version on this data: retraining it")
        return None

    def __call__(self, images, seed=0):
        """(metrics, predicted digits (N,)) for images (N, 1, 28, 28) against the test set; precision and
        recall use N random test images."""
        n = len(images)
        ref = torch.randperm(len(self.test_feats), generator=torch.Generator().manual_seed(seed))[:n]
        feats, probs = evaluate.embed(self.model, images, self.device)
        return evaluate.metrics(feats, probs, self.test_stats, self.test_feats[ref]), probs.argmax(1)

    def floor(self, n, seed=0):
        """The same metrics for n real training images: what a perfect model would score at this n."""
        pick = torch.randperm(len(self.train_x), generator=torch.Generator().manual_seed(seed + 1))[:n]
        return self(self.train_x[pick], seed)[0]


def eval_mode(args):
    if args.digit is not None:
        raise UserError("--digit is for --mode sample; eval of a labelled run already asks for every digit")
    path, ckpt, device, diffusion, denoise, steps, eta = load_for_sampling(args)
    judge = Judge(args, device)
    n = args.n_samples or 1000
    t0 = time.time()
    fake = generate(denoise, diffusion, n, steps, eta, device, args.sample_seed)
    seconds = time.time() - t0
    rows = {"samples": judge(fake, args.sample_seed)[0]}
    result = {"checkpoint": path, "epoch": ckpt["epoch"], "step": ckpt["step"], "sampler": args.sampler,
              "steps": steps, "eta": eta, "n": n, "seed": args.sample_seed, "sampling_seconds": round(seconds, 1),
              "classifier_accuracy": judge.accuracy}
    if args.guidance is not None:
        # A labelled run: also n guided samples, digits 0-9 in turn, and how often each is drawn as asked.
        asked = torch.arange(n) % 10
        guided = generate(denoise, diffusion, n, steps, eta, device, args.sample_seed, labels=asked,
                          guidance=args.guidance, desc="guided")
        rows["guided"], drawn = judge(guided, args.sample_seed)
        per_digit = [(drawn[asked == d] == d).double().mean().item() for d in range(10)]
        result.update(guidance=args.guidance, as_asked=per_digit)
    rows["real"] = judge.floor(n, args.sample_seed)
    print(f"{n} samples in {seconds:.1f} s; classifier test accuracy {judge.accuracy:.2%}; "
          f"'real' is {n} training images, the floor at this N")
    print(evaluate.table(rows))
    if args.guidance is not None:
        print(f"guided (W={args.guidance:g}) samples classified as the digit asked for: "
              + " ".join(f"{d}:{a:.1%}" for d, a in enumerate(per_digit)) + f"; worst {min(per_digit):.1%}")
    result.update(rows)
    make_folder(args.out_dir, "--out-dir")
    out = os.path.join(args.out_dir, "eval.json")
    write_atomic(out, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------


def check_mode_flags(args):
    """Refuse a flag that the chosen mode would ignore (such as --steps, DDIM steps, in train mode);
    then fill in the sampling defaults."""
    wrong = SAMPLING_FLAGS if args.mode == "train" else TRAINING_FLAGS
    given = [k for k in wrong if getattr(args, k) is not None]
    if given:
        flag = "--unconditional" if given[0] == "conditional" else "--" + given[0].replace("_", "-")
        kind = "sampling" if args.mode == "train" else "training"
        raise UserError(f"{flag} is a {kind} flag and does nothing in --mode {args.mode}; drop it")
    args.sampler = args.sampler or "ddim"
    args.sample_seed = args.sample_seed or 0


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        check_mode_flags(args)
        if args.mode == "train":
            return train(args)
        elif args.mode == "sample":
            return sample(args)
        elif args.mode == "eval":
            return eval_mode(args)
        else:
            raise UserError(f"unknown --mode {args.mode!r}; choose train, sample or eval")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; files written so far are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
