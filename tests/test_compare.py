"""compare.py: levers, their combinations, the steps that match the default's time, and budgets at a machine's speeds."""
import json

import pytest
import torch

import bench
import compare
from ckpt import FORMAT, save_checkpoint
from errors import UserError
from sample import Sampler
from train import DEFAULTS, NO_LABEL, diffusion_for


def test_levers_combine_left_to_right_and_unknown_ones_are_named():
    assert compare.lever("default") == {}
    assert compare.lever("uniform weighting + batch 128 + eps prediction") == {"weighting": "uniform",
                                                                                "batch_size": 128, "objective": "eps"}
    assert compare.lever("old default + batch 128 + lr 2e-3")["lr"] == 2e-3
    with pytest.raises(UserError, match="unknown lever 'batch 16'"):
        compare.lever("uniform weighting + batch 16")


def test_each_lever_gets_the_steps_that_take_the_defaults_cpu_time():
    speeds = {"default": 100.0, "batch 128": 110.0, "attention at 7 px": 80.0, "uniform weighting": 100.0}
    assert compare.lever_steps("default", 1000, speeds) == 1000
    assert compare.lever_steps("uniform weighting", 1000, speeds) == 1000
    batch = DEFAULTS["batch_size"]
    # Twice the batch: half the steps for the same images, at 110% of the images/s.
    assert compare.lever_steps("batch 128", 1000, speeds) == round(1000 * 1.1 * batch / 128)
    # A combination not measured as such: the product of its parts' relative speeds.
    assert compare.lever_steps("batch 128 + attention at 7 px", 1000, speeds) == round(1000 * 1.1 * 0.8 * batch / 128)
    assert compare.lever_steps("batch 128", 1000, None) == 1000  # no speeds: equal steps


def test_the_cost_of_a_step_depends_on_the_network_and_batch_only():
    assert compare.cost_key("uniform weighting") == compare.cost_key("default") == compare.cost_key("lr 2e-3")
    assert compare.cost_key("batch 128") != compare.cost_key("default")
    assert compare.cost_key("32 channels at 28 px") != compare.cost_key("default")
    assert compare.cost_key("attention at 7 px") != compare.cost_key("default")
    assert compare.cost_key("upsampling convs at high res") != compare.cost_key("default")
    assert not [name for name in compare.KNOWN if "," in name or " + " in name]  # --only splits on both


def test_an_unmeasured_recipe_takes_the_speed_of_a_measured_one_of_the_same_cost():
    speeds = {"default": 400.0, "old default": 420.0}
    assert compare.speed_of("eps prediction", speeds) == 400.0  # same network and batch as the default
    assert compare.speed_of("batch 128", speeds) == 420.0  # same network and batch as the old default
    assert compare.lever_steps("mean prediction", 7601, speeds) == 7601
    with pytest.raises(UserError, match="no speed for 'mlp 1024 x 3'"):
        compare.speed_of("mlp 1024 x 3", speeds)


def test_budgets_at_a_machines_speeds_become_each_recipes_steps(tmp_path, monkeypatch):
    """--minutes with --speeds: the steps those minutes buy at each recipe's images/s there, a step budget that
    any machine can train; --train-steps with --speeds: the default's steps, the others at equal time."""
    calls = []

    def fake(root, name, minutes, given, n, data_dir, device, amp, steps=None, extra=None):
        calls.append((name, minutes, steps, given.get("batch_size")))
        return {"samples": {"fid": 10.0 * len(calls), "confident": 0.9}}

    monkeypatch.setattr(compare, "train_and_eval", fake)
    path = tmp_path / "speeds.json"
    path.write_text('{"default": 405.4, "old default": 420.9}')
    rows, series = compare.budget_runs(str(tmp_path), ["default", "old default"], "5,20", None, str(path), 0, 100,
                                       "data", "cpu", None)
    assert [c[:3] for c in calls] == [("default, seed 0, 1900 steps", None, 1900),
                                      ("default, seed 0, 7601 steps", None, 7601),
                                      ("old default, seed 0, 986 steps", None, 986),
                                      ("old default, seed 0, 3946 steps", None, 3946)]
    assert series["old default"] == [(5.0, 30.0, 0.9), (20.0, 40.0, 0.9)]  # (minutes, FID, confident)
    calls.clear()
    compare.budget_runs(str(tmp_path), ["old default"], None, "7601", str(path), 0, 100, "data", "cpu", None)
    assert calls[0][2] == round(7601 * 420.9 / 405.4 * DEFAULTS["batch_size"] / 128)  # 3946: the same time
    calls.clear()
    compare.budget_runs(str(tmp_path), ["default"], "3", None, None, 0, 100, "data", "cpu", None)
    assert calls == [("default, 3 min", 3.0, None, None)]  # no speeds: wall-clock minutes on this machine


