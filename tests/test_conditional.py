"""Class labels and classifier-free guidance: the network, the training-time label dropout, the sampler."""
import os

import pytest
import torch
from PIL import Image

import run
import sample
import train as training
from ckpt import latest_checkpoint, load_checkpoint
from conftest import TINY
from diffusion import Diffusion
from errors import UserError
from model import UNet, UNetConfig


def labelled_net():
    torch.manual_seed(0)
    net = UNet(UNetConfig(channels=(8, 16, 32), blocks=(1, 1, 1), num_classes=10))
    for p in net.parameters():  # random everywhere: the zero-initialised layers would hide the label
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def test_the_label_changes_the_output():
    net, x, t = labelled_net(), torch.randn(2, 1, 28, 28), torch.tensor([5, 500])
    with torch.no_grad():
        three, seven, none = net(x, t, torch.tensor([3, 3])), net(x, t, torch.tensor([7, 7])), net(x, t)
    assert not torch.allclose(three, seven, atol=1e-3) and not torch.allclose(three, none, atol=1e-3)
    assert torch.equal(none, net(x, t, torch.tensor([10, 10])))  # no label is the last entry
    d, g = Diffusion(20), lambda: torch.Generator().manual_seed(1)
    denoise = sample.denoiser(net, torch.device("cpu"), None)
    images = [d.sample(lambda x, t: denoise(x, t, torch.full((2,), k), 3.0), (2, 1, 28, 28), steps=5, generator=g())
              for k in (3, 7)]
    assert (images[0] - images[1]).abs().max() > 0.05  # same noise, another digit, another image


def test_guidance_weights_follow_the_documented_convention():
    net, x, t, y = labelled_net(), torch.randn(3, 1, 28, 28), torch.tensor([1, 10, 19]), torch.tensor([0, 4, 9])
    calls = []
    net.register_forward_hook(lambda m, inputs, out: calls.append(inputs[0].shape[0]))
    denoise = sample.denoiser(net, torch.device("cpu"), None)
    with torch.no_grad():
        cond, uncond = net(x, t, y), net(x, t)
        calls.clear()
        assert torch.equal(denoise(x, t, y, 0.0), uncond)  # W = 0: exactly the unconditional prediction
        assert torch.equal(denoise(x, t, y, 1.0), cond)  # W = 1: plain conditional
        assert calls == [3, 3]
        guided = denoise(x, t, y, 2.5)
    assert calls[-1] == 6  # one network call on the batch stacked twice for both branches
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_guidance_applies_only_inside_its_interval():
    net, x, y = labelled_net(), torch.randn(3, 1, 28, 28), torch.tensor([0, 4, 9])
    denoise = sample.denoiser(net, torch.device("cpu"), None, interval=(5, 10))
    with torch.no_grad():
        for step, guided in ((4, False), (5, True), (10, True), (11, False)):
            t = torch.full((3,), step)
            cond, uncond = net(x, t, y), net(x, t)
            expected = uncond + 2.0 * (cond - uncond) if guided else cond  # plain conditional outside
            torch.testing.assert_close(denoise(x, t, y, 2.0), expected, rtol=1e-4, atol=1e-5)


def test_label_dropout_rate():
    y = torch.randint(0, 10, (200_000,))
    for p in (0.0, 0.1, 0.5):
        dropped = training.drop_labels(y, p, 10)
        share = (dropped == 10).double().mean().item()
        assert abs(share - p) < 0.005
        kept = dropped != 10
        assert torch.equal(dropped[kept], y[kept])


def record_labels(monkeypatch):
    seen, real_step = [], training.train_step

    def step(diffusion, model, ema, opt, x0, y, *rest):
        seen.append(y)
        return real_step(diffusion, model, ema, opt, x0, y, *rest)
    monkeypatch.setattr(training, "train_step", step)
    return seen


