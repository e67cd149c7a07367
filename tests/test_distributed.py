"""torchrun with DDP on this CPU (Gloo): two processes train what one process trains, resume across world sizes,
and stop together (a killed process, Ctrl-C). Tiny model, synthetic data; the processes are real torchrun ones."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import distributed
import run
from ckpt import checkpoint_path, latest_checkpoint, load_checkpoint
from conftest import TINY
from distributed import World
from errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What torchrun runs in each process: run.main, after arranging for process RANK_TO_KILL to SIGKILL itself at
# its KILL_AT-th training step, for every step to take STEP_DELAY seconds more, or for rank 0's FULL_DISK_AT-th
# checkpoint write to find the disk full; it prints its exit status.
CHILD = r"""
import errno, os, signal, sys, time
sys.path.insert(0, os.environ["ROOT"])
import torch
import distributed
import run
import train as training

real_save, saves = torch.save, [0]

def save(obj, f):
    saves[0] += 1
    if os.environ["RANK"] == "0" and saves[0] == int(os.environ.get("FULL_DISK_AT", "0")):
        raise OSError(errno.ENOSPC, "No space left on device")
    real_save(obj, f)

torch.save = save

real_step, steps = training.train_step, [0]

def step(*args):
    steps[0] += 1
    if os.environ["RANK"] == os.environ.get("RANK_TO_KILL") and steps[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get("STEP_DELAY", "0")))
    return real_step(*args)

training.train_step = step
code = run.main(sys.argv[1:])
sys.stderr.write(f"rank {os.environ['RANK']} exit {code}\n")  # one write: the two processes share the pipe
distributed.end_process(code)  # as run.py ends
"""


def torchrun(tmp_path, argv, wait=True, **env):
    """torchrun --standalone with 2 processes on CHILD; the finished process, or the running one."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, ROOT=ROOT, PYTHONUNBUFFERED="1", **env))
    if wait:
        proc.output = proc.communicate(timeout=240)[0]
    return proc


def train_argv(data_dir, ckpt_dir, *more):
    return ["--mode", "train", "--data-dir", data_dir, "--ckpt-dir", ckpt_dir, *TINY, *more]


def assert_same_run(a, b):
    """Two checkpoints hold the same training, to fp32 rounding (DDP sums the gradients in another order)."""
    assert a["step"] == b["step"] and a["ema_updates"] == b["ema_updates"]
    for key in ("model", "ema"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])  # every process drew what one process draws
    assert [s for s, _ in a["history"]] == [s for s, _ in b["history"]]


def test_two_processes_draw_stratified_timesteps_as_one_process_does(tmp_path, mnist_root):
    # The stratified draw spreads one batch's t over the weighting's distribution: each process must take its part
    # of the whole batch's draw, not stratify its own half (which would train something else).
    one, two = (str(tmp_path / name) for name in ("one", "two"))
    more = ("--train-steps", "3", "--timestep-draw", "stratified")
    assert run.main(train_argv(mnist_root, one, *more)) == 0
    proc = torchrun(tmp_path, train_argv(mnist_root, two, *more))
    assert proc.returncode == 0, proc.output
    single, ddp = (load_checkpoint(latest_checkpoint(d)) for d in (one, two))
    assert ddp["diffusion_config"]["timestep_draw"] == "stratified"
    assert_same_run(single, ddp)


@pytest.mark.parametrize("world, skips_teardown", [("1", False), ("2", True)])
def test_a_torchrun_process_ends_without_the_interpreters_teardown(monkeypatch, world, skips_teardown):
    ended = []
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(os, "_exit", lambda code: ended.append(("os._exit", code)))
    monkeypatch.setattr(sys, "exit", lambda code: ended.append(("sys.exit", code)))
    distributed.end_process(3)
    assert ended == [("os._exit" if skips_teardown else "sys.exit", 3)]


def test_two_processes_train_what_one_process_trains(tmp_path, mnist_root):
    # 64 images in batches of 16: 4 steps an epoch; 6 steps end inside the second epoch.
    one, two, mixed = (str(tmp_path / name) for name in ("one", "two", "mixed"))
    assert run.main(train_argv(mnist_root, one, "--train-steps", "6")) == 0
    proc = torchrun(tmp_path, train_argv(mnist_root, two, "--train-steps", "6"))
    assert proc.returncode == 0, proc.output
    assert "2 processes (DDP, 8 of each batch apiece)" in proc.output
    assert proc.output.count("saved ") == 2 and proc.output.count("done: ") == 1  # rank 0 alone speaks
    single, ddp = (load_checkpoint(latest_checkpoint(d)) for d in (one, two))
    assert_same_run(single, ddp)
    assert set(single) == set(ddp) and set(single["model"]) == set(ddp["model"])  # the plain model, no "module."
    assert abs(single["history"][-1][1] - ddp["history"][-1][1]) < 1e-5  # the logged loss is the global batch's

    # Resume with another world size: the single run's first-epoch checkpoint, continued by two processes.
    run_dir = os.path.join(mixed, "run_001")
    os.makedirs(run_dir)
    shutil.copy(checkpoint_path(os.path.join(one, "run_001"), 4), run_dir)
    proc = torchrun(tmp_path, train_argv(mnist_root, mixed, "--resume"))
    assert proc.returncode == 0, proc.output
    assert_same_run(single, load_checkpoint(checkpoint_path(run_dir, 6)))

    # Resume with the same world size: the two-process run's first-epoch checkpoint, continued by two
    # processes, lands bit for bit on the two-process run.
    again = os.path.join(str(tmp_path / "again"), "run_001")
    os.makedirs(again)
    shutil.copy(checkpoint_path(os.path.join(two, "run_001"), 4), again)
    proc = torchrun(tmp_path, train_argv(mnist_root, os.path.dirname(again), "--resume"))
    assert proc.returncode == 0, proc.output
    resumed = load_checkpoint(checkpoint_path(again, 6))
    for key in ("model", "ema"):
        assert all(torch.equal(resumed[key][k], v) for k, v in ddp[key].items()), key


