"""Sample quality without downloads: metrics in the feature space of a small MNIST classifier.

Inception-based FID needs weights from the internet and knows little about digits, so the project
trains its own classifier (once, cached) and measures in its 128-d penultimate layer:
FID (Heusel et al. 2017), k-NN precision and recall (Kynkaanniemi et al. 2019), the share of samples
the classifier is confident about, and the entropy of the predicted-digit histogram. The Judge holds
the cached classifier and the real data's features; evaluate() is the eval mode.
"""
import hashlib
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import sample
from ckpt import make_folder, save_checkpoint, write_atomic
from data import heart_points, heart_trace, load_mnist, to_model_range
from errors import UserError

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


class Judge:
    """The cached MNIST classifier and the real-data features every quality figure is measured against."""

    def __init__(self, data_dir, cache_dir, device):
        self.device = device
        train_x, train_y = load_mnist(data_dir)
        test_x, test_y = load_mnist(data_dir, train=False)
        self.train_x, self.test_x = to_model_range(train_x), to_model_range(test_x)
        self.train_y, self.test_y = train_y, test_y
        self.prior = torch.bincount(train_y, minlength=10).double() / len(train_y)  # what the samples ask for
        path = os.path.join(cache_dir, "classifier.pt")
        fingerprint = data_fingerprint(train_x, train_y)
        self.model = Classifier().to(device)
        cached = self._cached(path, fingerprint)
        if cached:
            self.model.load_state_dict(cached["model"])
            self.model.eval()
            self.accuracy = cached["test_accuracy"]
        else:
            print(f"training the evaluation classifier on {len(train_x):,} MNIST images (once; cached in {path})")
            self.model = train_classifier(self.train_x, train_y, device, log=tqdm.write)
            self.accuracy = accuracy(self.model, self.test_x, test_y, device)
            print(f"evaluation classifier: test accuracy {self.accuracy:.2%}")
            make_folder(cache_dir, "--ckpt-dir")
            save_checkpoint({"format": "mnist-classifier", "version": CLASSIFIER_VERSION, "data": fingerprint,
                             "test_accuracy": self.accuracy, "model": self.model.state_dict()}, path)
        self.test_feats, _ = embed(self.model, self.test_x, device)
        self.test_stats = gaussian_stats(self.test_feats)

    @staticmethod
    def _cached(path, fingerprint):
        """The cached classifier if it exists and was trained by this version on this data, else None."""
        if not os.path.exists(path):
            return None
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            cached = None
        if (isinstance(cached, dict) and cached.get("format") == "mnist-classifier"
                and cached.get("version") == CLASSIFIER_VERSION and cached.get("data") == fingerprint):
            return cached
        print(f"{path} was not trained by this version on this data: retraining it")
        return None

    def pick(self, labels, n, generator, stratified=True):
        """Indices of n images with these labels (or all of them, if fewer), in random order: each digit as many
        times as the samples ask for it at this n (sample.stratified_labels), or (not stratified, or a digit with
        too few images) drawn at random from all."""
        if stratified:
            counts = torch.bincount(sample.stratified_labels(self.prior, n, generator), minlength=10).tolist()
            pools = [torch.nonzero(labels == d).flatten() for d in range(10)]
            if all(c <= len(pool) for pool, c in zip(pools, counts)):
                picked = torch.cat([pool[torch.randperm(len(pool), generator=generator)[:c]]
                                    for pool, c in zip(pools, counts)])
                return picked[torch.randperm(n, generator=generator)]
        return torch.randperm(len(labels), generator=generator)[:n]

    def __call__(self, images, seed=0):
        """(metrics, predicted digits (N,)) for images (N, 1, 28, 28) against the test set; precision and
        recall use N test images in the class prior's proportions."""
        n = len(images)
        ref = self.pick(self.test_y, n, torch.Generator().manual_seed(seed))
        feats, probs = embed(self.model, images, self.device)
        return metrics(feats, probs, self.test_stats, self.test_feats[ref]), probs.argmax(1)

    def floor(self, n, seed=0, stratified=True):
        """The same metrics for n real training images: what a perfect model would score at this n. Stratified
        (a labelled run asking for its digits) in the class prior's proportions, as the samples ask for them;
        otherwise at random, as an unlabelled model draws its own mix."""
        pick = self.pick(self.train_y, n, torch.Generator().manual_seed(seed + 1), stratified)
        return self(self.train_x[pick], seed)[0]


def as_asked(drawn, asked):
    """For each digit 0-9, the share of the samples asked for it that the classifier calls it; None where
    none was asked for (a tiny N)."""
    return [(drawn[asked == d] == d).double().mean().item() if (asked == d).any() else None for d in range(10)]


