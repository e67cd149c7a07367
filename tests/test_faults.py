"""Fault injection: SIGKILL at random and chosen moments, Ctrl-C twice, divergence, a full disk, two trainings
at once. Tiny model, synthetic data; the killed trainings are real processes."""
import errno
import glob
import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import run
import train as training
from ckpt import latest_checkpoint, load_checkpoint
from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs run.main(argv) in a child process after arranging for it to SIGKILL itself at the nth time it reaches
# a chosen point: a training step, the middle of writing a checkpoint's bytes, the fsync of a temporary file,
# the rename of a finished temporary file, or just after that rename. Or, with point "slowsave", makes any
# checkpoint write that follows a Ctrl-C stall, announcing "SAVING", so a test can press Ctrl-C again in it.
CHILD = r"""
import io, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import run
import train as training

point, nth, argv = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
seen = [0]

def reached():
    seen[0] += 1
    if seen[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

real_save, real_fsync, real_replace, real_step = torch.save, os.fsync, os.replace, training.train_step
if point == "step":
    training.train_step = lambda *a: (reached(), real_step(*a))[1]
elif point == "write":
    def save(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        reached()
        f.write(data[len(data) // 2:])
    torch.save = save
elif point == "fsync":
    os.fsync = lambda fd: (reached(), real_fsync(fd))[1]
elif point == "rename":
    os.replace = lambda a, b: (reached(), real_replace(a, b))[1]
elif point == "renamed":
    os.replace = lambda a, b: (real_replace(a, b), reached())[0]
elif point == "slowsave":
    interrupted, real_call = [], training.StopFlag.__call__
    def call(self, signum, frame):
        interrupted.append(signum)
        return real_call(self, signum, frame)
    training.StopFlag.__call__ = call
    def save(obj, f):
        if interrupted:
            print("SAVING", flush=True)
            time.sleep(60)
        real_save(obj, f)
    torch.save = save
sys.exit(run.main(argv))
"""


def child(point, nth, argv, **kw):
    return subprocess.Popen([sys.executable, "-c", CHILD, ROOT, point, str(nth), *argv], cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), **kw)


def train_argv(mnist_root, ckpt_dir, *extra):
    return ["--mode", "train", "--data-dir", mnist_root, "--ckpt-dir", ckpt_dir, *TINY, *extra]


def leftovers(ckpt_dir):
    """Every file under ckpt_dir other than checkpoints, logs, loss curves and the lock."""
    keep = ("ckpt_", "log.jsonl", "loss.png", ".lock")
    return [os.path.join(d, f) for d, _, files in os.walk(ckpt_dir) for f in files
            if not (f.startswith(keep) and ".tmp" not in f)]


# 4 steps per epoch, and every epoch writes a checkpoint, log.jsonl and loss.png: three fsyncs and renames.
KILLS = [("step", n) for n in (1, 3, 6, 11, 15)] + [("write", n) for n in (1, 2, 4)] + \
        [("fsync", n) for n in (1, 2, 3, 8)] + [("rename", n) for n in (1, 3, 7, 12)] + \
        [("renamed", n) for n in (1, 4, 9)] + [("random", seed) for seed in range(6)]