def test_a_killed_process_stops_the_other_and_keeps_the_last_checkpoint(tmp_path, mnist_root):
    ckpt_dir = str(tmp_path / "ckpt")
    t0 = time.time()
    proc = torchrun(tmp_path, train_argv(mnist_root, ckpt_dir, "--epochs", "3"), RANK_TO_KILL="1", KILL_AT="6")
    assert proc.returncode != 0, proc.output
    assert time.time() - t0 < 200  # ended, not hung on the dead peer
    assert "rank 0 exit 0" not in proc.output and "rank 1 exit" not in proc.output  # rank 1 died with SIGKILL
    run_dir = os.path.join(ckpt_dir, "run_001")
    assert sorted(os.listdir(run_dir)) == ["ckpt_00000004.pt", "log.jsonl", "loss.png"]  # nothing partial
    assert load_checkpoint(latest_checkpoint(ckpt_dir))["step"] == 4


def test_a_failed_write_stops_every_process_with_one_message(tmp_path, mnist_root):
    ckpt_dir = str(tmp_path / "ckpt")
    proc = torchrun(tmp_path, train_argv(mnist_root, ckpt_dir, "--epochs", "3"), FULL_DISK_AT="2")
    assert "rank 0 exit 2" in proc.output and "rank 1 exit 2" in proc.output, proc.output
    errors = [line for line in proc.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "could not write" in errors[0] and "No space left" in errors[0], proc.output
    run_dir = os.path.join(ckpt_dir, "run_001")
    assert sorted(os.listdir(run_dir)) == ["ckpt_00000004.pt", "log.jsonl", "loss.png"]  # no temporary file
    assert load_checkpoint(latest_checkpoint(ckpt_dir))["step"] == 4


def test_ctrl_c_under_torchrun_saves_once_and_exits_130(tmp_path, mnist_root):
    ckpt_dir = str(tmp_path / "ckpt")
    proc = torchrun(tmp_path, train_argv(mnist_root, ckpt_dir, "--epochs", "50"), wait=False, STEP_DELAY="0.2")
    deadline = time.time() + 120
    while not glob.glob(os.path.join(ckpt_dir, "run_001", "ckpt_*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does: torchrun gets it, and passes it on to each process
    output = proc.communicate(timeout=120)[0]
    assert "rank 0 exit 130" in output and "rank 1 exit 130" in output, output
    assert output.count("stopped at epoch") == 1, output
    ckpt = load_checkpoint(latest_checkpoint(ckpt_dir))
    assert f"(step {ckpt['step']})" in output  # the checkpoint of the step where both stopped
    assert ckpt["step"] % 4 or ckpt["batch"] == 0  # saved at the stop: mid-epoch, or an epoch just closed


def test_the_global_batch_must_divide_among_the_processes():
    World(rank=1, size=4).check_batch(64)
    with pytest.raises(UserError, match="multiple of 3, such as 63"):
        World(rank=0, size=3).check_batch(64)


def test_shares_of_a_batch_are_disjoint_and_cover_it():
    parts = [World(rank=r, size=4).share(16) for r in range(4)]
    assert sum((list(range(16))[p] for p in parts), []) == list(range(16))
    assert World().share(16) == slice(0, 16) and World().largest(0.5, True) == (0.5, True)


class Beside(World):
    """Rank 0 of two, with the other process's values given: largest() as the all-reduce would return it."""

    def __init__(self, *other):
        super().__init__(rank=0, size=2)
        self.other = other

    def largest(self, *values):
        return tuple(max(a, b) for a, b in zip(values, self.other))


def test_the_processes_stop_together_when_one_disagrees_or_fails():
    Beside(-7.0, 7.0).same(7, "resume from checkpoints whose steps")  # the other resumed step 7 too
    with pytest.raises(UserError, match=r"differ \(4 against 7\)") as error:
        Beside(-4.0, 4.0).same(7, "resume from checkpoints whose steps")
    assert error.value.everywhere
    Beside(0.0).all_ok(True, "writing")  # the other wrote too
    with pytest.raises(UserError, match="writing failed in another process"):
        Beside(1.0).all_ok(True, "writing")
    Beside(1.0).all_ok(False, "writing")  # the one that failed raises its own error, not this one


def test_sample_and_eval_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run.main(["--mode", "sample"]) == 2
    assert capsys.readouterr().err == ""  # the same error in every process: rank 0 alone prints it
    monkeypatch.setenv("RANK", "0")
    assert run.main(["--mode", "eval"]) == 2
    assert "runs in one process; start it with python run.py" in capsys.readouterr().err
