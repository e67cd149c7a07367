"""The training data: MNIST through torchvision, kept whole in memory as uint8."""
import os

from errors import UserError

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def load_mnist(root, train=True):
    """MNIST images (N, 28, 28) uint8 and labels (N,), downloaded by torchvision if missing."""
    from torchvision.datasets import MNIST
    raw = os.path.join(root, "MNIST", "raw")
    try:
        ds = MNIST(root, train=train, download=True)
        return ds.data, ds.targets
    except Exception as e:  # torchvision raises RuntimeError, URLError or OSError here
        raise UserError(f"MNIST is missing from {raw} and could not be downloaded ({type(e).__name__}); "
                        f"put the four files {', '.join(MNIST_FILES)} in {raw}") from None


def to_model_range(images):
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [-1, 1]."""
    return images.unsqueeze(1).float().div(127.5).sub(1)
