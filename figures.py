"""Figures: pure functions from image tensors (values in [-1, 1]) or 2D points to PIL images or matplotlib figures.

Nothing here writes files or knows about training; run.py decides where each figure goes.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def to_pil(grid):
    """(C, H, W) in [-1, 1] -> PIL image."""
    arr = ((grid.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).squeeze(-1).numpy())


def grid(images, nrow):
    """(N, 1, 28, 28) -> one PIL image, nrow images per row, 2-pixel padding."""
    return to_pil(make_grid(images.float().cpu(), nrow=nrow, padding=2, pad_value=-1))


def strips(frames, labels, title):
    """frames (F, N, 1, 28, 28): one row per image, one column per frame, columns labelled."""
    n_frames, n = frames.shape[:2]
    rows = frames.transpose(0, 1).reshape(-1, *frames.shape[2:])  # (N * F, 1, 28, 28), row-major
    fig, ax = plt.subplots(figsize=(0.8 * n_frames + 0.4, 0.8 * n + 0.8), dpi=100)
    ax.imshow(grid(rows, nrow=n_frames), cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([2 + 30 * i + 14 for i in range(n_frames)], labels, fontsize=7)
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def animation(frames, nrow):
    """frames (F, N, 1, 28, 28) -> a list of PIL grid images, one per frame, for a GIF."""
    return [grid(f, nrow) for f in frames]


def loss_curve(history, title, evals=(), ylabel="loss"):
    """history [(step, loss)] on a log scale; evals [(step, FID)], if any, on a second axis."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if history:
        steps, losses = zip(*history)
        ax.plot(steps, losses, lw=1, label="training loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:red", label="FID (500 samples)")
        ax2.set_ylabel("FID", color="tab:red")
        ax2.set_yscale("log")
    fig.tight_layout()
    return fig


def panels(images, titles, nrow=8):
    """One grid per entry of images [(N, 1, 28, 28)], side by side, each under its title."""
    lines = max(t.count("\n") + 1 for t in titles)  # room for the longest title above its grid
    fig, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 2.8 + 0.2 * lines), dpi=100,
                             squeeze=False, layout="constrained")  # constrained: square grids keep their titles
    for ax, x, title in zip(axes[0], images, titles):
        ax.imshow(grid(x, nrow), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    return fig


def budget_curves(series, floor, title, xlabel):
    """series {recipe: [(budget, FID, confident share)]}: FID (log) and the confident share side by side, with
    the real images' figures as dashed lines."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for name, points in series.items():
        x, fid, confident = zip(*points)
        a.plot(x, fid, "o-", label=name)
        b.plot(x, confident, "o-", label=name)
    for ax, value, ylabel in ((a, floor["fid"], "FID"), (b, floor["confident"], "confident share")):
        ax.axhline(value, color="gray", ls="--", label="real images (floor)")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    a.set_yscale("log")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def point_cloud(points, curve, title, ax=None):
    """2D points (N, 2) as a scatter over the true curve (M, 2), on fixed axes; a new figure unless ax is given."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(curve[:, 0], curve[:, 1], color="tab:red", lw=1, alpha=0.6)
    ax.scatter(points[:, 0].clamp(-3, 3), points[:, 1].clamp(-3, 3), s=2, alpha=0.5, color="black")
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-1.6, 1.6)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    if fig is not None:
        fig.tight_layout()
    return fig


def point_frames(frames, titles, curve):
    """frames (F, N, 2) -> a list of PIL images, one scatter per frame, for a GIF."""
    fig, ax = plt.subplots(figsize=(3.6, 3.6), dpi=80)
    images = []
    for points, title in zip(frames, titles):
        ax.clear()
        point_cloud(points, curve, title, ax)
        fig.canvas.draw()
        images.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
    plt.close(fig)
    return images
