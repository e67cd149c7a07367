"""Bad input: one line on stderr, a non-zero exit, no traceback, and nothing the user had is lost."""
import hashlib
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torchvision

import run
from ckpt import FORMAT
from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(*dirs):
    """Every file under dirs with a hash of its content."""
    files = {}
    for d in dirs:
        for folder, _, names in os.walk(d):
            for name in names:
                path = os.path.join(folder, name)
                files[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return files


def fails_cleanly(capsys, workspace, argv, expect):
    before = snapshot(workspace["ckpt_dir"], workspace["out_dir"])
    code = run.main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert expect in err, err
    assert snapshot(workspace["ckpt_dir"], workspace["out_dir"]) == before


def args(workspace, *argv):
    return ["--data-dir", workspace["data_dir"], "--ckpt-dir", workspace["ckpt_dir"],
            "--out-dir", workspace["out_dir"], *argv]


@pytest.mark.parametrize("argv,expect", [
    (["--mode", "paint"], "invalid choice: 'paint'"),
    ([], "--mode"),
    (["--mode", "train", "--epochs", "0"], "--epochs: must be a positive integer"),
    (["--mode", "train", "--epochs", "-3"], "--epochs: must be a positive integer"),
    (["--mode", "train", "--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--mode", "train", "--timesteps", "0"], "--timesteps: must be a positive integer"),
    (["--mode", "train", "--timesteps", "19"], "--timesteps: must be at least 20"),
    (["--mode", "train", "--ema-decay", "1"], "--ema-decay: must be a number between 0 and 1"),
    (["--mode", "train", "--lr", "nan"], "--lr: must be a positive number"),
    (["--mode", "train", "--channels", "8,16"], "--channels: must be three positive integers"),
    (["--mode", "train", "--channels", "8,12,16"], "--channels: must be three multiples of 8"),
    (["--mode", "train", "--arch", "mlp", "--channels", "8,16,32"], "--channels does not apply to --arch mlp"),
    (["--mode", "train", "--width", "64"], "--width does not apply to --arch unet"),
    (["--mode", "train", "--arch", "mlp", "--objective", "v"], "--objective v: the MLP predicting v draws noise"),
    (["--mode", "train", "--arch", "mlp", "--objective", "mean"],
     "--objective mean: the MLP predicting mean draws noise"),
    (["--mode", "train", "--objective", "velocity"], "--objective: invalid choice: 'velocity'"),
    (["--mode", "train", "--steps", "20"], "--steps is a sampling flag and does nothing in --mode train"),
    (["--mode", "sample", "--lr", "1e-3"], "--lr is a training flag and does nothing in --mode sample"),
    (["--mode", "eval", "--unconditional"], "--unconditional is a training flag"),
    (["--mode", "train", "--resume", "--objective", "eps"], "was trained with --objective v, not eps"),
    (["--mode", "train", "--resume", "--timestep-draw", "stratified"],
     "was trained with --timestep-draw independent, not stratified"),
    (["--mode", "sample", "--checkpoint", "no/such/file.pt"], "does not exist"),
    (["--mode", "sample", "--sampler", "ddpm", "--steps", "5"], "--sampler ddpm always runs all"),
    (["--mode", "sample", "--steps", "999"], "exceeds the checkpoint's 20 timesteps"),
    (["--mode", "train", "--checkpoint", "x.pt"], "needs --resume"),
    (["--mode", "sample", "--sampler", "ddim", "--eta", "1.5"], "--eta must be between 0 and 1"),
    (["--mode", "sample", "--eta", "0.5"], "--eta is DDIM's; --sampler heun does not take it"),
    (["--mode", "sample", "--sampler", "ddpm", "--eta", "0"], "--sampler ddpm has eta 1"),
    (["--mode", "sample", "--sampler", "dpm2m", "--eta", "0"], "--eta is DDIM's; --sampler dpm2m does not take it"),
    (["--mode", "sample", "--sampler", "dpm2m", "--churn", "5"], "--churn is for --sampler heun"),
    (["--mode", "sample", "--sampler", "ddpm", "--spacing", "karras"], "--sampler ddpm visits every timestep"),
    (["--mode", "train", "--spacing", "logsnr"], "--spacing is a sampling flag"),
    (["--mode", "sample", "--sampler", "heun", "--churn", "-1"], "--churn must be between 0 and 1000"),
    (["--mode", "sample", "--guidance-interval", "600,100"], "--guidance-interval: must be two timesteps"),
    (["--mode", "sample", "--digit", "3", "--guidance", "0"], "--guidance 0 draws with none"),
    (["--mode", "train", "--churn", "5"], "--churn is a sampling flag"),
    (["--mode", "train", "--guidance-interval", "1,5"], "--guidance-interval is a sampling flag"),
    (["--mode", "train", "--guide-checkpoint", "g.pt"], "--guide-checkpoint is a sampling flag"),
    (["--mode", "sample", "--guide-checkpoint", "g.pt", "--guide-weight", "0.5"], "--guide-weight must be above 1"),
    (["--mode", "sample", "--guide-checkpoint", ""], "checkpoint  does not exist; check the path given to "
                                                     "--guide-checkpoint"),
    (["--mode", "sample", "--digit", "10"], "--digit: invalid choice: 10"),
    (["--mode", "sample", "--guidance", "-1"], "--guidance: must be a number from 0 to 100"),
    (["--mode", "train", "--label-dropout", "1"], "--label-dropout: must be a number from 0 up to"),
    (["--mode", "train", "--unconditional", "--label-dropout", "0.2"], "--label-dropout needs labels"),
    (["--mode", "eval", "--digit", "3"], "--digit is for --mode sample"),
    (["--mode", "train", "--resume", "--unconditional"], "was trained with labels; drop --unconditional"),
    (["--mode", "train", "--minutes", "0"], "--minutes: must be a positive number"),
    (["--mode", "train", "--train-steps", "0"], "--train-steps: must be a positive integer"),
    (["--mode", "sample", "--train-steps", "10"], "--train-steps is a training flag"),
    (["--mode", "train", "--ema-length", "0.3"], "--ema-length: must be a share of the run between 0 and 0.288"),
    (["--mode", "train", "--ema-length", "0.1", "--ema-decay", "0.99"], "choose between two EMAs; give one"),
    (["--mode", "train", "--weighting", "snr"], "--weighting: invalid choice: 'snr'"),
    (["--mode", "train", "--timestep-draw", "sobol"], "--timestep-draw: invalid choice: 'sobol'"),
    (["--mode", "train", "--arch", "mlp", "--attention"], "--attention does not apply to --arch mlp"),
    (["--mode", "train", "--arch", "mlp", "--up-conv", "low"], "--up-conv does not apply to --arch mlp"),
    (["--mode", "train", "--dataset", "heart", "--scale-shift"], "--scale-shift does not apply to --dataset heart"),
    (["--mode", "train", "--arch", "mlp", "--scale-shift"], "--scale-shift does not apply to --arch mlp"),
    (["--mode", "train", "--dataset", "heart", "--up-conv", "low"], "--up-conv does not apply to --dataset heart"),
    (["--mode", "train", "--dataset", "heart", "--label-silu"], "--label-silu does not apply to --dataset heart"),
    (["--mode", "train", "--arch", "mlp", "--label-silu"], "--label-silu does not apply to --arch mlp"),
    (["--mode", "train", "--unconditional", "--label-silu"], "--label-silu needs labels; drop it"),
    (["--mode", "train", "--emb-dim", "60"], "--emb-dim: must be a positive multiple of 8 like 256"),
    (["--mode", "train", "--emb-dim", "0"], "--emb-dim: must be a positive multiple of 8 like 256"),
    (["--mode", "train", "--arch", "mlp", "--emb-dim", "256"], "--emb-dim does not apply to --arch mlp"),
    (["--mode", "train", "--dataset", "heart", "--emb-dim", "256"], "--emb-dim does not apply to --dataset heart"),
    (["--mode", "train", "--resume", "--epochs", "1"], "has already used its budget"),
])
def test_bad_arguments(capsys, workspace, argv, expect):
    fails_cleanly(capsys, workspace, args(workspace, *argv), expect)


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_unavailable_device(capsys, workspace, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for mode in ("train", "sample"):
        fails_cleanly(capsys, workspace, args(workspace, "--mode", mode, "--device", device),
                      f"--device {device}:")


def test_compile_is_refused_on_mps(capsys, workspace, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for mode in ("train", "sample"):
        fails_cleanly(capsys, workspace, args(workspace, "--mode", mode, "--device", "mps", "--compile"),
                      "--compile is not supported on MPS")


class Exploit:
    """Unpickling this runs a shell command: what a checkpoint from a stranger could do to torch.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("content", ["truncated at 1%", "truncated at 50%", "truncated at 99%", "one byte short",
                                     "random bytes", "text", "empty", "foreign state_dict", "code-running pickle",
                                     "code-running torch.save"])
def test_bad_checkpoint_files(capsys, workspace, tmp_path, content):
    path, marker = str(tmp_path / "bad.pt"), tmp_path / "exploited"
    good = open(workspace["checkpoint"], "rb").read()
    if content.startswith("truncated"):
        open(path, "wb").write(good[: len(good) * int(content.split()[-1][:-1]) // 100])
    elif content == "one byte short":
        open(path, "wb").write(good[:-1])
    elif content == "random bytes":
        open(path, "wb").write(os.urandom(len(good)))
    elif content == "text":
        open(path, "w").write("not a checkpoint\n")
    elif content == "empty":
        open(path, "wb").close()
    elif content == "foreign state_dict":  # as another tool would save it
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif content == "code-running pickle":
        open(path, "wb").write(pickle.dumps({"format": FORMAT, "model": Exploit(marker)}))
    else:  # the same inside torch's zip format
        torch.save({"format": FORMAT, "model": Exploit(marker)}, path)
    for mode in ("sample", "eval", "train"):
        extra = ["--resume"] if mode == "train" else []
        fails_cleanly(capsys, workspace, args(workspace, "--mode", mode, "--checkpoint", path, *extra), path)
    assert not marker.exists()  # weights_only=True refused to run the code


def test_resume_with_a_different_configuration(capsys, workspace):
    fails_cleanly(capsys, workspace, args(workspace, "--mode", "train", "--resume", "--timesteps", "30"),
                  "was trained with --timesteps 20, not 30")
    fails_cleanly(capsys, workspace, args(workspace, "--mode", "train", "--resume", "--channels", "8,16,64"),
                  "was trained with --channels 8,16,32, not 8,16,64")
    fails_cleanly(capsys, workspace, args(workspace, "--mode", "train", "--resume", "--adam-beta2", "0.99"),
                  "was trained with --adam-beta2 0.999, not 0.99")
    fails_cleanly(capsys, workspace, args(workspace, "--mode", "train", "--resume", "--up-conv", "high"),
                  "was trained with --up-conv low, not high")
    fails_cleanly(capsys, workspace, args(workspace, "--mode", "train", "--resume", "--scale-shift"),
                  "was trained without --scale-shift; drop --scale-shift to resume")
    fails_cleanly(capsys, workspace, args(workspace, "--mode", "train", "--resume", "--label-silu"),
                  "was trained without --label-silu; drop --label-silu to resume")
    fails_cleanly(capsys, workspace, args(workspace, "--mode", "train", "--resume", "--emb-dim", "64"),
                  "was trained with --emb-dim 32, not 64; drop --emb-dim to resume")  # 4 x its 8 channels
    fails_cleanly(capsys, workspace, args(workspace, "--mode", "train", "--resume", "--attention"),
                  "was trained without --attention; drop --attention to resume")


def test_missing_mnist_without_network(capsys, workspace, tmp_path, monkeypatch):
    # Point torchvision's mirrors at a closed local port: the download fails at once, network or not.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    empty = str(tmp_path / "no-mnist")
    argv = ["--data-dir", empty, "--ckpt-dir", workspace["ckpt_dir"], "--mode", "train", *TINY]
    fails_cleanly(capsys, workspace, argv, os.path.join(empty, "MNIST", "raw"))
    assert sorted(os.listdir(workspace["ckpt_dir"])) == [".lock", "run_001"]  # no empty run folder left


def test_the_real_command_line_shows_no_traceback(tmp_path):
    for argv in (["--mode", "bogus"], ["--mode", "sample", "--checkpoint", str(tmp_path / "none.pt")]):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *argv], capture_output=True,
                           text=True, cwd=tmp_path)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
