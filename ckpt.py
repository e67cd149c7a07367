"""The checkpoint store: atomic writes, run folders, the training lock, pruning, save and load, and
reconciling a checkpoint's settings with the ones asked for on resume.

Every file goes through a hidden temporary file, an fsync and an atomic rename, so a process killed at
any moment leaves either the previous file or the new one, never a partial one.
"""
import contextlib
import glob
import os
import re

import torch

import figures
from errors import UserError

FORMAT = "mnist-ddpm/1"  # written into every checkpoint, checked on load
# Settings added after the first checkpoints, with what those earlier runs trained with.
ADDED_SETTINGS = dict(conditional=False, label_dropout=0.0, schedule="constant", arch="unet", objective="eps",
                      loss="mse", ema_length=None, weighting="uniform", attention=False, dataset="mnist",
                      adam_beta2=0.999, up_conv="high", scale_shift=False, label_silu=False,
                      emb_dim=0, timestep_draw="independent")
# What an MLP run on MNIST predicts: x0, the one objective it learns. After the same 74,558 steps (seed 0), x0 drew
# FID 63, and predicting v (the U-Net's default) the 512 x 3 MLP drew noise, FID 2,700, the posterior mean 24,000
# and eps 25,700, each without the guide (docs/variants.md); likely because the noise is 784 numbers, one a pixel,
# that its 512-wide layers cannot pass through, and eps, the mean's eq. 11 output and v near t = 0 are mostly the
# noise, where x0 is a digit.
MLP_OBJECTIVE = "x0"
# What a new run with --loss l1 predicts unless told: x0. After 4,159 steps L1 on v (the default objective) drew
# FID 92 and 66 (training seeds 0 and 1), L1 on x0 26 and 25 (docs/variants.md, "The L1 loss on v").
L1_OBJECTIVE = "x0"
# The settings that shape the U-Net, and so do not apply to the MLPs.
UNET_SETTINGS = ("channels", "blocks", "attention", "up_conv", "scale_shift", "label_silu", "emb_dim")


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


def save_figure(fig, path):
    """A matplotlib figure as a PNG, written atomically, then closed."""
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    figures.plt.close(fig)


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


def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, f"ckpt_{step:08d}.pt")


def run_checkpoints(run_dir):
    """{step: path} of run_dir's checkpoints (ckpt_<step>.pt), in step order."""
    named = ((re.fullmatch(r"ckpt_([0-9]+)\.pt", os.path.basename(p)), p)
             for p in glob.glob(os.path.join(run_dir, "ckpt_*.pt")))
    return dict(sorted((int(m.group(1)), p) for m, p in named if m))


def prune_checkpoints(run_dir, keep, steps_per_epoch):
    """Keep the newest `keep` end-of-epoch checkpoints of run_dir and its newest checkpoint; delete the rest."""
    paths = run_checkpoints(run_dir)
    steps = list(paths)
    kept = set([s for s in steps if s % steps_per_epoch == 0][-keep:] + steps[-1:])
    for s, path in paths.items():
        if s not in kept:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def latest_checkpoint(ckpt_dir):
    """The newest checkpoint of any run under ckpt_dir."""
    paths = glob.glob(os.path.join(ckpt_dir, "run_*", "ckpt_*.pt"))
    if not paths:
        raise UserError(f"no checkpoint under {ckpt_dir}/run_*/; train first (python run.py --mode train) "
                        f"or pass --checkpoint PATH")
    return max(paths, key=os.path.getmtime)