def evaluate(s, cache_dir):
    """The eval mode: score s.n_samples (default 1000) samples of s.checkpoint, drawn exactly as the sample
    mode draws sample.png (for a labelled run: the digits in the class prior's proportions, guided), against
    the real-data floor; for a labelled run also how often each digit is drawn as asked. Prints the table, writes eval.json."""
    if s.digit is not None:
        raise UserError("--digit is for --mode sample; eval of a labelled run already asks for every digit")
    sp = sample.load_sampler(s)
    if sp.dataset == "heart":
        return evaluate_points(sp, s)
    judge = Judge(s.data_dir, cache_dir, s.device)
    n = s.n_samples or 1000
    asked = sp.labels(n, s.seed)
    t0 = time.time()
    fake = sp.generate(n, s.seed, labels=asked)
    seconds = time.time() - t0
    samples, drawn = judge(fake, s.seed)
    rows = {"samples": samples, "real": judge.floor(n, s.seed, stratified=asked is not None)}
    result = {"checkpoint": sp.path, "epoch": sp.ckpt["epoch"], "step": sp.ckpt["step"], "sampler": sp.sampler,
              **sp.plan.kwargs(), "n": n, "seed": s.seed, "sampling_seconds": round(seconds, 1),
              "classifier_accuracy": judge.accuracy, "guidance": sp.guidance, "guide": sp.guide,
              "guide_weight": sp.guide_weight, "labels": None if asked is None else "stratified"}
    if asked is not None:
        per_digit = as_asked(drawn, asked)
        result.update(as_asked=per_digit, interval=list(sp.interval))
    print(f"{n} samples in {seconds:.1f} s; classifier test accuracy {judge.accuracy:.2%}; "
          f"'real' is {n} training images, the floor at this N")
    print(table(rows))
    if asked is not None:
        print("samples classified as the digit asked for: "
              + " ".join(f"{d}:{a:.1%}" for d, a in enumerate(per_digit) if a is not None)
              + f"; worst {min(a for a in per_digit if a is not None):.1%}")
    result.update(rows)
    make_folder(s.out_dir, "--out-dir")
    out = os.path.join(s.out_dir, "eval.json")
    write_atomic(out, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    print(f"wrote {out}")
    return 0


def sliced_wasserstein(a, b, directions=512, seed=0):
    """Sliced Wasserstein-1 distance between point sets a, b (N, D) of the same size: over random unit
    directions, the mean distance between the sorted projections (the 1D optimal matching)."""
    d = torch.randn(directions, a.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d /= d.norm(dim=1, keepdim=True)
    pa, pb = (a.double() @ d.T).sort(dim=0).values, (b.double() @ d.T).sort(dim=0).values  # (N, directions)
    return (pa - pb).abs().mean().item()


def curve_distance(points):
    """Mean distance from each point (N, 2) to the heart curve (to a 4,000-point trace of it)."""
    return torch.cdist(points.double(), heart_trace(4000).double()).min(dim=1).values.mean().item()


REFERENCES = 10  # real point sets the heart's eval compares against


def evaluate_points(sp, s):
    """The heart's eval mode: the sliced Wasserstein distance of s.n_samples (default 1000) drawn points to as
    many real ones, against its floor, the distance between two real sets of that size (both averaged over
    REFERENCES real sets); and how far the drawn points lie from the curve. Prints the table, writes eval.json."""
    n = s.n_samples or 1000
    t0 = time.time()
    fake = sp.generate(n, s.seed)  # (n, 2)
    seconds = time.time() - t0
    # At N = 1000 the distance between two real sets ranges from 0.012 to 0.042 (20 pairs): both figures are
    # means over REFERENCES real sets, the floor's between pairs of real sets.
    real = [heart_points(n, seed=1000 * (s.seed + 1) + k) for k in range(REFERENCES)]
    other = [heart_points(n, seed=1000 * (s.seed + 1) + REFERENCES + k) for k in range(REFERENCES)]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    rows = {"samples": {"sliced_wasserstein": mean([sliced_wasserstein(fake, r) for r in real]),
                        "curve_distance": curve_distance(fake)},
            "real": {"sliced_wasserstein": mean([sliced_wasserstein(o, r) for o, r in zip(other, real)]),
                     "curve_distance": curve_distance(other[0])}}
    ratio = rows["samples"]["sliced_wasserstein"] / rows["real"]["sliced_wasserstein"]
    result = {"checkpoint": sp.path, "dataset": "heart", "epoch": sp.ckpt["epoch"], "step": sp.ckpt["step"],
              "sampler": sp.sampler, **sp.plan.kwargs(), "n": n, "seed": s.seed,
              "sampling_seconds": round(seconds, 1), **rows, "ratio_to_floor": ratio}
    print(f"{n} points in {seconds:.1f} s; each figure a mean over {REFERENCES} real sets of {n} points; 'real' "
          f"is another real set of {n} points, the floor at this N")
    print(f"{'':<10}{'sliced W1':>12}{'to curve':>12}")
    for name, row in rows.items():
        print(f"{name:<10}{row['sliced_wasserstein']:>12.4f}{row['curve_distance']:>12.4f}")
    print(f"sliced Wasserstein {ratio:.2f}x the floor")
    make_folder(s.out_dir, "--out-dir")
    out = os.path.join(s.out_dir, "eval.json")
    write_atomic(out, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    print(f"wrote {out}")
    return 0
