"""The sample mode end to end on a tiny trained run: every figure, and the same seed giving the same images."""
import os

import numpy as np
import torch
from PIL import Image

import run


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
