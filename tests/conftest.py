"""Shared fixtures: tiny synthetic MNIST files and a tiny trained run, all in temporary folders."""
import os
import shutil
import struct

import pytest
import torch

import run
from ckpt import latest_checkpoint

# A model and schedule small enough that a whole training epoch takes a second.
TINY = ["--channels", "8,16,32", "--blocks", "1,1,1", "--timesteps", "20", "--batch-size", "16",
        "--precision", "fp32", "--device", "cpu"]


def write_idx(path, tensor):
    """Write a uint8 tensor in the IDX format MNIST ships in (magic, sizes, raw bytes, big-endian)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, tensor.dim()))
        f.write(struct.pack(f">{tensor.dim()}I", *tensor.shape))
        f.write(tensor.contiguous().numpy().tobytes())


def make_mnist(root, n_train=64, n_test=32):
    """Synthetic digits: digit k is a bright bar 2 + 2k pixels long, plus a little noise."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n, dtype=torch.uint8) % 10
        images = torch.randint(0, 30, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i, k in enumerate(labels.tolist()):
            images[i, 12:16, 4:6 + 2 * k] = 255
        write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels)
    return root


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    return make_mnist(str(tmp_path_factory.mktemp("mnist")))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mnist_root):
    """A tiny run trained for one epoch, and the figures sampled from it."""
    root = tmp_path_factory.mktemp("trained")
    ckpt_dir, out_dir = str(root / "checkpoints"), str(root / "gen")
    assert run.main(["--mode", "train", "--epochs", "1", "--data-dir", mnist_root, "--ckpt-dir", ckpt_dir,
                     *TINY]) == 0
    assert run.main(["--mode", "sample", "--data-dir", mnist_root, "--ckpt-dir", ckpt_dir, "--out-dir", out_dir,
                     "--steps", "5", "--device", "cpu", "--precision", "fp32"]) == 0
    return {"ckpt_dir": ckpt_dir, "out_dir": out_dir, "checkpoint": latest_checkpoint(ckpt_dir)}


@pytest.fixture
def workspace(tmp_path, trained, mnist_root):
    """A private copy of the trained run's checkpoints and figures, for tests that might touch them."""
    ckpt_dir, out_dir = str(tmp_path / "checkpoints"), str(tmp_path / "gen")
    shutil.copytree(trained["ckpt_dir"], ckpt_dir)
    shutil.copytree(trained["out_dir"], out_dir)
    return {"ckpt_dir": ckpt_dir, "out_dir": out_dir, "data_dir": mnist_root,
            "checkpoint": latest_checkpoint(ckpt_dir)}


def alpha_bar_at(d, t):
    """alpha_bar at (possibly fractional) timesteps t (B,), interpolating log sigma as Heun does."""
    lo = t.floor().long().clamp(max=d.timesteps - 2)
    w = (t - lo).view(-1, 1, 1, 1)
    log_sigma = (1 - w) * d.log_sigma[lo].view(-1, 1, 1, 1) + w * d.log_sigma[lo + 1].view(-1, 1, 1, 1)
    return 1 / (1 + (2 * log_sigma).exp())


def exact_eps(d, target):
    """The exact eps-predictor when the data is one known batch: eps = (x_t - sqrt(ab) x*) / sqrt(1 - ab)."""
    def model(x, t):
        ab = alpha_bar_at(d, t.float())
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()
    return model
