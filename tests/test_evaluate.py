"""Quality metrics: FID, precision/recall, class statistics, and the cached classifier's provenance."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import evaluate
import run
import sample
from ckpt import latest_checkpoint, load_checkpoint
from conftest import make_mnist


def test_identical_statistics_give_fid_zero():
    feats = torch.randn(500, 16, dtype=torch.float64)
    mu, cov = evaluate.gaussian_stats(feats)
    assert evaluate.frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-8)


def test_fid_matches_the_closed_form():
    mu1, mu2 = torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    a, b = torch.tensor([1.0, 4.0, 9.0, 1.0]), torch.tensor([4.0, 1.0, 1.0, 1.0])
    cov1, cov2 = torch.diag(a).double(), torch.diag(b).double()
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    expected = 5.0 + ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert evaluate.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected)
    # A pure shift of the same distribution costs exactly the squared distance of the means.
    full = torch.cov(torch.randn(200, 4, dtype=torch.float64).T)
    assert evaluate.frechet_distance(mu1, full, mu2, full) == pytest.approx(5.0, rel=1e-6)


def test_precision_and_recall():
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    assert evaluate.precision_recall(x, x) == (1.0, 1.0)
    far = x + 100
    assert evaluate.precision_recall(x, far) == (0.0, 0.0)
    # Fakes from half the real modes: precise, but recall drops.
    real = torch.cat([torch.randn(100, 8) * 0.1, torch.randn(100, 8) * 0.1 + 10])
    fake = torch.randn(100, 8) * 0.1
    precision, recall = evaluate.precision_recall(real, fake)
    assert precision > 0.8 and 0.4 < recall < 0.6


def test_class_statistics():
    probs = torch.eye(10, dtype=torch.float64).repeat(5, 1)  # 50 confident predictions, 5 of each digit
    stats = evaluate.class_stats(probs)
    assert stats["confident"] == 1.0 and stats["histogram"] == [5] * 10
    assert stats["entropy"] == pytest.approx(math.log(10))
    blurry = torch.full((10, 10), 0.1, dtype=torch.float64)
    blurry[:, 3] += 1e-3  # every argmax is 3
    stats = evaluate.class_stats(blurry)
    assert stats["confident"] == 0.0 and stats["entropy"] == 0.0


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    root = make_mnist(str(tmp_path_factory.mktemp("judge-mnist")), n_train=2560, n_test=500)
    cache = str(tmp_path_factory.mktemp("judge-ckpt"))
    return evaluate.Judge(root, cache, torch.device("cpu")), (root, cache)


def test_real_images_score_far_better_than_noise(judge):
    judge, _ = judge
    assert judge.accuracy > 0.9  # the synthetic digits are easy
    real = judge.floor(200)
    noise, predicted = judge(torch.rand(200, 1, 28, 28) * 2 - 1)
    assert predicted.shape == (200,)
    assert real["fid"] < 0.1 * noise["fid"]
    assert real["precision"] > 0.5 and noise["precision"] < 0.1


def test_the_floor_takes_each_digit_as_often_as_the_samples_ask_for_it(judge, monkeypatch):
    """The real images of the floor come in the class prior's proportions, as sample.Sampler.labels asks for
    the digits, so a perfect model's samples and the floor differ only by chance within each digit."""
    judge, _ = judge
    seen = []
    monkeypatch.setattr(evaluate.Judge, "__call__", lambda self, images, seed=0: (seen.append(images), None))
    judge.floor(200, seed=4)
    picked = seen[0].flatten(1)
    index = [torch.nonzero((judge.train_x.flatten(1) == image).all(1)).flatten()[0].item() for image in picked]
    assert len(set(index)) == 200  # no image twice
    prior = torch.bincount(judge.train_y, minlength=10).double() / len(judge.train_y)
    assert ((torch.bincount(judge.train_y[index], minlength=10) - 200 * prior).abs() < 1).all()
    reference = judge.pick(judge.test_y, 200, torch.Generator().manual_seed(4))  # precision and recall's test images
    assert len(set(reference.tolist())) == 200
    assert ((torch.bincount(judge.test_y[reference], minlength=10) - 200 * prior).abs() < 1).all()
    judge.floor(200, seed=4, stratified=False)  # an unlabelled run draws its own mix: so does its floor
    index = [torch.nonzero((judge.train_x.flatten(1) == image).all(1)).flatten()[0].item() for image in seen[1].flatten(1)]
    assert len(set(index)) == 200 and torch.bincount(judge.train_y[index], minlength=10).tolist() != [20] * 10


def test_pick_takes_each_digit_in_proportion_and_at_random_within_it():
    labels = torch.arange(10).repeat_interleave(torch.arange(50, 150, 10))  # 50, 60, ..., 140 images of the digits
    prior = torch.bincount(labels).double() / len(labels)

    def pick(n, seed, stratified=True):
        return evaluate.Judge.pick(SimpleNamespace(prior=prior), labels, n, torch.Generator().manual_seed(seed),
                                   stratified)

    for n, seed in ((200, 0), (37, 1), (500, 2)):
        index = pick(n, seed)
        assert len(set(index.tolist())) == n
        assert ((torch.bincount(labels[index], minlength=10) - n * prior).abs() < 1).all()
    assert set(pick(200, 0).tolist()) != set(pick(200, 1).tolist())  # other images of each digit
    assert (labels[pick(200, 0)].diff() < 0).any()  # in random order, not digit by digit
    off = [(torch.bincount(labels[pick(200, s, False)], minlength=10) - 200 * prior).abs().max() for s in range(5)]
    assert max(off) > 2  # unstratified: the mix varies
    assert sorted(pick(1000, 3).tolist()) == list(range(950))  # more than a digit has: all of them, at random


