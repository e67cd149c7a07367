"""Sample quality without downloads: metrics in the feature space of a small MNIST classifier.

Inception-based FID needs weights from the internet and knows little about digits, so the project
trains its own classifier (once, cached) and measures in its 128-d penultimate layer:
FID (Heusel et al. 2017), k-NN precision and recall (Kynkaanniemi et al. 2019), the share of samples
the classifier is confident about, and the entropy of the predicted-digit histogram.
"""
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSIFIER_VERSION = 1  # bump when the classifier or its training changes: cached files then retrain


class Classifier(nn.Module):
    """A small CNN: 28 -> 14 -> 7 pixels, then a 128-d feature vector and 10 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        """x (B, 1, 28, 28) in [-1, 1] -> (features (B, 128), logits (B, 10))."""
        f = self.body(x)
        return f, self.head(f)


def data_fingerprint(images, labels):
    """What the classifier was trained on, so a cached file from other data is never trusted."""
    h = hashlib.sha256(images.cpu().contiguous().numpy().tobytes())
    h.update(labels.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_classifier(images, labels, device, epochs=3, batch_size=128, seed=0, log=print):
    """Train on (N, 1, 28, 28) images in [-1, 1] with small random shifts; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = Classifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    n_batches = max(1, len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * n_batches)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for i in range(n_batches):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = images[idx].to(device)
            # Shift by up to 2 pixels: a little robustness to the slightly off-centre digits models draw.
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, (dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x)[1], labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return model.eval()


@torch.inference_mode()
def embed(model, images, device, batch_size=1000):
    """(N, 1, 28, 28) in [-1, 1] -> features (N, 128) and class probabilities (N, 10), in float64 on the CPU."""
    feats, probs = [], []
    for chunk in images.split(batch_size):
        f, logits = model(chunk.to(device).float())
        feats.append(f.double().cpu())
        probs.append(logits.double().softmax(1).cpu())
    return torch.cat(feats), torch.cat(probs)


def accuracy(model, images, labels, device):
    return (embed(model, images, device)[1].argmax(1) == labels.cpu()).double().mean().item()


def gaussian_stats(feats):
    """Mean (D,) and covariance (D, D) of features (N, D)."""
    return feats.mean(0), torch.cov(feats.T)


def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), via symmetric eigendecompositions."""
    vals, vecs = torch.linalg.eigh(cov1)
    root1 = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T  # C1^1/2
    middle = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * middle).item()


def precision_recall(real, fake, k=3):
    """Improved precision and recall: the share of fake points inside the real k-NN manifold, and back."""
    def kth_radius(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # k+1: each point is its own nearest neighbour

    def coverage(points, manifold, radii):
        return (torch.cdist(points, manifold) <= radii[None]).any(1).double().mean().item()

    return coverage(fake, real, kth_radius(real)), coverage(real, fake, kth_radius(fake))


def class_stats(probs, confident=0.9):
    """Share of confident predictions, the predicted-digit histogram and its entropy (ln 10 = balanced)."""
    hist = torch.bincount(probs.argmax(1), minlength=10).double()
    p = hist / hist.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"confident": (probs.max(1).values >= confident).double().mean().item(),
            "histogram": hist.long().tolist(), "entropy": entropy}


def metrics(feats, probs, ref_stats, ref_feats):
    """Every figure for one set of images, against the reference (test-set) statistics and features."""
    precision, recall = precision_recall(ref_feats, feats)
    return {"fid": frechet_distance(*gaussian_stats(feats), *ref_stats), "precision": precision,
            "recall": recall, **class_stats(probs)}


def table(rows):
    """{name: metrics} -> a printable table."""
    lines = [f"{'':<10}{'FID':>9}{'precision':>11}{'recall':>8}{'confident':>11}{'entropy':>9}  histogram 0-9"]
    for name, m in rows.items():
        lines.append(f"{name:<10}{m['fid']:>9.3f}{m['precision']:>11.3f}{m['recall']:>8.3f}"
                     f"{m['confident']:>11.3f}{m['entropy']:>9.3f}  {' '.join(map(str, m['histogram']))}")
    lines.append(f"(entropy of a perfectly balanced histogram: ln 10 = {math.log(10):.3f})")
    return "\n".join(lines)
