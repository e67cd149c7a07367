"""The training data: MNIST through torchvision, one process at a time per folder."""
import os

import pytest
import torch
import torchvision

import data
from errors import UserError


def test_mnist_loads_from_the_four_files(mnist_root):
    images, labels = data.load_mnist(mnist_root)
    assert images.shape == (64, 28, 28) and images.dtype == torch.uint8 and labels.tolist()[:3] == [0, 1, 2]


def test_mnist_is_read_under_the_folders_lock(tmp_path, monkeypatch):
    """While one process unpacks or reads MNIST, another waits: the lock is taken before torchvision runs."""
    fcntl = pytest.importorskip("fcntl")
    held = []

    class Probe:
        def __init__(self, root, train, download):
            with open(os.path.join(root, "MNIST", ".lock")) as other:  # another open file, as another process
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.append(False)
                except BlockingIOError:
                    held.append(True)
            raise RuntimeError("no files")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Probe)
    with pytest.raises(UserError, match="MNIST is missing"):
        data.load_mnist(str(tmp_path))
    assert held == [True]
    with open(tmp_path / "MNIST" / ".lock") as f:  # and released after, even on failure
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