@pytest.mark.parametrize("point,nth", KILLS, ids=[f"{p}-{n}" for p, n in KILLS])
def test_sigkill_leaves_a_loadable_checkpoint_and_resume_finishes(tmp_path, mnist_root, point, nth):
    ckpt_dir = str(tmp_path / "ckpt")
    argv = train_argv(mnist_root, ckpt_dir, "--epochs", "4")
    if point == "random":  # from outside, at a random moment of the training
        p = child("none", 0, argv)
        deadline = time.time() + 60
        while not glob.glob(os.path.join(ckpt_dir, "run_*")) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(random.Random(nth).uniform(0, 1.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert p.returncode in (-signal.SIGKILL, 0)
    else:
        p = child(point, nth, argv)
        assert p.wait(timeout=120) == -signal.SIGKILL  # it died where it was meant to

    checkpoints = sorted(glob.glob(os.path.join(ckpt_dir, "run_*", "ckpt_*.pt")))
    # Killed: only the killed process's own hidden temporary files may be left, never a partial checkpoint.
    assert all(os.path.basename(f).startswith(".") and ".tmp" in f for f in leftovers(ckpt_dir))
    if checkpoints:
        newest = load_checkpoint(latest_checkpoint(ckpt_dir))  # loadable, and the newest step
        assert newest["step"] == max(int(os.path.basename(c)[5:-3]) for c in checkpoints)
        assert all(torch.isfinite(v).all() for v in newest["model"].values())
        # Killed after the final checkpoint was in place, the run is complete and --resume says so.
        assert run.main(train_argv(mnist_root, ckpt_dir, "--resume")) == (2 if newest["step"] == 16 else 0)
    else:  # killed before the first checkpoint: nothing to resume, a new run starts over
        assert run.main(train_argv(mnist_root, ckpt_dir, "--epochs", "4")) == 0
    final = load_checkpoint(latest_checkpoint(ckpt_dir))
    assert final["step"] == 16 and final["epoch"] == 4
    assert leftovers(ckpt_dir) == []  # the next training cleaned up after the killed one
    assert len(glob.glob(os.path.join(ckpt_dir, "run_*"))) == 1


def test_second_ctrl_c_during_the_save_aborts_at_once_and_keeps_the_previous_checkpoint(tmp_path, mnist_root):
    ckpt_dir = str(tmp_path / "ckpt")
    p = child("slowsave", 0, train_argv(mnist_root, ckpt_dir, "--epochs", "100000"), stdout=subprocess.PIPE,
              stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 60
    while not glob.glob(os.path.join(ckpt_dir, "run_*", "ckpt_*.pt")) and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)  # first Ctrl-C: stop after this step and save
    for line in p.stdout:
        if line.startswith("SAVING"):
            break
    previous = latest_checkpoint(ckpt_dir)
    digest = hashlib.sha256(open(previous, "rb").read()).hexdigest()
    t0 = time.time()
    p.send_signal(signal.SIGINT)  # second Ctrl-C, in the middle of that save
    assert p.wait(timeout=30) == 130 and time.time() - t0 < 10  # at once: not after the 60 s stall
    assert latest_checkpoint(ckpt_dir) == previous
    assert hashlib.sha256(open(previous, "rb").read()).hexdigest() == digest
    load_checkpoint(previous)
    assert leftovers(ckpt_dir) == []  # the aborted write removed its temporary file


def test_a_second_training_into_the_same_folder_is_refused(tmp_path, mnist_root, capsys):
    ckpt_dir = str(tmp_path / "ckpt")
    p = child("none", 0, train_argv(mnist_root, ckpt_dir, "--epochs", "100000"), stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not glob.glob(os.path.join(ckpt_dir, "run_*", "ckpt_*.pt")) and time.time() < deadline:
            time.sleep(0.01)
        for extra in ([], ["--resume"]):
            assert run.main(train_argv(mnist_root, ckpt_dir, "--epochs", "1", *extra)) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1] == f"error: another training (pid {p.pid}) is writing into {ckpt_dir}; wait for it " \
                              f"to finish or pass another --ckpt-dir"
    finally:
        p.send_signal(signal.SIGKILL)  # the lock dies with its holder, however it ends
        p.wait()
    epoch = load_checkpoint(latest_checkpoint(ckpt_dir))["epoch"]
    assert run.main(train_argv(mnist_root, ckpt_dir, "--resume", "--epochs", str(epoch + 1))) == 0


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(workspace, monkeypatch, capsys):
    real_step, steps = training.train_step, []

    def diverging_step(diffusion, model, ema, opt, *rest):
        loss = real_step(diffusion, model, ema, opt, *rest)
        steps.append(1)
        if len(steps) >= 2:  # the run's 6th step (the checkpoint has 4): the weights blow up
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(training, "train_step", diverging_step)
    before = latest_checkpoint(workspace["ckpt_dir"])
    assert run.main(train_argv(workspace["data_dir"], workspace["ckpt_dir"], "--resume", "--epochs", "3")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: the loss became non-finite at step 6; stopped without saving")
    assert latest_checkpoint(workspace["ckpt_dir"]) == before
    assert all(torch.isfinite(v).all() for v in load_checkpoint(before)["model"].values())


def test_non_finite_weights_are_never_saved(workspace, monkeypatch, capsys):
    real_step, calls = training.train_step, []

    def corrupting_step(diffusion, model, ema, opt, *rest):  # step 8, the epoch's last: a finite loss, but
        loss = real_step(diffusion, model, ema, opt, *rest)  # then a weight goes bad before the save
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(training, "train_step", corrupting_step)
    before = latest_checkpoint(workspace["ckpt_dir"])
    assert run.main(train_argv(workspace["data_dir"], workspace["ckpt_dir"], "--resume", "--epochs", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: weights became non-finite") and "at step 8; not saved" in err
    assert latest_checkpoint(workspace["ckpt_dir"]) == before


def test_keep_prunes_to_the_newest_epochs_plus_the_last(tmp_path, mnist_root, monkeypatch):
    ckpt_dir = str(tmp_path / "ckpt")
    steps = lambda: sorted(int(os.path.basename(c)[5:-3]) for c in  # noqa: E731
                           glob.glob(os.path.join(ckpt_dir, "run_*", "ckpt_*.pt")))
    assert run.main(train_argv(mnist_root, ckpt_dir, "--epochs", "5", "--keep", "2")) == 0
    assert steps() == [16, 20]
    real_step, count = training.train_step, []

    def interrupting_step(*a):  # Ctrl-C at the run's step 26, mid-epoch
        count.append(1)
        if len(count) == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*a)

    monkeypatch.setattr(training, "train_step", interrupting_step)
    assert run.main(train_argv(mnist_root, ckpt_dir, "--resume", "--epochs", "8", "--keep", "2")) == 130
    assert steps() == [20, 24, 26]  # two end-of-epoch checkpoints and the final, mid-epoch one


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(workspace, monkeypatch, capsys):
    real_save = torch.save

    def full_disk(obj, f):  # half the bytes go out, then the disk is full
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = latest_checkpoint(workspace["ckpt_dir"])
    digest = hashlib.sha256(open(before, "rb").read()).hexdigest()
    monkeypatch.setattr(torch, "save", full_disk)
    assert run.main(train_argv(workspace["data_dir"], workspace["ckpt_dir"], "--resume", "--epochs", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: could not write ") and "ckpt_00000008.pt (No space left on device)" in err
    assert latest_checkpoint(workspace["ckpt_dir"]) == before
    assert hashlib.sha256(open(before, "rb").read()).hexdigest() == digest
    assert leftovers(workspace["ckpt_dir"]) == []