def test_training_drops_labels_at_the_set_rate(workspace, tmp_path, monkeypatch, mnist_root):
    seen = record_labels(monkeypatch)
    ckpt_dir = str(tmp_path / "half")
    assert run.main(["--mode", "train", "--epochs", "8", "--label-dropout", "0.5", "--data-dir", mnist_root,
                     "--ckpt-dir", ckpt_dir, *TINY]) == 0
    y = torch.cat(seen)
    assert len(y) == 8 * 64 and 0.4 < (y == 10).double().mean().item() < 0.6
    assert set(y.tolist()) == set(range(11))
    ckpt = load_checkpoint(latest_checkpoint(ckpt_dir))
    assert ckpt["model_config"]["num_classes"] == 10 and ckpt["train_config"]["label_dropout"] == 0.5

    seen.clear()
    ckpt_dir = str(tmp_path / "plain")
    assert run.main(["--mode", "train", "--epochs", "1", "--unconditional", "--data-dir", mnist_root,
                     "--ckpt-dir", ckpt_dir, *TINY]) == 0
    assert seen == [None] * 4
    ckpt = load_checkpoint(latest_checkpoint(ckpt_dir))
    assert ckpt["model_config"]["num_classes"] == 0 and ckpt["train_config"]["conditional"] is False
    assert not any(k.startswith("label_emb") for k in ckpt["model"])


def test_digit_grid_and_the_ten_rows(workspace, tmp_path):
    assert "digits.png" in os.listdir(workspace["out_dir"])  # a labelled run: sample wrote the ten rows
    assert Image.open(os.path.join(workspace["out_dir"], "digits.png")).size == (302, 302)  # 10 x 10, padding 2
    out = str(tmp_path / "seven")
    assert run.main(["--mode", "sample", "--digit", "7", "--guidance", "3", "--n-samples", "9", "--steps", "3",
                     "--checkpoint", workspace["checkpoint"], "--out-dir", out, "--data-dir", workspace["data_dir"],
                     "--device", "cpu", "--precision", "fp32"]) == 0
    assert Image.open(os.path.join(out, "sample.png")).size == (92, 92) and "digits.png" not in os.listdir(out)


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory, mnist_root):
    ckpt_dir = str(tmp_path_factory.mktemp("unlabelled"))
    assert run.main(["--mode", "train", "--epochs", "1", "--unconditional", "--data-dir", mnist_root,
                     "--ckpt-dir", ckpt_dir, *TINY]) == 0
    return latest_checkpoint(ckpt_dir)


