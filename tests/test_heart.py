"""The 2D heart data set: its points, its network, training, the sample figures, the distance eval, and the
one-line errors when a checkpoint of one data set is asked for the other's figures."""
import json
import math
import os

import pytest
import torch
from PIL import Image

import run
from ckpt import latest_checkpoint, load_checkpoint
from data import heart_curve, heart_points
from diffusion import Diffusion
from evaluate import curve_distance, sliced_wasserstein
from model import PointMLP, PointMLPConfig
from train import DEFAULTS, for_dataset

HEART = ["--dataset", "heart", "--timesteps", "20", "--batch-size", "16", "--precision", "fp32", "--device", "cpu"]


def test_heart_points_lie_on_the_curve_in_range():
    points = heart_points(500, seed=3)
    assert points.shape == (500, 2) and points.abs().max() <= 1
    assert curve_distance(points) < 2e-3  # the trace of 4,000 points is only so fine
    assert torch.equal(heart_points(500, seed=3), points) and not torch.equal(heart_points(500, seed=4), points)
    assert curve_distance(points + 0.1) > 0.03


def test_sliced_wasserstein_is_a_distance_between_point_sets():
    a, b = heart_points(800, seed=1), heart_points(800, seed=2)
    assert sliced_wasserstein(a, a) == 0
    assert sliced_wasserstein(a, b) == pytest.approx(sliced_wasserstein(b, a))
    # Shifting a set by c along x moves every projection onto direction d by c d_x: on average c E|cos| = 2c/pi.
    shift = torch.tensor([0.3, 0.0])
    assert sliced_wasserstein(a + shift, a) == pytest.approx(0.3 * 2 / math.pi, rel=0.05)
    assert sliced_wasserstein(a, b) < sliced_wasserstein(a + shift, b)


def test_a_perfect_predictor_draws_the_data_points_through_its_sampler():
    """With a data set of 8 points, E[x0 | x_t] is a softmax over them: sampled with it over every step (the
    heart's default, ddpm; or dpm2m), every point drawn lands on one of the 8. (dpm2m in 20 steps does not:
    41% land more than 0.02 off, which is why the heart samples with ddpm.)"""
    d = Diffusion(100, objective="x0")
    data = heart_curve(torch.arange(8, dtype=torch.float64) * math.pi / 4).float()  # (8, 2)

    def posterior_mean(xt, t):
        ab = d._at(d.alpha_bar, t, xt)  # (B, 1)
        logits = -((xt[:, None] - ab[:, None].sqrt() * data[None]) ** 2).sum(-1) / (2 * (1 - ab))  # (B, 8)
        return logits.softmax(dim=1) @ data

    for solver, steps, spacing in (("ddim", 100, "linspace"), ("dpm2m", 100, "trailing")):
        x = d.sample(posterior_mean, (200, 2), steps=steps, solver=solver, spacing=spacing,
                     generator=torch.Generator().manual_seed(0))
        nearest = torch.cdist(x, data).min(dim=1).values
        assert nearest.max() < 0.02, solver
        assert len(torch.cdist(x, data).argmin(dim=1).unique()) == 8  # every point is drawn


def test_the_point_network_sees_each_coordinate_and_the_timestep():
    net = PointMLP(PointMLPConfig())
    with torch.no_grad():  # the residual branches start at zero; give every weight a value
        for p in net.parameters():
            p.normal_(0, 0.1)
    x, t = torch.randn(4, 2), torch.tensor([0, 10, 500, 999])
    out = net(x, t)
    assert out.shape == (4, 2)
    assert not torch.allclose(net(x, t.flip(0)), out)
    assert not torch.allclose(net(x + torch.tensor([0.01, 0.0]), t), out)


def test_train_sample_and_eval_the_heart(tmp_path):
    ckpt_dir, out = str(tmp_path / "ckpt"), str(tmp_path / "gen")
    assert run.main(["--mode", "train", "--train-steps", "30", "--ckpt-dir", ckpt_dir, "--width", "64", "--depth",
                     "2", *HEART]) == 0
    ckpt = load_checkpoint(latest_checkpoint(ckpt_dir))
    assert ckpt["train_config"]["dataset"] == "heart" and ckpt["model_config"]["arch"] == "points"
    assert (ckpt["model_config"]["width"], ckpt["model_config"]["depth"]) == (64, 2)
    assert ckpt["model_config"]["num_classes"] == 0 and ckpt["class_prior"] is None
    base = ["--ckpt-dir", ckpt_dir, "--out-dir", out, "--device", "cpu", "--precision", "fp32"]
    assert run.main(["--mode", "sample", "--n-samples", "300", *base]) == 0
    assert Image.open(os.path.join(out, "sample.png")).format == "PNG"
    # 20 forward frames, then the noise and each of the T=20 ddpm steps
    assert Image.open(os.path.join(out, "process.gif")).n_frames == 20 + 1 + 20
    assert run.main(["--mode", "eval", "--n-samples", "300", "--dataset", "heart", *base]) == 0
    result = json.load(open(os.path.join(out, "eval.json")))
    assert result["n"] == 300 and result["real"]["sliced_wasserstein"] > 0
    assert result["ratio_to_floor"] == pytest.approx(
        result["samples"]["sliced_wasserstein"] / result["real"]["sliced_wasserstein"])
    # the other data set's figures: one line, exit 2
    assert run.main(["--mode", "sample", "--dataset", "mnist", *base]) == 2
    assert run.main(["--mode", "sample", "--digit", "3", *base]) == 2  # no labels: "the heart has none"
    assert run.main(["--mode", "train", "--resume", "--dataset", "mnist", "--ckpt-dir", ckpt_dir]) == 2


def test_an_mnist_checkpoint_refuses_heart_figures(workspace, capsys):
    argv = ["--checkpoint", workspace["checkpoint"], "--out-dir", workspace["out_dir"], "--dataset", "heart"]
    assert run.main(["--mode", "sample", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was trained on mnist, so it cannot draw --dataset heart" in err


@pytest.mark.parametrize("flag", [["--arch", "unet"], ["--channels", "8,16,32"], ["--label-dropout", "0.2"],
                                  ["--eval-every", "1"]])
def test_heart_training_refuses_what_does_not_apply(tmp_path, flag, capsys):
    assert run.main(["--mode", "train", "--train-steps", "2", "--ckpt-dir", str(tmp_path), *HEART, *flag]) == 2
    assert flag[0] in capsys.readouterr().err
    assert not os.path.exists(os.path.join(str(tmp_path), "run_001"))


def test_a_new_heart_run_takes_the_point_recipe_unless_told_otherwise():
    heart = dict(DEFAULTS, dataset="heart")
    cfg = for_dataset(heart, {})
    assert (cfg["arch"], cfg["conditional"], cfg["objective"], cfg["weighting"], cfg["batch_size"], cfg["width"],
            cfg["depth"]) == ("points", False, "eps", "uniform", 256, 128, 3)
    assert for_dataset(heart, {"objective": "mean"})["weighting"] == "vlb"
    assert for_dataset(heart, {"objective": "x0", "weighting": "p2", "batch_size": 32})["batch_size"] == 32
    assert for_dataset(dict(DEFAULTS), {}) == dict(DEFAULTS)  # MNIST runs keep the defaults