def test_a_budget_that_buys_no_step_is_refused_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "train_and_eval", lambda *a, **k: pytest.fail("trained"))
    path = tmp_path / "speeds.json"
    path.write_text('{"default": 0.5, "old default": 100.0}')  # 1 minute of the default: 0.47 steps
    with pytest.raises(UserError, match="buys 'default' no training step"):
        compare.budget_runs(str(tmp_path), ["old default", "default"], "1", None, str(path), 0, 100, "data", "cpu",
                            None)


def test_a_reused_run_gets_only_the_evals_it_lacks(tmp_path, monkeypatch):
    """A run whose eval.json exists is not trained or evaluated again, but an extra eval asked for later (the
    variants' DDPM column on a run the recipe screen made) is added."""
    d = tmp_path / "default-seed-0-5-steps"
    (d / "run_001").mkdir(parents=True)
    ckpt = str(d / "run_001" / "ckpt_00000005.pt")
    save_checkpoint({"format": FORMAT, "step": 5, "elapsed": 60.0, "ema": {"w": torch.zeros(3)},
                     "log": [{"images_per_s": 40.0, "seconds": 10.0}]}, ckpt)
    (d / "eval.json").write_text(json.dumps({"checkpoint": ckpt, "samples": {"fid": 1.0}}))
    (d / "guidance-1").mkdir()
    (d / "guidance-1" / "eval.json").write_text("{}")
    evaluated = []
    monkeypatch.setattr(compare, "train", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(compare, "evaluate", lambda s, cache_dir: evaluated.append((s.out_dir, s.sampler, s.guidance)))
    row = compare.train_and_eval(str(tmp_path), "default, seed 0, 5 steps", None, {}, 100, "data", "cpu", None,
                                 steps=5, extra={**compare.GUIDANCE_1, "ddpm": {"sampler": "ddpm"}})
    assert evaluated == [(str(d / "ddpm"), "ddpm", None)]
    assert row["train_steps"] == 5 and row["parameters"] == 3 and row["images_per_s"] == 40.0


def grids_of(tmp_path, a, monkeypatch, *flags):
    """compare.py grids on checkpoint a and an eps/l1 copy of it with other weights: the (path, sampler) each was
    drawn from, in order, the grids and titles given to the figure, and where it was saved."""
    other = compare.load_checkpoint(a)
    other["step"] = 1234
    other["ema"] = {k: v + 0.1 for k, v in other["ema"].items()}
    for cfg in (other["train_config"], other["diffusion_config"]):
        cfg.update(objective="eps", loss="l1", weighting="uniform")
    b = str(tmp_path / "b.pt")
    save_checkpoint(other, b)
    drawn, loaded, real_load = [], [], compare.load_sampler

    def recording(settings):
        sp = real_load(settings)
        loaded.append((settings.checkpoint, sp.sampler))
        return sp
    monkeypatch.setattr(compare, "load_sampler", recording)
    monkeypatch.setattr(compare.figures, "panels", lambda grids, titles: drawn.append((grids, titles)) or "fig")
    monkeypatch.setattr(compare, "save_figure", lambda fig, path: drawn.append((fig, path)))
    compare.main(["grids", "--checkpoint", f"{a}, {b}", "--out-dir", str(tmp_path / "figs"), "--device", "cpu",
                  "--precision", "fp32", *flags])
    (grids, titles), (fig, path) = drawn
    assert fig == "fig"
    return b, loaded, grids, titles, path


def test_grids_draws_checkpoints_side_by_side_titled_by_what_they_record(workspace, tmp_path, monkeypatch):
    """compare.py grids: checkpoints trained elsewhere, each drawn as its sample.png is (its own sampler), in
    order, into one figure, each titled by the settings it records."""
    a = workspace["checkpoint"]
    b, loaded, grids, titles, path = grids_of(tmp_path, a, monkeypatch)
    assert loaded == [(a, "heun"), (b, "heun")]  # the default sampler
    assert [g.shape for g in grids] == [(64, 1, 28, 28)] * 2 and not torch.equal(grids[0], grids[1])
    assert titles == ["v prediction, mse loss\np2 weighting, unet\n4 steps",
                      "eps prediction, l1 loss\nuniform weighting, unet\n1,234 steps"]
    assert path == str(tmp_path / "figs" / "grids.png")


def test_grids_draws_every_checkpoint_with_the_sampler_asked_for(workspace, tmp_path, monkeypatch):
    a = workspace["checkpoint"]
    b, loaded, _, _, _ = grids_of(tmp_path, a, monkeypatch, "--sampler", "ddim")
    assert loaded == [(a, "ddim"), (b, "ddim")]


def test_grid_titles_name_the_mlp_and_what_older_checkpoints_trained_with(workspace, tmp_path):
    mlp = compare.load_checkpoint(workspace["checkpoint"])
    mlp["train_config"].update(arch="mlp", width=8, depth=1)
    save_checkpoint(mlp, str(tmp_path / "mlp.pt"))
    assert compare.describe_checkpoint(str(tmp_path / "mlp.pt")).split("\n")[1] == "p2 weighting, mlp 8 x 1"
    variant = compare.load_checkpoint(workspace["checkpoint"])
    variant["train_config"].update(attention=True, up_conv="high", scale_shift=True, label_silu=True, emb_dim=256)
    save_checkpoint(variant, str(tmp_path / "variant.pt"))
    assert compare.describe_checkpoint(str(tmp_path / "variant.pt")).split("\n")[1] == (
        "p2 weighting, unet, attention, up-conv high, scale-shift, label-silu, emb 256")
    old = compare.load_checkpoint(workspace["checkpoint"])  # from before these were recorded
    for key in ("objective", "loss", "weighting", "arch"):
        del old["train_config"][key]
    del old["train_config"]["up_conv"]  # the convs were high before the key
    save_checkpoint(old, str(tmp_path / "old.pt"))
    assert compare.describe_checkpoint(str(tmp_path / "old.pt")) == ("eps prediction, mse loss\n"
                                                                     "uniform weighting, unet, up-conv high\n4 steps")


@pytest.mark.parametrize("given, error", [("{a},{missing}", "does not exist"), ("{a},", "no stray comma"),
                                          ("{a},{heart}", "trained on heart")])
def test_grids_refuses_what_it_cannot_draw_before_sampling_anything(workspace, tmp_path, monkeypatch, given, error):
    heart = compare.load_checkpoint(workspace["checkpoint"])
    heart["train_config"]["dataset"] = "heart"
    save_checkpoint(heart, str(tmp_path / "heart.pt"))
    monkeypatch.setattr(compare, "load_sampler", lambda *a: pytest.fail("loaded a sampler"))
    paths = given.format(a=workspace["checkpoint"], missing=tmp_path / "nothing.pt", heart=tmp_path / "heart.pt")
    with pytest.raises(SystemExit, match=error):
        compare.main(["grids", "--checkpoint", paths, "--out-dir", str(tmp_path)])


def test_grids_loads_every_sampler_before_drawing_any(workspace, tmp_path, monkeypatch):
    """A checkpoint whose sampler refuses (an old-form mean network asked for dpm2m) is reported before the
    checkpoints ahead of it are drawn."""
    old_mean = compare.load_checkpoint(workspace["checkpoint"])
    old_mean["diffusion_config"].update(objective="mean", weighting="vlb", mean_skip="ct")
    save_checkpoint(old_mean, str(tmp_path / "mean.pt"))
    monkeypatch.setattr(Sampler, "generate", lambda *a, **k: pytest.fail("drew before every sampler was loaded"))
    with pytest.raises(SystemExit, match="posterior mean"):
        compare.main(["grids", "--checkpoint", f"{workspace['checkpoint']},{tmp_path / 'mean.pt'}", "--sampler",
                      "dpm2m", "--out-dir", str(tmp_path), "--device", "cpu", "--precision", "fp32"])


@pytest.mark.parametrize("lines", [1, 3])
def test_the_side_by_side_figure_keeps_every_title_inside_it(lines):
    """figures.panels: square grids under titles of up to three lines (grids' titles), none cut off at the top."""
    fig = compare.figures.panels([torch.zeros(64, 1, 28, 28)] * 4, ["\n".join(["7,601 steps"] * lines)] * 4)
    fig.canvas.draw()
    inside = fig.bbox
    for ax in fig.axes:
        box = ax.title.get_window_extent(fig.canvas.get_renderer())
        assert inside.y0 <= box.y0 and box.y1 <= inside.y1
    compare.figures.plt.close(fig)


def test_lever_speeds_time_each_lever_as_it_trains(monkeypatch):
    """A lever's speed is timed on its own noise process, batch and label dropout, as run.py would train it."""
    seen = []
    monkeypatch.setattr(bench, "train_step", lambda diffusion, model, ema, opt, x0, y, *rest:
                        seen.append((diffusion.config(), len(x0), y)))
    rates = []
    monkeypatch.setattr(bench, "drop_labels", lambda y, p, no_label: rates.append(p) or torch.full_like(y, no_label))
    speeds = compare.lever_speeds(["old default + label dropout 0.2"], torch.device("cpu"), None, steps=1, repeats=1)
    assert speeds["old default + label dropout 0.2"] > 0 and seen
    cfg = {**DEFAULTS, **compare.lever("old default")}
    for config, batch, y in seen:
        assert config == diffusion_for(cfg).config() != diffusion_for(DEFAULTS).config()  # eps, uniform weighting
        assert batch == 128 and (y == NO_LABEL).all()  # the labels went through the dropping
    assert set(rates) == {0.2}
