"""The sample mode end to end on a tiny trained run: every figure, and the same seed giving the same images."""
import os

import numpy as np
import torch
from PIL import Image

import run
import sample
from ckpt import load_checkpoint
from diffusion import Diffusion


def test_sample_writes_every_figure_with_the_right_size(trained):
    out = trained["out_dir"]
    assert sorted(os.listdir(out)) == ["digits.png", "forward.png", "process.gif", "process.png", "sample.png"]
    assert Image.open(os.path.join(out, "sample.png")).size == (482, 482)  # 16 x 16 grid, padding 2
    gif = Image.open(os.path.join(out, "process.gif"))
    # 8 x 8 grid; up to noise + 5 DDIM steps (GIF merges frames that quantize identically)
    assert gif.size == (242, 242) and 2 <= gif.n_frames <= 6
    for name in ("process.png", "forward.png"):
        image = Image.open(os.path.join(out, name))
        assert image.format == "PNG" and min(image.size) > 300


def test_same_seed_same_images_and_another_seed_differs(workspace, tmp_path):
    images = []
    for seed, name in ((7, "a"), (7, "b"), (8, "c")):
        out = str(tmp_path / name)
        assert run.main(["--mode", "sample", "--checkpoint", workspace["checkpoint"], "--out-dir", out,
                         "--n-samples", "4", "--steps", "3", "--sample-seed", str(seed),
                         "--data-dir", workspace["data_dir"], "--device", "cpu", "--precision", "fp32"]) == 0
        images.append(torch.from_numpy(np.array(Image.open(os.path.join(out, "sample.png")))))
    assert torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2])


def test_the_class_prior_draws_each_digit_in_proportion():
    """Each digit is asked for n p_k times, rounded down or up (never off by 10 in 1,000 as independent draws
    are), in random order; over seeds each count is n p_k on average, so small n stay unbiased."""
    prior = [0.05, 0.15, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    sp = sample.Sampler("c.pt", {"class_prior": prior}, None, None, None, 2.0, (0, 999), torch.device("cpu"))
    labels = sp.labels(20_000, seed=0)
    assert torch.bincount(labels, minlength=10).tolist() == [1000, 3000] + [2000] * 8
    assert torch.equal(labels, sp.labels(20_000, seed=0)) and not torch.equal(labels, sp.labels(20_000, seed=1))
    assert (labels[:-1] != labels[1:]).double().mean() > 0.8  # shuffled, not in runs of one digit
    mnist = torch.tensor([0.0987, 0.1124, 0.0993, 0.1022, 0.0974, 0.0904, 0.0986, 0.1044, 0.0975, 0.0992])
    for n, seed in ((1000, 0), (1000, 1), (256, 2), (37, 3)):
        counts = torch.bincount(sample.stratified_labels(mnist.double(), n, torch.Generator().manual_seed(seed)),
                                minlength=10)
        assert counts.sum() == n and ((counts - n * mnist).abs() < 1).all()
    few = torch.stack([torch.bincount(sample.stratified_labels(torch.tensor(prior, dtype=torch.float64), 3,
                                                               torch.Generator().manual_seed(s)), minlength=10)
                       for s in range(4000)]).double().mean(0) / 3
    torch.testing.assert_close(few, torch.tensor(prior, dtype=torch.float64), atol=0.01, rtol=0)
    rounded = torch.tensor([0.0, 0.333, 0.333, 0.333] + [0.0] * 6)  # sums to 0.999; digits never to be asked for
    for seed in range(50):
        counts = torch.bincount(sample.stratified_labels(rounded, 3, torch.Generator().manual_seed(seed)), minlength=10)
        assert counts.tolist() == [0, 1, 1, 1] + [0] * 6
    assert torch.equal(sp.labels(5, 0, digit=7), torch.full((5,), 7))
    assert sample.Sampler("c.pt", {}, None, None, None, 0.0, (0, 999), None).labels(5, 0) is None  # "no label"


def test_a_labelled_run_records_its_class_prior(trained):
    prior = load_checkpoint(trained["checkpoint"])["class_prior"]
    assert prior == [7 / 64] * 4 + [6 / 64] * 6  # the synthetic set: 64 images, labels 0-9 in turn


def test_digits_png_is_the_same_batch_sorted_by_digit():
    x = torch.arange(12, dtype=torch.float32).view(12, 1, 1, 1).expand(12, 1, 28, 28)
    labels = torch.tensor([3, 1, 3, 0, 3, 3, 1, 9, 9, 9, 9, 2])
    rows = sample.by_digit(x, labels, per_row=3).view(10, 3, 1, 28, 28)[..., 0, 0, 0]
    assert rows[3].tolist() == [0, 2, 4] and rows[1].tolist() == [1, 6, -1] and rows[5].tolist() == [-1] * 3


def test_many_samples_are_drawn_in_batches(workspace, tmp_path, monkeypatch):
    """--n-samples beyond one batch: the first batch gives the strips and animation, the rest follow in batches,
    so memory stays that of one batch."""
    monkeypatch.setattr(sample, "BATCH", 4)
    shapes, real_loop = [], Diffusion.sample_loop
    monkeypatch.setattr(Diffusion, "sample_loop", lambda self, model, shape, **kw: shapes.append(shape[0])
                        or real_loop(self, model, shape, **kw))
    out = str(tmp_path / "many")
    assert run.main(["--mode", "sample", "--checkpoint", workspace["checkpoint"], "--out-dir", out, "--n-samples",
                     "9", "--steps", "2", "--data-dir", workspace["data_dir"], "--device", "cpu",
                     "--precision", "fp32"]) == 0
    assert shapes == [4, 5]  # 4 with frames, then the other 5 (generate's own batches hold up to 500)
    assert Image.open(os.path.join(out, "sample.png")).size == (92, 92)  # 9 images, 3 x 3
