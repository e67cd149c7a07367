"""The benchmark runs end to end and reports every figure (tiny batches: a smoke test, not a timing)."""
import json
import os
import subprocess

import pytest
import torch

import bench
import distributed
import hardware
from ckpt import load_checkpoint
from diffusion import Diffusion
from errors import UserError
from model import build_network, count_parameters
from train import DEFAULTS, NO_LABEL, diffusion_for


def test_bench_reports_every_figure(tmp_path):
    out = str(tmp_path / "bench.json")
    assert bench.main(["--device", "cpu", "--batch-size", "4", "--sample-batch", "4", "--steps", "1",
                       "--repeats", "1", "--out", out]) == 0
    result = json.load(open(out))
    assert 2_000_000 <= result["parameters"] <= 2_600_000
    assert 0 < result["gflop_per_image_forward"] < result["gflop_per_image_train"]
    # auto times bf16 only on a CPU where it is native: emulated bf16 would take many minutes on such a CPU
    timed = ["fp32", "bf16"] if hardware.bf16_is_faster(torch.device("cpu")) else ["fp32"]
    assert [p for p in ("fp32", "bf16") if p in result] == timed
    for precision in timed:
        row = result[precision]
        assert row["matmul_gflops"] > 0 and row["train_images_per_s"] > 0 and row["sample_image_steps_per_s"] > 0
        # Counted FLOPs at the measured rate cannot much exceed the device's own matmul rate.
        assert 0 < row["train_fraction_of_matmul"] < 1.5 and 0 < row["sample_fraction_of_matmul"] < 1.5


def test_precisions_to_time():
    cpu = torch.device("cpu")
    assert bench.pick_precisions("fp32,bf16", cpu) == ["fp32", "bf16"]
    assert bench.pick_precisions("auto", torch.device("cuda")) == ["fp32"]  # what run.py's auto uses there
    with pytest.raises(UserError, match="--precision must be auto or a list of fp32, bf16"):
        bench.pick_precisions("fp16", cpu)


def test_bench_times_training_in_several_processes(tmp_path):
    out = str(tmp_path / "bench.json")
    assert bench.main(["--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--sample-batch", "4",
                       "--steps", "1", "--repeats", "1", "--processes", "1,2", "--out", out]) == 0
    rates = json.load(open(out))["processes"]
    assert set(rates) == {"1", "2"} and min(rates.values()) > 0
    assert bench.main(["--processes", "1,x", "--out", out]) == 2


def test_bench_times_the_compiled_network_when_asked(tmp_path, monkeypatch, capsys):
    """--compile: the timed training steps and sampling steps each call a network compiled for that phase
    (compiling itself takes minutes on 2 cores: a counting stand-in here); refused where it cannot run or
    is not timed."""
    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.cfg, self.calls = model, model.cfg, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.model(*args, **kwargs)

    made = []

    def compile_counting(model, on):
        if on:
            made.append(Compiled(model))
        return made[-1] if on else model

    monkeypatch.setattr(bench, "maybe_compile", compile_counting)
    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(len(made)))
    out = str(tmp_path / "bench.json")
    assert bench.main(["--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--sample-batch", "4",
                       "--steps", "1", "--repeats", "1", "--compile", "--out", out]) == 0
    assert len(made) == 2 and all(m.calls > 0 for m in made)  # the training phase's, then the sampling phase's
    assert resets == [0, 1]  # each compiled from a clean slate
    assert json.load(open(out))["compile"] is True
    assert bench.main(["--device", "cpu", "--compile", "--processes", "1,2", "--out", out]) == 2
    assert "--compile times one process" in capsys.readouterr().err
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert bench.main(["--device", "mps", "--compile", "--out", out]) == 2
    assert "--compile is not supported on MPS" in capsys.readouterr().err


