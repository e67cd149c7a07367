"""The training data, kept whole in memory: MNIST through torchvision (uint8 images and labels), or the 2D
heart, points on a heart-shaped curve (float, no labels), made on the spot."""
import math
import os
from contextlib import contextmanager

import torch

from errors import UserError

DATASETS = ("mnist", "heart")
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
HEART_POINTS = 50_000  # the heart's training set: 195 batches of 256 an epoch


@contextmanager
def folder_lock(folder):
    """Wait for, then hold, folder/.unpack.lock (not the training's .lock, should --ckpt-dir be this folder), so
    that processes sharing the folder take turns. Unguarded where there are no advisory locks (Windows, some
    network file systems) or the folder cannot be written."""
    try:
        import fcntl
        os.makedirs(folder, exist_ok=True)
        f = open(os.path.join(folder, ".unpack.lock"), "a")
    except (ImportError, OSError):
        f = None
    if f is None:
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes, or when the process ends however it ends
        except OSError:
            pass
        yield


def load_mnist(root, train=True):
    """MNIST images (N, 28, 28) uint8 and labels (N,), downloaded by torchvision if missing."""
    from torchvision.datasets import MNIST
    raw = os.path.join(root, "MNIST", "raw")
    try:
        # torchvision unpacks the .gz files in place: a second process reading a half-unpacked file would fail
        # (eight trainings started at once on a fresh folder did), so one process at a time.
        with folder_lock(os.path.join(root, "MNIST")):
            ds = MNIST(root, train=train, download=True)
        return ds.data, ds.targets
    except Exception as e:  # torchvision raises RuntimeError, URLError or OSError here
        raise UserError(f"MNIST is missing from {raw} and could not be downloaded ({type(e).__name__}); "
                        f"put the four files {', '.join(MNIST_FILES)} in {raw}") from None


def heart_curve(s):
    """Points (N, 2) of the heart curve x = 16 sin^3 s, y = 13 cos s - 5 cos 2s - 2 cos 3s - cos 4s at
    parameters s (N,), scaled by 1/17 into [-1, 1]."""
    x = 16 * torch.sin(s) ** 3
    y = 13 * torch.cos(s) - 5 * torch.cos(2 * s) - 2 * torch.cos(3 * s) - torch.cos(4 * s)
    return torch.stack([x, y], dim=1) / 17


def heart_trace(n):
    """n points evenly spaced in s along the heart curve, for drawing it and measuring distances to it."""
    return heart_curve(torch.linspace(0, 2 * math.pi, n, dtype=torch.float64)).float()


def heart_points(n, seed=0):
    """n points of the heart, at parameters drawn uniformly with the seed: the training set is seed 0, and
    the evaluation's real sets are other seeds."""
    g = torch.Generator().manual_seed(seed)
    return heart_curve(torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi).float()


def load_data(dataset, root):
    """(data, labels or None) of a data set, whole: MNIST's (N, 28, 28) uint8 images and labels from root,
    or the heart's (N, 2) points."""
    if dataset == "mnist":
        return load_mnist(root)
    elif dataset == "heart":
        return heart_points(HEART_POINTS), None
    else:
        raise UserError(f"unknown --dataset {dataset!r}; choose {' or '.join(DATASETS)}")


def sample_shape(dataset):
    """The shape of one sample as the network sees it."""
    return (2,) if dataset == "heart" else (1, 28, 28)


def to_model_range(data):
    """uint8 images (B, 28, 28) -> float (B, 1, 28, 28) in [-1, 1]; points (B, 2) are already in range."""
    if data.dtype != torch.uint8:
        return data
    return data.unsqueeze(1).float().div(127.5).sub(1)
