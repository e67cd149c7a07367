"""The training data: MNIST through torchvision, one process at a time per folder."""
import os
import threading
import time

import pytest
import torch
import torchvision

import data
from errors import UserError


def test_mnist_loads_from_its_files(mnist_root):
    images, labels = data.load_mnist(mnist_root)
    assert images.shape == (64, 28, 28) and images.dtype == torch.uint8 and labels.tolist()[:3] == [0, 1, 2]


def test_a_second_reader_of_the_mnist_folder_waits_for_the_first(tmp_path, monkeypatch):
    """torchvision unpacks MNIST in place, so a process reads it only while no other process holds the folder's
    lock, holds it while torchvision runs, and lets go after, even when the read fails."""
    fcntl = pytest.importorskip("fcntl")
    lock = tmp_path / "MNIST" / ".unpack.lock"
    ran = []

    class Probe:  # stands in for torchvision's MNIST: notes whether the first had let go, and who holds the lock
        def __init__(self, root, train, download):
            with open(lock) as other:  # another open file, as another process would have
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    ran.append((first.closed, "unlocked"))
                except BlockingIOError:
                    ran.append((first.closed, "locked"))
            raise RuntimeError("no files")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Probe)
    os.makedirs(lock.parent)
    first = open(lock, "a")
    fcntl.flock(first, fcntl.LOCK_EX)  # the first process, mid-unpack
    errors = []
    second = threading.Thread(target=lambda: errors.append(pytest.raises(UserError, data.load_mnist, str(tmp_path))))
    second.start()
    time.sleep(0.3)
    assert ran == []  # still waiting
    first.close()
    second.join(5)
    assert ran == [(True, "locked")] and "MNIST is missing" in str(errors[0].value)  # ran after the first, locked
    with open(lock) as f:  # released after the failed read
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