def test_cached_classifier_is_reused_only_when_it_matches(judge, monkeypatch, capsys):
    judge, (root, cache) = judge
    path = os.path.join(cache, "classifier.pt")
    assert os.path.exists(path)

    trained = []
    real_train = evaluate.train_classifier
    monkeypatch.setattr(evaluate, "train_classifier", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    evaluate.Judge(root, cache, torch.device("cpu"))
    assert trained == []  # same version, same data: the cache is used

    cached = torch.load(path, weights_only=True)
    for stale in (dict(cached, data="0" * 64), dict(cached, version=-1), "garbage"):
        torch.save(stale, path)
        evaluate.Judge(root, cache, torch.device("cpu"))
        assert "retraining" in capsys.readouterr().out
    assert len(trained) == 3
    assert torch.load(path, weights_only=True)["data"] == cached["data"]  # rewritten with the right provenance


def test_eval_mode_writes_a_report(workspace):
    out = workspace["out_dir"]
    assert run.main(["--mode", "eval", "--n-samples", "40", "--steps", "3", "--data-dir", workspace["data_dir"],
                     "--ckpt-dir", workspace["ckpt_dir"], "--out-dir", out, "--device", "cpu",
                     "--precision", "fp32"]) == 0
    report = json.load(open(os.path.join(out, "eval.json")))
    assert report["n"] == 40 and report["steps"] == 3 and report["sampler"] == sample.DEFAULT_SAMPLER == "heun"
    for row in ("samples", "real"):
        assert set(report[row]) >= {"fid", "precision", "recall", "confident", "entropy", "histogram"}
        assert sum(report[row]["histogram"]) == 40
    # The tiny run is labelled: its samples ask for digits from the class prior, guided, as sample.png does.
    assert report["guidance"] == sample.DEFAULT_GUIDANCE and len(report["as_asked"]) == 10
    assert report["guide"] is None and report["guide_weight"] is None
    guide = latest_checkpoint(workspace["ckpt_dir"])
    assert run.main(["--mode", "eval", "--n-samples", "40", "--steps", "3", "--data-dir", workspace["data_dir"],
                     "--ckpt-dir", workspace["ckpt_dir"], "--out-dir", out, "--device", "cpu", "--precision", "fp32",
                     "--guide-checkpoint", guide, "--guide-weight", "3"]) == 0
    report = json.load(open(os.path.join(out, "eval.json")))
    assert report["guide"] == guide and report["guide_weight"] == 3 and report["labels"] == "stratified"


def test_a_floor_is_stratified_only_where_the_samples_ask_for_digits(workspace, monkeypatch):
    """Asked-for digits come in the prior's proportions, and so do the floor's; with no label (guidance 0) the
    model draws its own mix, and the floor's real images are drawn at random."""
    floors, real_floor = [], evaluate.Judge.floor
    monkeypatch.setattr(evaluate.Judge, "floor", lambda self, n, seed=0, stratified=True:
                        floors.append(stratified) or real_floor(self, n, seed, stratified))
    out = workspace["out_dir"]
    for guidance in ("1.5", "0"):
        assert run.main(["--mode", "eval", "--n-samples", "40", "--steps", "2", "--guidance", guidance,
                         "--data-dir", workspace["data_dir"], "--ckpt-dir", workspace["ckpt_dir"], "--out-dir", out,
                         "--device", "cpu", "--precision", "fp32"]) == 0
    assert floors == [True, False]
    assert json.load(open(os.path.join(out, "eval.json")))["labels"] is None


def test_eval_every_adds_quality_to_the_training_log(workspace):
    from conftest import TINY
    assert run.main(["--mode", "train", "--resume", "--epochs", "2", "--eval-every", "1",
                     "--data-dir", workspace["data_dir"], "--ckpt-dir", workspace["ckpt_dir"], *TINY]) == 0
    log = load_checkpoint(latest_checkpoint(workspace["ckpt_dir"]))["log"]
    assert "fid" not in log[0] and log[1]["fid"] > 0 and 0 <= log[1]["confident"] <= 1


@pytest.mark.parametrize("follows", [True, False])
def test_as_asked_scores_how_often_the_drawn_digit_is_the_one_asked_for(workspace, monkeypatch, follows):
    """A classifier that sees exactly the digits asked for scores 100% on every digit; a model that ignores
    the labels (here: everything reads as a 3) scores 0% on every digit but 3."""
    asked, real_labels, real_call = [], sample.Sampler.labels, evaluate.Judge.__call__
    monkeypatch.setattr(sample.Sampler, "labels", lambda self, *a, **k: asked.append(real_labels(self, *a, **k))
                        or asked[-1])

    def judge(self, images, seed=0):
        metrics, _ = real_call(self, images, seed)
        return metrics, asked[-1].clone() if follows else torch.full((len(images),), 3)
    monkeypatch.setattr(evaluate.Judge, "__call__", judge)
    out = workspace["out_dir"]
    assert run.main(["--mode", "eval", "--n-samples", "200", "--steps", "2", "--data-dir", workspace["data_dir"],
                     "--ckpt-dir", workspace["ckpt_dir"], "--out-dir", out, "--device", "cpu",
                     "--precision", "fp32"]) == 0
    report = json.load(open(os.path.join(out, "eval.json")))
    assert report["as_asked"] == ([1.0] * 10 if follows else [0.0] * 3 + [1.0] + [0.0] * 6)
