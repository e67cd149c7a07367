"""Training on synthetic MNIST: the loss, checkpoints, resume, budgets, Ctrl-C, through train.py and the CLI."""
import argparse
import dataclasses
import json
import math
import os
import signal

import pytest
import torch
from PIL import Image

import data
import run
import train as training
from ckpt import latest_checkpoint, load_checkpoint
from conftest import TINY
from diffusion import Diffusion
from model import UNet, UNetConfig, build_network


def test_loss_falls_when_overfitting_a_handful_of_images(mnist_root):
    torch.manual_seed(0)
    x0 = data.to_model_range(data.load_mnist(mnist_root)[0][:8])
    d, model = Diffusion(100), UNet(UNetConfig(channels=(8, 16, 32), blocks=(1, 1, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def held_out_loss():  # the same t and noise every time
        torch.manual_seed(123)
        with torch.no_grad():
            return d.loss(model, x0.repeat(8, 1, 1, 1)).item()

    before = held_out_loss()
    for _ in range(150):
        loss = d.loss(model, x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_loss() < 0.5 * before


def test_the_trainer_runs_without_a_command_line(mnist_root, tmp_path, monkeypatch):
    """train.train with plain settings, as a notebook, bench.py or compare.py would call it: no parser is built."""
    def no_parser(*a, **k):
        raise AssertionError("an argument parser was built")
    monkeypatch.setattr(argparse.ArgumentParser, "__init__", no_parser)
    settings = training.TrainSettings(data_dir=mnist_root, ckpt_dir=str(tmp_path), epochs=2)
    given = dict(channels=(8, 16, 32), blocks=(1, 1, 1), timesteps=20, batch_size=16, objective="x0",
                 timestep_draw="stratified")
    assert training.train(settings, given) == 0
    ckpt = load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert (ckpt["epoch"], ckpt["step"]) == (2, 8)  # 64 images in batches of 16
    assert ckpt["train_config"] == {**training.DEFAULTS, **given}
    assert ckpt["diffusion_config"]["objective"] == "x0" and ckpt["model_config"]["channels"] == (8, 16, 32)
    assert ckpt["diffusion_config"]["timestep_draw"] == "stratified"  # what the loss drew with
    assert ckpt["history"][-1][1] < ckpt["history"][0][1]  # the loss fell
    # Resumed the same way: the settings not given come from the checkpoint.
    assert training.train(dataclasses.replace(settings, resume=latest_checkpoint(str(tmp_path)), epochs=3)) == 0
    ckpt = load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert ckpt["step"] == 12 and ckpt["train_config"]["objective"] == "x0"
    assert ckpt["diffusion_config"]["timestep_draw"] == "stratified"


def test_one_epoch_writes_a_complete_checkpoint_and_log(trained):
    ckpt = load_checkpoint(trained["checkpoint"])
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4 and ckpt["batch"] == 0  # 64 images / 16
    assert ckpt["model_config"] == {"arch": "unet", "channels": (8, 16, 32), "blocks": (1, 1, 1), "groups": 8,
                                   "num_classes": 10, "attention": False, "up_conv": "low",
                                   "scale_shift": False, "label_silu": False, "emb_dim": 0}
    assert ckpt["diffusion_config"]["timesteps"] == 20
    assert set(ckpt["ema"]) == set(ckpt["model"]) and ckpt["ema_updates"] == 4
    run_dir = os.path.dirname(trained["checkpoint"])
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["images_per_s"] > 0
    assert Image.open(os.path.join(run_dir, "loss.png")).size[0] > 100
    assert sorted(os.listdir(run_dir)) == ["ckpt_00000004.pt", "log.jsonl", "loss.png"]


def train(workspace, *extra):
    return run.main(["--mode", "train", "--data-dir", workspace["data_dir"], "--ckpt-dir", workspace["ckpt_dir"],
                     *TINY, *extra])


def test_resume_continues_the_step_count_in_the_same_run(workspace):
    assert train(workspace, "--resume", "--epochs", "2") == 0
    newest = latest_checkpoint(workspace["ckpt_dir"])
    ckpt = load_checkpoint(newest)
    assert os.path.dirname(newest) == os.path.dirname(workspace["checkpoint"])
    assert (ckpt["epoch"], ckpt["step"]) == (2, 8)
    assert [r["epoch"] for r in ckpt["log"]] == [1, 2]


@pytest.mark.parametrize("stop_at", [6, 4])  # mid-epoch, and the last step of epoch 1 (4 batches an epoch)
def test_resume_is_exact(workspace, tmp_path, monkeypatch, stop_at):
    """Eight steps straight, or a Ctrl-C at step stop_at, a resume and the rest: bit-identical weights, EMA,
    optimizer state, the same batches in the same order (the lr schedule spans the whole budget in both) and
    one log row per epoch."""
    seen, real_step = [], training.train_step

    def recording_step(diffusion, model, ema, opt, x0, *rest):
        seen.append(x0.clone())
        if interrupt_at == len(seen):
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, caught by the trainer's handler
        return real_step(diffusion, model, ema, opt, x0, *rest)

    monkeypatch.setattr(training, "train_step", recording_step)
    interrupt_at, straight = None, dict(workspace, ckpt_dir=str(tmp_path / "straight"))
    assert train(straight, "--epochs", "2") == 0
    batches_straight, seen[:] = list(seen), []
    interrupt_at, parts = stop_at, dict(workspace, ckpt_dir=str(tmp_path / "parts"))
    assert train(parts, "--epochs", "2") == 130
    stopped = load_checkpoint(latest_checkpoint(parts["ckpt_dir"]))
    assert (stopped["step"], stopped["epoch"], stopped["batch"]) == (stop_at, stop_at // 4, stop_at % 4)
    interrupt_at = None
    assert train(parts, "--resume") == 0
    assert len(seen) == 8 and all(torch.equal(a, b) for a, b in zip(batches_straight, seen))
    a = load_checkpoint(latest_checkpoint(straight["ckpt_dir"]))
    b = load_checkpoint(latest_checkpoint(parts["ckpt_dir"]))
    assert a["step"] == b["step"] == 8
    assert [r["epoch"] for r in a["log"]] == [r["epoch"] for r in b["log"]] == [1, 2]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert a["history"][0] == b["history"][0]  # epoch 1's loss (later log points differ: Ctrl-C logs at once)


def test_a_new_run_never_touches_an_earlier_one(workspace):
    before = sorted(os.listdir(workspace["ckpt_dir"]))
    assert train(workspace, "--epochs", "1") == 0
    assert sorted(os.listdir(workspace["ckpt_dir"])) == sorted(before + ["run_002"])


def test_ctrl_c_saves_a_checkpoint_and_exits_130(workspace):
    """A real process, a real SIGINT: it stops at a step boundary, saves, and --resume carries on."""
    import signal
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ckpt_dir = workspace["ckpt_dir"]
    proc = subprocess.Popen([sys.executable, os.path.join(root, "run.py"), "--mode", "train", "--resume",
                             "--epochs", "100000", "--data-dir", workspace["data_dir"], "--ckpt-dir", ckpt_dir,
                             *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = os.path.dirname(workspace["checkpoint"])
    deadline = time.time() + 120
    while len([f for f in os.listdir(run_dir) if f.endswith(".pt")]) < 3 and time.time() < deadline:
        time.sleep(0.05)  # wait until training is well under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "continue with --resume" in out
    ckpt = load_checkpoint(latest_checkpoint(ckpt_dir))
    assert ckpt["step"] >= 8
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]
    assert train(workspace, "--resume", "--epochs", str(ckpt["epoch"] + 1)) == 0
    assert load_checkpoint(latest_checkpoint(ckpt_dir))["epoch"] == ckpt["epoch"] + 1


def test_learning_rate_warms_up_then_follows_the_budget():
    cfg = dict(training.DEFAULTS, lr=1.0, warmup=10)
    assert training.learning_rate(cfg, 0, 0.0) == 0.1 and training.learning_rate(cfg, 9, 0.0) == 1.0
    assert training.learning_rate(cfg, 100, 0.5) == pytest.approx(0.5) and training.learning_rate(cfg, 100, 1.0) == 0
    assert training.learning_rate(dict(cfg, schedule="constant"), 100, 0.9) == 1.0
    linear = dict(cfg, schedule="linear")
    assert training.learning_rate(linear, 100, 0.25) == pytest.approx(0.75)  # the cosine is at 0.85 there
    assert training.learning_rate(linear, 100, 1.0) == 0 and training.learning_rate(linear, 100, 1.2) == 0


def test_a_minutes_budget_ends_the_run_saves_and_survives_resume(workspace, tmp_path, capsys):
    ckpt_dir = str(tmp_path / "timed")
    timed = dict(workspace, ckpt_dir=ckpt_dir)
    assert train(timed, "--minutes", "0.005", "--epochs", "100000") == 0  # 0.3 s, far short of the epochs
    first = load_checkpoint(latest_checkpoint(ckpt_dir))
    assert first["budget"] == {"epochs": 100000, "minutes": 0.005, "steps": None} and first["elapsed"] >= 0.3
    assert 0 < first["step"] < 100000 * 4
    assert train(timed, "--resume") == 2  # the budget is spent; the checkpoint says so
    assert "has already used its budget" in capsys.readouterr().err
    # Extended by 0.3 s past what the first part used (on a loaded machine one step can outlast 0.3 s).
    more = round((first["elapsed"] + 0.3) / 60, 6)
    assert train(timed, "--resume", "--minutes", str(more)) == 0  # extended: the same run goes on
    second = load_checkpoint(latest_checkpoint(ckpt_dir))
    assert second["elapsed"] >= 60 * more and second["step"] > first["step"] and second["budget"]["minutes"] == more
    assert len(os.listdir(ckpt_dir)) == 2  # .lock and run_001


def test_the_ema_follows_its_formula_with_the_warm_up():
    """After the first update copies the weights, update n blends with weight 1 - min(D, (1+n)/(10+n))."""
    model, ema, _ = training.make_trainable({"arch": "mlp", "width": 8, "depth": 1}, dict(training.DEFAULTS,
                                            ema_decay=0.5, ema_length=None), torch.device("cpu"))
    p, e = next(model.parameters()), next(ema.module.parameters())
    expected = None
    for n, value in enumerate([1.0, 3.0, -2.0, 5.0]):
        with torch.no_grad():
            p.fill_(value)
        ema.update_parameters(model)
        decay = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.18, 0.25, 0.31 (n = 0 is the copy)
        expected = value if n == 0 else decay * expected + (1 - decay) * value
        assert e.flatten()[0].item() == pytest.approx(expected, rel=1e-6)
    assert int(ema.n_averaged) == 4


def test_sampling_draws_with_the_ema_weights_not_the_raw_ones(workspace):
    import sample
    ckpt = load_checkpoint(workspace["checkpoint"])
    raw, ema = (build_network(ckpt["model_config"]) for _ in range(2))
    raw.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    sp = sample.load_sampler(sample.SampleSettings(checkpoint=workspace["checkpoint"]))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 15])
    with torch.no_grad():
        assert not torch.allclose(raw(x, t), ema(x, t))  # one epoch of 4 steps: the two differ
        torch.testing.assert_close(sp.denoise(x, t), ema(x, t))


def test_bf16_training_gives_a_finite_falling_loss(mnist_root):
    """The default precision on CPUs with native bf16 (GPUs default to fp32): autocast around the network only."""
    torch.manual_seed(0)
    x0 = data.to_model_range(data.load_mnist(mnist_root)[0][:8])
    cfg = dict(training.DEFAULTS, lr=3e-3, warmup=1)
    model, ema, opt = training.make_trainable(
        {"arch": "unet", "channels": (8, 16, 32), "blocks": (1, 1, 1), "groups": 8, "num_classes": 0}, cfg,
        torch.device("cpu"))
    d = Diffusion(100)
    losses = [training.train_step(d, model, ema, opt, x0, None, torch.device("cpu"), torch.bfloat16).item()
              for _ in range(60)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x0, torch.zeros(8, dtype=torch.long)).dtype == torch.float32  # the output head runs in fp32


def test_the_optimizer_takes_the_runs_second_moment_decay():
    net = {"arch": "mlp", "width": 8, "depth": 1}
    for beta2 in (0.999, 0.99):
        _, _, opt = training.make_trainable(net, dict(training.DEFAULTS, adam_beta2=beta2), torch.device("cpu"))
        assert opt.param_groups[0]["betas"] == (0.9, beta2)


def test_power_ema_averages_the_last_share_of_the_run_it_is_given():
    """EDM2's power EMA weights update k by about k^gamma: fed the weight value k at update k, it ends near the
    mean of t under a density t^gamma on [0, N], (gamma + 1) / (gamma + 2) N, whatever N is; gamma 6.94 is the
    paper's for a relative standard deviation of 0.10."""
    assert training.power_ema_exponent(0.10) == pytest.approx(6.94, abs=0.01)
    assert training.power_ema_exponent(0.05) == pytest.approx(16.97, abs=0.01)
    for n in (200, 1000):
        model, ema, _ = training.make_trainable({"arch": "mlp", "width": 8, "depth": 1}, dict(training.DEFAULTS,
                                                ema_length=0.10), torch.device("cpu"))
        p, e = next(model.parameters()), next(ema.module.parameters())
        for k in range(1, n + 1):
            with torch.no_grad():
                p.fill_(float(k))
            ema.update_parameters(model)
        gamma = training.power_ema_exponent(0.10)
        assert e.flatten()[0].item() == pytest.approx((gamma + 1) / (gamma + 2) * n, rel=0.01)


def test_a_steps_budget_ends_the_run_and_is_kept_across_resume(mnist_root, tmp_path):
    settings = training.TrainSettings(data_dir=mnist_root, ckpt_dir=str(tmp_path), steps=3)
    given = dict(channels=(8, 16, 32), blocks=(1, 1, 1), timesteps=20, batch_size=16)
    assert training.train(settings, given) == 0
    ckpt = load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert (ckpt["step"], ckpt["budget"]["steps"], ckpt["budget"]["epochs"]) == (3, 3, None)
    assert ckpt["log"][-1]["lr"] == pytest.approx(training.learning_rate(ckpt["train_config"], 2, 2 / 3))
    more = dataclasses.replace(settings, resume=latest_checkpoint(str(tmp_path)), steps=6)
    assert training.train(more) == 0
    assert load_checkpoint(latest_checkpoint(str(tmp_path)))["step"] == 6