@pytest.mark.parametrize("argv, expect", [
    (["--mode", "sample", "--digit", "3"], "trained without labels (--unconditional), so --digit"),
    (["--mode", "eval", "--guidance", "2"], "trained without labels (--unconditional), so --guidance"),
])
def test_labels_asked_of_an_unlabelled_checkpoint(capsys, unlabelled, mnist_root, argv, expect):
    assert run.main([*argv, "--checkpoint", unlabelled, "--data-dir", mnist_root, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and unlabelled in err and "\n" not in err


def test_default_sampling_guides_only_from_a_tenth_to_six_tenths_of_t(trained, monkeypatch):
    """Without --guidance-interval the sampler guides (one network call on the batch stacked twice) exactly at
    t in [0.1 T, 0.6 T], and runs once, conditional, everywhere else."""
    calls, forward = [], UNet.forward

    def recording(self, x, t, y=None):
        calls.append((x.shape[0], int(t[0])))
        return forward(self, x, t, y)
    monkeypatch.setattr(UNet, "forward", recording)
    sp = sample.load_sampler(sample.SampleSettings(checkpoint=trained["checkpoint"], sampler="ddim", steps=20))
    assert sp.guidance == sample.DEFAULT_GUIDANCE not in (0, 1) and sp.interval == (2, 12)  # T = 20
    sp.generate(4, 0, labels=sp.labels(4, 0))
    assert sorted(t for b, t in calls if b == 8) == list(range(2, 13))
    assert sorted(t for b, t in calls if b == 4) == [0, 1, *range(13, 20)]


@pytest.mark.parametrize("spacing", [None, "logsnr", "karras"])
def test_spacing_picks_the_timesteps_the_network_is_called_at(trained, monkeypatch, spacing):
    calls, forward = [], UNet.forward

    def recording(self, x, t, y=None):
        calls.append(int(t[0]))
        return forward(self, x, t, y)
    monkeypatch.setattr(UNet, "forward", recording)
    sp = sample.load_sampler(sample.SampleSettings(checkpoint=trained["checkpoint"], steps=8, spacing=spacing,
                                                   guide=sample.NO_GUIDE))
    sp.generate(2, 0, labels=sp.labels(2, 0))
    expected = [t for t, _ in sp.diffusion.timestep_pairs(8, spacing or "trailing")]
    assert sorted(set(calls), reverse=True) == expected and len(expected) == 8  # T = 20
    assert (spacing is None) == (expected == [19, 17, 14, 12, 9, 7, 4, 2])
    assert ("spacing" in sp.plan.describe("dpm2m")) == (spacing is not None)


def test_an_unknown_spacing_is_refused_before_any_sampling():
    """The settings object bypasses argparse's choices, so the plan checks the spacing itself."""
    with pytest.raises(UserError, match="unknown --spacing 'linear'; choose one of linspace, trailing"):
        sample.sampler_plan("dpm2m", None, None, None, 1000, "linear")
    assert sample.sampler_plan("ddim", None, None, None, 1000).spacing == "linspace"
    assert sample.sampler_plan("heun", None, None, None, 1000, "karras").spacing == "karras"


def test_autoguidance_adds_the_step_away_from_the_guide_at_every_timestep():
    net, x, y = labelled_net(), torch.randn(3, 1, 28, 28), torch.tensor([0, 4, 9])
    torch.manual_seed(1)
    guide = UNet(UNetConfig(channels=(8, 16, 32), blocks=(1, 1, 1), num_classes=10))
    for p in guide.parameters():
        torch.nn.init.normal_(p, std=0.2)
    guide.eval()
    seen = []
    guide.register_forward_hook(lambda m, inputs, out: seen.append(inputs[2]))
    denoise = sample.denoiser(net, torch.device("cpu"), None, interval=(5, 10), guide=guide, guide_weight=2.5)
    with torch.no_grad():
        for step, in_interval in ((4, False), (5, True), (10, True), (11, False)):
            t = torch.full((3,), step)
            cond, uncond, away = net(x, t, y), net(x, t), guide(x, t, y)
            cfg = uncond + 2.0 * (cond - uncond) if in_interval else cond  # the label's push: in the interval
            torch.testing.assert_close(denoise(x, t, y, 2.0), cfg + 1.5 * (cond - away), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(denoise(x, t, y, 1.0), cond + 1.5 * (cond - away), rtol=1e-4, atol=1e-5)
        seen.clear()
        unlabelled = uncond + 1.5 * (uncond - guide(x, t, None))  # no label: the guide runs without one too
        torch.testing.assert_close(denoise(x, t, y, 0.0), unlabelled, rtol=1e-4, atol=1e-5)
        assert seen[-1] is None
        plain = sample.denoiser(net, torch.device("cpu"), None, interval=(5, 10))
        assert torch.equal(plain(x, t, y, 2.0), cond)  # no guide: no autoguidance term


def randomised(path):
    """The checkpoint at path with random EMA weights, so that every layer (and the label) changes the output."""
    ckpt = load_checkpoint(path)
    torch.manual_seed(0)
    ckpt["ema"] = {k: torch.randn_like(v) * 0.2 if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    return ckpt


def with_weaker(path, tmp_path, name, weaker_name, **fields):
    """The checkpoint at path with random EMA weights (and `fields`) saved as tmp_path/name, and a copy with those
    weights halved, a weaker guide, as tmp_path/weaker_name: (its path, the weaker's path, the weaker's dict)."""
    ckpt = {**randomised(path), **fields}  # a 4-step run's zero-initialised layers would hide the label
    paths = str(tmp_path / name), str(tmp_path / weaker_name)
    torch.save(ckpt, paths[0])
    ckpt["ema"] = {k: v * 0.5 if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    torch.save(ckpt, paths[1])
    return *paths, ckpt


def test_a_checkpoint_guided_by_itself_draws_its_plain_conditional_digits(trained, tmp_path):
    """eps_c + (A - 1) (eps_c - eps_g) with g = c is eps_c: the same images as without a guide, whatever A."""
    path, weaker, ckpt = with_weaker(trained["checkpoint"], tmp_path, "random.pt", "weaker.pt")

    def draw(**kw):
        sp = sample.load_sampler(sample.SampleSettings(checkpoint=path, steps=4, interval=sample.EVERYWHERE, **kw))
        return sp.generate(6, 0, labels=sp.labels(6, 0)), sp
    (plain, sp), (itself, _) = draw(guidance=1.0), draw(guidance=1.0, guide=path, guide_weight=3.0)
    assert torch.equal(itself, plain) and not torch.allclose(draw(guidance=3.0)[0], plain, atol=1e-3)
    # A weaker guide: the images are those of the denoiser built by hand from the two EMA networks.
    (guided, _), (twice, _) = draw(guidance=1.5, guide=weaker, guide_weight=3.0), draw(guidance=1.5, guide=weaker)
    by_hand = sample.denoiser(sample.ema_network(load_checkpoint(path), sp.device), sp.device, None, sample.EVERYWHERE,
                              sample.ema_network(ckpt, sp.device), 3.0)
    expected = sample.generate(by_hand, sp.diffusion, 6, sp.plan, sp.device, 0, sp.labels(6, 0), 1.5)
    torch.testing.assert_close(guided, expected)
    assert not torch.allclose(guided, twice, atol=1e-3)  # the weight asked for, not the default 2


def test_an_unlabelled_checkpoint_is_autoguided_too(unlabelled, tmp_path):
    weaker = str(tmp_path / "weaker.pt")
    torch.save(randomised(unlabelled), weaker)

    def draw(**kw):
        sp = sample.load_sampler(sample.SampleSettings(checkpoint=unlabelled, steps=4, **kw))
        assert sp.labels(4, 0) is None
        return sp.generate(4, 0)
    plain = draw()
    assert torch.equal(draw(guide=unlabelled, guide_weight=3.0), plain)
    assert not torch.allclose(draw(guide=weaker, guide_weight=3.0), plain, atol=1e-3)


def test_own_guide_is_the_runs_checkpoint_nearest_half_the_steps(tmp_path):
    for step in (937, 1874, 2811, 3748, 4159):
        (tmp_path / f"ckpt_{step:08d}.pt").touch()
    (tmp_path / "ckpt_final.pt").touch()  # not a step: never picked
    assert sample.own_guide(str(tmp_path / "ckpt_00004159.pt"), 4159) == str(tmp_path / "ckpt_00001874.pt")
    assert sample.own_guide(str(tmp_path / "ckpt_00003748.pt"), 3748) == str(tmp_path / "ckpt_00001874.pt")
    assert sample.own_guide(str(tmp_path / "ckpt_00002811.pt"), 2811) == str(tmp_path / "ckpt_00000937.pt")
    assert sample.own_guide(str(tmp_path / "ckpt_00001874.pt"), 1874) == str(tmp_path / "ckpt_00000937.pt")
    # Nothing between a third and two thirds of the steps: no guide (a one-epoch run, or one pruned by --keep).
    assert sample.own_guide(str(tmp_path / "ckpt_00000937.pt"), 937) is None
    assert sample.own_guide(str(tmp_path / "elsewhere" / "x.pt"), 4159) is None


def test_default_sampling_is_autoguided_by_the_runs_own_half_way_checkpoint(trained, tmp_path):
    """A labelled checkpoint whose run kept one near half its steps is guided by it, at GUIDED_GUIDANCE; the same
    images as asking for that guide by hand. --guide-checkpoint none turns it off."""
    main, half, _ = with_weaker(trained["checkpoint"], tmp_path, "ckpt_00000008.pt", "ckpt_00000004.pt", step=8)

    def draw(**kw):
        sp = sample.load_sampler(sample.SampleSettings(checkpoint=main, steps=4, **kw))
        return sp.generate(6, 0, labels=sp.labels(6, 0)), sp
    (auto, sp), (given, given_sp) = draw(), draw(guide=half)
    assert (sp.guide, sp.guide_weight, sp.guidance) == (half, sample.DEFAULT_GUIDE_WEIGHT, sample.GUIDED_GUIDANCE)
    assert given_sp.guidance == sample.GUIDED_GUIDANCE and torch.equal(auto, given)
    (off, sp), (plain, _) = draw(guide=sample.NO_GUIDE), draw(guidance=sample.DEFAULT_GUIDANCE, guide=sample.NO_GUIDE)
    assert (sp.guide, sp.guide_weight, sp.guidance) == (None, None, sample.DEFAULT_GUIDANCE)
    assert torch.equal(off, plain) and not torch.allclose(off, auto, atol=1e-3)
    heavier, sp = draw(guide_weight=3.0)  # the weight applies to the run's own guide too
    assert sp.guide == half and not torch.allclose(heavier, auto, atol=1e-3)
    # "No label" draws get no default guide (it was measured on labelled draws only).
    assert draw(guidance=0)[1].guide is None and draw(guidance=0, guide=half)[1].guide == half


def test_an_unlabelled_run_gets_no_default_guide(unlabelled, tmp_path):
    ckpt = load_checkpoint(unlabelled)
    for step in (4, 8):
        torch.save({**ckpt, "step": step}, str(tmp_path / f"ckpt_{step:08d}.pt"))
    sp = sample.load_sampler(sample.SampleSettings(checkpoint=str(tmp_path / "ckpt_00000008.pt"), steps=4))
    assert sp.guide is None and sp.guidance is None


def test_an_unreadable_default_guide_is_one_line_naming_the_way_out(capsys, trained, mnist_root, tmp_path):
    run_dir = tmp_path / "run_001"
    run_dir.mkdir()
    torch.save({**load_checkpoint(trained["checkpoint"]), "step": 8}, str(run_dir / "ckpt_00000008.pt"))
    (run_dir / "ckpt_00000004.pt").write_bytes(b"half a file")
    out = tmp_path / "out"
    assert run.main(["--mode", "sample", "--checkpoint", str(run_dir / "ckpt_00000008.pt"), "--data-dir", mnist_root,
                     "--device", "cpu", "--out-dir", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the default guide") and "ckpt_00000004.pt is not a readable checkpoint" in err
    assert err.endswith("--guide-checkpoint none") and "\n" not in err and not out.exists()
    assert run.main(["--mode", "sample", "--checkpoint", str(run_dir / "ckpt_00000008.pt"), "--data-dir", mnist_root,
                     "--device", "cpu", "--out-dir", str(out), "--steps", "2", "--n-samples", "4",
                     "--guide-checkpoint", "none"]) == 0


@pytest.fixture(scope="module")
def eps_twin(trained, tmp_path_factory):
    """The trained checkpoint claiming another objective: a guide whose outputs mean something else."""
    ckpt = load_checkpoint(trained["checkpoint"])
    ckpt["diffusion_config"]["objective"] = "eps" if ckpt["diffusion_config"]["objective"] != "eps" else "x0"
    path = str(tmp_path_factory.mktemp("twin") / "eps.pt")
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("case, expect", [
    ("unlabelled guide", "differs from the checkpoint in labels"),
    ("objective", "differs from the checkpoint in objective"),
    ("weight 1", "--guide-weight must be above 1"),
    ("unlabelled main", "differs from the checkpoint in labels"),
    ("weight alone", "kept no checkpoint near half its steps to guide it"),
    ("weight and none", "--guide-checkpoint none turns it off"),
    ("missing", "given to --guide-checkpoint"),
])
def test_a_guide_that_cannot_apply_is_one_line(capsys, trained, unlabelled, eps_twin, mnist_root, tmp_path, case,
                                               expect):
    main, guide, extra = trained["checkpoint"], {"unlabelled guide": unlabelled, "objective": eps_twin,
                                                 "missing": str(tmp_path / "nope.pt")}.get(case, trained["checkpoint"]), []
    if case in ("weight 1", "weight alone", "weight and none"):
        extra = ["--guide-weight", "1" if case == "weight 1" else "2"]
    if case == "weight and none":
        guide = "none"
    if case == "unlabelled main":
        main, guide = unlabelled, trained["checkpoint"]
    out = tmp_path / "out"
    argv = ["--mode", "sample", "--checkpoint", main, "--data-dir", mnist_root, "--device", "cpu", "--out-dir",
            str(out), *([] if case == "weight alone" else ["--guide-checkpoint", guide]), *extra]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and "\n" not in err and not out.exists()