def save_checkpoint(state, path):
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path, flag="--checkpoint"):
    """The checkpoint dict at path, with tensors on the CPU; a clear error, naming the flag that gave the
    path, for anything else. weights_only=True: a file from a stranger can hold tensors and plain types,
    never code to run."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; check the path" + (
            " or omit --checkpoint for the newest" if flag == "--checkpoint" else f" given to {flag}"))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be truncated "
                        f"or not from run.py; pick another with {flag}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by run.py; pick another with {flag}")
    if "diffusion_config" in ckpt:  # a mean network's skip: none before there was one, True/False for a while
        skip = ckpt["diffusion_config"].get("mean_skip", False)
        ckpt["diffusion_config"]["mean_skip"] = {True: "xt", False: "none"}.get(skip, skip)
    return ckpt


def fmt(v):
    """A setting as written on the command line: tuples as 1,2,3."""
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def reconcile(given, defaults, ckpt=None, path=None):
    """A run's settings: those given (None means not given), else the checkpoint's on resume, else the
    defaults. On resume a given setting must agree with the checkpoint's."""
    cfg = {**defaults, **ADDED_SETTINGS, **ckpt["train_config"]} if ckpt else dict(defaults)
    if given.get("emb_dim") and given["emb_dim"] == 4 * (given.get("channels") or cfg["channels"])[0]:
        given = dict(given, emb_dim=0)  # the default width, given by number: the same network
    for key, value in given.items():
        if value is None:
            continue
        if ckpt and value != cfg[key]:
            if key == "conditional":  # the one switch that turns something off: --unconditional
                flag, was = "--unconditional", "with labels"
            elif isinstance(value, bool):  # --attention, --scale-shift, --label-silu
                flag = "--" + key.replace("_", "-")
                was = f"{'with' if cfg[key] else 'without'} {flag}"
            else:
                flag = "--" + key.replace("_", "-")
                shown = lambda v: fmt(v or 4 * cfg["channels"][0] if key == "emb_dim" else v)  # emb_dim 0: 4 x c0
                was = f"with {flag} {shown(cfg[key])}, not {shown(value)}"
            raise UserError(f"--resume: {path} was trained {was}; drop {flag} to resume, "
                            f"or train a new run without --resume", everywhere=True)
        cfg[key] = value
    if not cfg["conditional"] and given.get("label_dropout") is not None:
        raise UserError("--label-dropout needs labels; drop it or drop --unconditional")
    if not cfg["conditional"] and given.get("label_silu"):
        raise UserError("--label-silu needs labels; drop it or drop --unconditional")
    if not ckpt and cfg["arch"] == "mlp":
        if given.get("objective") not in (None, MLP_OBJECTIVE):
            raise UserError(f"--objective {cfg['objective']}: the MLP predicting {cfg['objective']} draws noise "
                            f"(docs/variants.md); drop it (the MLP predicts x0) or train the U-Net", everywhere=True)
        cfg["objective"] = MLP_OBJECTIVE
    if not ckpt and cfg["loss"] == "l1" and given.get("objective") is None:
        cfg["objective"] = L1_OBJECTIVE
    if not ckpt and cfg["objective"] == "mean" and given.get("weighting") is None:
        cfg["weighting"] = "vlb"  # the posterior mean trains only under the bound's weighting (DDPM Table 2)
    if given.get("ema_length") is not None and given.get("ema_decay") is not None:
        raise UserError("--ema-length and --ema-decay choose between two EMAs; give one of them")
    if given.get("ema_decay") is not None and cfg["ema_length"] is not None:  # --ema-decay: the classic EMA
        if ckpt:
            raise UserError(f"--resume: {path} was trained with --ema-length {cfg['ema_length']:g}; drop "
                            f"--ema-decay to resume, or train a new run without --resume")
        cfg["ema_length"] = None
    arch = "points" if cfg["dataset"] == "heart" else cfg["arch"]  # a new heart run gets its arch after this
    other = ("width", "depth") if arch == "unet" else UNET_SETTINGS
    for key in other:
        if given.get(key) is not None:
            *rest, last = ["--" + k.replace("_", "-") for k in UNET_SETTINGS]
            what = "--dataset heart (its point MLP takes --width and --depth)" if arch == "points" else (
                f"--arch {arch} ({', '.join(rest)} and {last} shape the U-Net, --width and --depth the MLP)")
            raise UserError(f"--{key.replace('_', '-')} does not apply to {what}; drop it", everywhere=True)
    return cfg