def test_bench_times_the_shape_asked_for(tmp_path, capsys, monkeypatch):
    """--channels, --blocks and --attention time the network run.py would train with them, in this process and
    in the torchrun workers --processes starts; a shape run.py would refuse is refused with exit 2."""
    out = str(tmp_path / "bench.json")
    shape = ["--channels", "8,16,32", "--blocks", "1,1,1", "--attention"]
    assert bench.main(["--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--sample-batch", "4",
                       "--steps", "1", "--repeats", "1", "--out", out, *shape]) == 0
    result = json.load(open(out))
    config = result["model_config"]
    assert (config["channels"], config["blocks"], config["attention"]) == ([8, 16, 32], [1, 1, 1], True)
    assert result["parameters"] == count_parameters(build_network(config)) < 200_000
    assert "UNet (--channels 8,16,32 --blocks 1,1,1 --attention)" in capsys.readouterr().out

    # The torchrun workers are started with flags that give them the same network (a stand-in for torchrun
    # records the command and writes the rate a worker would).
    started = []

    def torchrun(cmd, **kwargs):
        started.append(cmd)
        with open(cmd[cmd.index("--out") + 1], "w") as f:
            json.dump({"train_images_per_s": 1.0}, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", torchrun)
    args = bench.build_parser().parse_args(["--processes", "2", *shape])
    assert bench.process_rates([2], args, "fp32") == {2: 1.0}
    worker_args = bench.build_parser().parse_args(started[0][started[0].index(os.path.abspath(bench.__file__)) + 1:])
    default = bench.network_config(bench.build_parser().parse_args([]))
    assert bench.network_config(worker_args) == bench.network_config(args) != default
    with pytest.raises(SystemExit) as refused:
        bench.main(["--channels", "10,16,32", "--out", out])
    assert refused.value.code == 2 and "multiples of 8" in capsys.readouterr().err


def test_bench_times_the_network_run_py_trains_with_labels(tmp_path, trained, monkeypatch):
    """The network timed is the one run.py's training built for the same shape (the conftest run's checkpoint),
    trained on labels of which some are dropped to "no label" as run.py drops them, and sampled asking for
    digits."""
    trained_config = load_checkpoint(trained["checkpoint"])["model_config"]
    shape = ["--channels", "8,16,32", "--blocks", "1,1,1"]
    assert bench.network_config(bench.build_parser().parse_args(shape)) == trained_config

    seen = {"train": [], "sample": []}
    real_step, real_denoiser = bench.train_step, bench.denoiser

    def recording_step(diffusion, model, ema, opt, x0, y, *rest):
        seen["train"].append(y)
        seen["diffusion"] = diffusion.config()
        return real_step(diffusion, model, ema, opt, x0, y, *rest)

    def recording_denoiser(*args, **kwargs):
        denoise = real_denoiser(*args, **kwargs)

        def recorded(x, t, y=None, w=1.0):
            seen["sample"].append(y)
            return denoise(x, t, y, w)
        return recorded

    monkeypatch.setattr(bench, "train_step", recording_step)
    monkeypatch.setattr(bench, "denoiser", recording_denoiser)
    rates = []

    def dropping_half(y, p, no_label):
        rates.append(p)
        return torch.where(torch.arange(len(y)) % 2 == 0, no_label, y)

    monkeypatch.setattr(bench, "drop_labels", dropping_half)
    out = str(tmp_path / "bench.json")
    assert bench.main(["--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--sample-batch", "4",
                       "--steps", "2", "--repeats", "1", "--out", out, *shape]) == 0
    assert json.load(open(out))["model_config"] == json.loads(json.dumps(trained_config))  # tuples as lists
    assert seen["train"] and seen["sample"]
    assert seen["diffusion"] == diffusion_for(DEFAULTS).config()  # the default's objective and weighting
    assert diffusion_for(DEFAULTS).config() != Diffusion().config()  # (which are not Diffusion's own defaults)
    for y in seen["train"]:  # every step's labels went through the dropping, half of them "no label" here
        assert y is not None and (y[0::2] == NO_LABEL).all() and (y[1::2] < NO_LABEL).all()
    assert all(y is not None and len(y) == 4 and (y < NO_LABEL).all() for y in seen["sample"])
    # The torchrun workers' timing (train_rate) trains the same way.
    seen["train"].clear()
    config = bench.network_config(bench.build_parser().parse_args(shape))
    assert bench.train_rate(distributed.World(), torch.device("cpu"), None, 4, 1, 1, config) > 0
    assert seen["train"] and all(y is not None and (y[0::2] == NO_LABEL).all() for y in seen["train"])
    assert set(rates) == {DEFAULTS["label_dropout"]}
