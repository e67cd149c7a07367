"""The seeds' variants: what the network predicts, the loss, and the MLP network."""
import pytest
import torch

import run
import train
from ckpt import FORMAT, L1_OBJECTIVE, MLP_OBJECTIVE, latest_checkpoint, load_checkpoint, reconcile, save_checkpoint
from conftest import TINY, exact_eps
from diffusion import Diffusion
from errors import UserError
from model import MLP, MLPConfig, build_network, count_parameters
from train import DEFAULTS, MEAN_TIMESTEPS, for_dataset


def true_target(d, x0_true):
    """The exact predictor of each objective when the data is one known batch x0_true."""
    def model(xt, t):
        ab = d._at(d.alpha_bar, t, xt)
        eps = (xt - ab.sqrt() * x0_true) / (1 - ab).sqrt()
        return d.target(x0_true, xt, t, eps)
    return model


@pytest.mark.parametrize("objective", ["eps", "x0", "v", "mean", "mean/ct-c0", "mean/ct", "mean/xt", "mean/none"])
@pytest.mark.parametrize("steps,eta", [(None, 1.0), (10, 0.0), (10, 0.5), (1, 0.0)])
def test_each_objective_recovers_the_data_from_its_true_target(objective, steps, eta):
    objective, _, skip = objective.partition("/")  # mean/xt: a posterior-mean network with that skip
    d = Diffusion(100, objective=objective, **({"mean_skip": skip} if skip else {}))
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    x = d.sample(true_target(d, x0), x0.shape, steps=steps, eta=eta, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, x0, atol=1e-3, rtol=0)


@pytest.mark.parametrize("objective", ["eps", "x0", "v", "mean", "mean/ct-c0"])
@pytest.mark.parametrize("solver", ["dpm2m", "dpm2m-sde"])
def test_the_multistep_solvers_serve_every_objective(objective, solver):
    objective, _, skip = objective.partition("/")
    d = Diffusion(100, objective=objective, **({"mean_skip": skip} if skip else {}))
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    x = d.sample(true_target(d, x0), x0.shape, steps=10, solver=solver, spacing="trailing",
                 generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, x0, atol=1e-3, rtol=0)


def test_heun_serves_an_x0_network_and_refuses_a_mean_one_that_divides_by_c0():
    d, x0 = Diffusion(100, objective="x0"), torch.rand(4, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(d.sample(lambda x, t: x0, x0.shape, steps=5, solver="heun"), x0)
    for skip in ("ct", "xt", "none"):
        with pytest.raises(ValueError, match="heun solver needs an eps, x0 or v network"):
            Diffusion(100, objective="mean", mean_skip=skip).solver("heun", steps=5)
    # A mean network whose output is at x_0's scale gives x_0 as it is, at any timestep; one at the noise's
    # (the default) gives it as an eps network does.
    d = Diffusion(100, objective="mean", mean_skip="ct-c0")
    torch.testing.assert_close(d.sample(lambda x, t: x0, x0.shape, steps=5, solver="heun"), x0)
    d = Diffusion(100, objective="mean")
    torch.testing.assert_close(d.sample(exact_eps(d, x0), x0.shape, steps=5, solver="heun"), x0, atol=1e-3, rtol=0)


def test_heun_serves_a_v_network_at_continuous_timesteps():
    """Heun asks the network at the continuous timestep of each noise level; a v network's x_0 there is
    sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v, with alpha_bar of that level."""
    d, x0 = Diffusion(100, objective="v"), torch.rand(4, 1, 28, 28) * 2 - 1

    def exact_v(xt, t):  # alpha_bar at the fractional index t, interpolated in log sigma as the solver does
        i = t[0].item()
        lo, frac = min(int(i), 98), i - min(int(i), 98)
        log_sigma = (1 - frac) * d.log_sigma[lo].double() + frac * d.log_sigma[lo + 1].double()
        ab = 1 / (1 + torch.exp(2 * log_sigma))
        eps = (xt.double() - ab.sqrt() * x0) / (1 - ab).sqrt()
        return (ab.sqrt() * eps - (1 - ab).sqrt() * x0).float()
    torch.testing.assert_close(d.sample(exact_v, x0.shape, steps=5, solver="heun"), x0, atol=1e-3, rtol=0)


def test_the_mean_objective_takes_its_own_ddpm_step():
    xt, mean, z = torch.randn(3, 3, 1, 28, 28).unbind(0)
    d = Diffusion(50, objective="mean")
    c0, ct, beta, ab = d.posterior_coef_x0[20], d.posterior_coef_xt[20], d.betas[20], d.alpha_bar[20]
    # The network outputs the noise of DDPM's eq. 11, mean = (x_t - beta / sqrt(1 - alpha_bar) out) /
    # sqrt(1 - beta) (the default), or (older checkpoints) (mean - ct x_t) / c0, mean - ct x_t, mean - x_t, or
    # the mean whole.
    eps_form = ((1 - beta) ** -0.5, -beta / ((1 - beta) * (1 - ab)).sqrt())
    for skip, part, scale in (("eps", *eps_form), ("ct-c0", ct, c0), ("ct", ct, 1.0), ("xt", 1.0, 1.0),
                              ("none", 0.0, 1.0)):
        d = Diffusion(50, objective="mean", mean_skip=skip)
        x_prev, _ = d.step((mean - part * xt) / scale, xt, 20, 19, 1.0, z)  # consecutive steps, eta 1: mu_theta + sigma_t z
        torch.testing.assert_close(x_prev, mean + d.posterior_var[20].sqrt() * z)


def test_the_mean_network_learns_the_means_x0_part_and_old_checkpoints_keep_their_skip(tmp_path):
    d = Diffusion(50, objective="mean")
    x0, noise = torch.rand(2, 1, 28, 28) * 2 - 1, torch.randn(2, 1, 28, 28)
    t = torch.tensor([3, 40])
    xt = d.q_sample(x0, t, noise)
    c0 = d.posterior_coef_x0[t].view(-1, 1, 1, 1)
    assert d.config()["mean_skip"] == "eps"
    # Its target is the noise, and eq. 11 makes the true posterior mean (eq. 7) of it, at every t.
    torch.testing.assert_close(d.target(x0, xt, t, noise), noise)
    for i in range(2):
        torch.testing.assert_close(d.mean(noise[i], xt[i], t[i].item()), d.q_posterior(x0, xt, t)[0][i], atol=1e-5,
                                   rtol=0)
    torch.testing.assert_close(Diffusion(50, objective="mean", mean_skip="ct-c0").target(x0, xt, t, None), x0)
    torch.testing.assert_close(Diffusion(50, objective="mean", mean_skip="ct").target(x0, xt, t, None), c0 * x0)
    # Checkpoints from before the skip had none; for a while it was True (x_t) or False (none).
    for stored, read in ((None, "none"), (False, "none"), (True, "xt"), ("ct", "ct"), ("ct-c0", "ct-c0")):
        cfg = {k: v for k, v in d.config().items() if k != "mean_skip"}
        if stored is not None:
            cfg["mean_skip"] = stored
        torch.save({"format": FORMAT, "diffusion_config": cfg}, tmp_path / "old.pt")
        assert Diffusion(**load_checkpoint(str(tmp_path / "old.pt"))["diffusion_config"]).mean_skip == read


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_the_loss_compares_the_output_with_the_objectives_target(loss):
    d = Diffusion(20, objective="x0", loss=loss)
    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    assert d.loss(lambda xt, t: x0, x0).item() == 0  # the perfect x0 predictor
    zero = d.loss(lambda xt, t: torch.zeros_like(xt), x0).item()
    expected = x0.pow(2).mean() if loss == "mse" else x0.abs().mean()
    assert zero == pytest.approx(expected.item(), rel=1e-6)


def test_the_default_mlp_is_512_wide_3_blocks_deep_and_sees_the_timestep():
    mlp = MLP(MLPConfig())
    assert 2.70e6 < count_parameters(mlp) < 2.73e6  # 784 -> 512, 3 blocks of 2 x 512^2, the time MLP, -> 784
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 1, 28, 28)
    out = mlp(x, torch.tensor([1, 900]))
    assert out.shape == x.shape and not torch.allclose(out[0], mlp(x, torch.tensor([900, 900]))[0])


@pytest.mark.parametrize("flags", [["--objective", "mean", "--loss", "l1"],
                                   ["--arch", "mlp", "--width", "32", "--depth", "2", "--objective", "x0"],
                                   ["--up-conv", "high", "--scale-shift", "--label-silu", "--emb-dim", "48", "--objective", "x0"]])
def test_a_checkpoint_records_and_restores_objective_loss_and_network(tmp_path, mnist_root, flags, monkeypatch,
                                                                      capsys):
    tiny = list(TINY)
    if "mlp" in flags:  # the U-Net's shape flags do not apply to the MLP
        for flag in ("--channels", "--blocks"):
            i = tiny.index(flag)
            del tiny[i:i + 2]
    ckpt_dir = str(tmp_path / "ckpt")
    assert run.main(["--mode", "train", "--epochs", "1", "--data-dir", mnist_root, "--ckpt-dir", ckpt_dir,
                     *tiny, *flags]) == 0
    path = latest_checkpoint(ckpt_dir)
    ckpt = load_checkpoint(path)
    objective = flags[flags.index("--objective") + 1]
    assert ckpt["diffusion_config"]["objective"] == objective
    assert ckpt["diffusion_config"]["loss"] == ("l1" if "l1" in flags else "mse")
    # The posterior mean trains under the variational bound's weighting unless told otherwise.
    assert ckpt["diffusion_config"]["weighting"] == ("vlb" if objective == "mean" else "p2")
    assert ckpt["model_config"]["arch"] == ("mlp" if "mlp" in flags else "unet")
    up_conv = None if "mlp" in flags else "high" if "--up-conv" in flags else "low"  # low: the default; the MLP has none
    assert ckpt["model_config"].get("up_conv") == up_conv
    assert ckpt["model_config"].get("scale_shift", False) == ("--scale-shift" in flags)
    assert ckpt["model_config"].get("label_silu", False) == ("--label-silu" in flags)
    assert ckpt["model_config"].get("emb_dim", 0) == (48 if "--emb-dim" in flags else 0)
    net = build_network(ckpt["model_config"])
    net.load_state_dict(ckpt["ema"])
    assert type(net).__name__ == ("MLP" if "mlp" in flags else "UNet")
    assert Diffusion(**ckpt["diffusion_config"]).objective == objective
    # Resuming keeps them, and sampling uses them, without being told.
    assert run.main(["--mode", "train", "--resume", "--epochs", "2", "--data-dir", mnist_root,
                     "--ckpt-dir", ckpt_dir, "--device", "cpu", "--precision", "fp32"]) == 0
    resumed_ckpt = load_checkpoint(latest_checkpoint(ckpt_dir))
    assert resumed_ckpt["model_config"].get("up_conv") == up_conv
    assert resumed_ckpt["model_config"].get("scale_shift", False) == ("--scale-shift" in flags)
    assert resumed_ckpt["model_config"].get("label_silu", False) == ("--label-silu" in flags)
    assert resumed_ckpt["model_config"].get("emb_dim", 0) == (48 if "--emb-dim" in flags else 0)
    resumed = resumed_ckpt["diffusion_config"]
    assert resumed["objective"] == objective
    assert resumed["timesteps"] == 20  # TINY's, not a new mean run's MEAN_TIMESTEPS
    applied, real_predict, real_x0_of = set(), Diffusion.predict_x0, Diffusion.x0_of  # x0_of: Heun's way to x0
    monkeypatch.setattr(Diffusion, "predict_x0", lambda self, *a: applied.add(self.objective) or real_predict(self, *a))
    monkeypatch.setattr(Diffusion, "x0_of", lambda self, *a: applied.add(self.objective) or real_x0_of(self, *a))
    sample = ["--mode", "sample", "--ckpt-dir", ckpt_dir, "--out-dir", str(tmp_path / "gen"), "--n-samples", "4",
              "--data-dir", mnist_root, "--device", "cpu", "--precision", "fp32"]
    # A posterior-mean network samples with its own ancestral step over every timestep, by default.
    assert run.main(sample + (["--steps", "3"] if objective != "mean" else [])) == 0
    assert applied == {objective}  # the sampler turned the network's output into x0 as the checkpoint says
    if objective == "mean":
        assert "ddpm with 20 steps" in capsys.readouterr().out
        few_steps = (["--sampler", "dpm2m-sde"], ["--sampler", "ddim", "--steps", "5"], ["--steps", "5"])
        for few in few_steps[:2]:  # its output is the noise of eq. 11: x_0 needs no division, any sampler serves it
            assert run.main(sample + few) == 0, capsys.readouterr().err
        # A mean network from before (its output the mean less c_t x_t, x_t's step or the whole mean) gives x_0 only divided
        # by c_0: samplers that skip steps are refused.
        path = latest_checkpoint(ckpt_dir)
        old = torch.load(path, weights_only=True)
        old["diffusion_config"]["mean_skip"] = True
        torch.save(old, path)
        capsys.readouterr()
        for few in few_steps:
            assert run.main(sample + few) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "predicts the posterior mean" in err and "--sampler ddpm" in err
        # Resumed, it keeps its own way of making the mean, and still samples with DDPM.
        assert run.main(["--mode", "train", "--resume", "--epochs", "3", "--data-dir", mnist_root,
                         "--ckpt-dir", ckpt_dir, "--device", "cpu", "--precision", "fp32"]) == 0
        assert load_checkpoint(latest_checkpoint(ckpt_dir))["diffusion_config"]["mean_skip"] == "xt"
        assert run.main(sample) == 0


def test_a_new_mean_run_on_mnist_trains_at_t_100_under_the_bound_unless_told():
    """T = MEAN_TIMESTEPS for a new posterior-mean MNIST run under its default weighting, the bound; a given T, another
    weighting (with which T = 100 was not measured) and the heart keep T = 1000 (resuming keeps the checkpoint's T:
    test_a_checkpoint_records_and_restores_objective_loss_and_network)."""
    def new_run(**given):
        return for_dataset(reconcile(given, DEFAULTS), given)["timesteps"]
    assert new_run(objective="mean") == MEAN_TIMESTEPS == 100
    assert new_run(objective="mean", timesteps=1000) == 1000
    assert new_run(objective="mean", weighting="p2") == new_run(objective="eps") == DEFAULTS["timesteps"] == 1000
    assert new_run(objective="mean", dataset="heart") == 1000


def test_an_mlp_run_predicts_x0_and_nothing_else(workspace, capsys):
    """Predicting v (the U-Net's default), eps or the posterior mean, the MLP drew noise (docs/variants.md): an MLP
    run predicts x0, is neither started (the CLI's message: tests/test_cli.py) nor resumed predicting
    anything else, while such a checkpoint is still described (and sampled); the U-Net keeps every objective."""
    def new_run(**given):
        return for_dataset(reconcile(given, DEFAULTS), given)
    assert new_run(arch="mlp")["objective"] == new_run(arch="mlp", objective="x0")["objective"] == MLP_OBJECTIVE == "x0"
    assert new_run()["objective"] == new_run(arch="unet")["objective"] == DEFAULTS["objective"] == "v"
    assert [new_run(objective=o)["objective"] for o in ("eps", "mean")] == ["eps", "mean"]
    older = load_checkpoint(workspace["checkpoint"])  # an MLP run begun before this rule, predicting v
    older["train_config"].update(arch="mlp", objective="v")
    save_checkpoint(older, workspace["checkpoint"])
    assert reconcile({}, DEFAULTS, older, workspace["checkpoint"])["objective"] == "v"
    for objective in ("eps", "v", "mean"):
        with pytest.raises(UserError, match=f"--objective {objective}: the MLP predicting {objective} draws noise"):
            new_run(arch="mlp", objective=objective)
    assert run.main(["--mode", "train", "--resume", "--checkpoint", workspace["checkpoint"], "--epochs", "9",
                     "--data-dir", workspace["data_dir"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume: ") and len(err.splitlines()) == 1
    assert err.endswith("is an MLP predicting v, which draws noise (docs/variants.md); train a new MLP run, which "
                        "predicts x0")


def test_an_l1_run_predicts_x0_unless_told(workspace, tmp_path, mnist_root, capsys):
    """L1 on v drew far worse digits than L1 on x0 (docs/variants.md): a new --loss l1 run predicts x0 unless
    --objective says otherwise, and L1 on v says what it measured; the heart keeps eps, and a checkpoint keeps
    what it predicts."""
    def new_run(**given):
        return for_dataset(reconcile(given, DEFAULTS), given)
    assert new_run(loss="l1")["objective"] == L1_OBJECTIVE == "x0" != DEFAULTS["objective"]
    assert [new_run(loss="l1", objective=o)["objective"] for o in ("v", "eps")] == ["v", "eps"]
    assert new_run(loss="mse")["objective"] == DEFAULTS["objective"]
    assert new_run(loss="l1", dataset="heart")["objective"] == "eps"
    older = load_checkpoint(workspace["checkpoint"])  # an L1 run begun before this rule, predicting v
    older["train_config"].update(loss="l1", objective="v")
    assert reconcile({}, DEFAULTS, older, workspace["checkpoint"])["objective"] == "v"
    for flags, says in (([], "predicts x0, l1 loss"), (["--objective", "v"], "predicts v, l1 loss")):
        assert run.main(["--mode", "train", "--train-steps", "1", "--data-dir", mnist_root, "--ckpt-dir",
                         str(tmp_path / "l1"), *TINY, "--loss", "l1", *flags]) == 0
        out = capsys.readouterr().out
        assert says in out and ("L1 on v drew far worse digits" in out) == bool(flags)


def test_a_short_v_run_names_x0(tmp_path, mnist_root, capsys, monkeypatch):
    """x0 drew better digits than v at 2,242 and 3,000 steps and v the lower FID at 4,685 (docs/recipe.md): a v
    run that ends within train.SHORT_RUN_STEPS says so at its end, and no other run does (x0, a longer v run)."""
    def notes(*flags):
        assert run.main(["--mode", "train", "--train-steps", "2", "--data-dir", mnist_root, "--ckpt-dir",
                         str(tmp_path / "short"), *TINY, *flags]) == 0
        out = capsys.readouterr().out
        assert "done: " in out
        return "add --objective x0" in out
    assert notes()
    assert not notes("--objective", "x0")
    monkeypatch.setattr(train, "SHORT_RUN_STEPS", 1)
    assert not notes()


@pytest.mark.parametrize("timesteps, flags, note", [
    ("1000", [], "--weighting p2 trains the same network and loss as --objective eps"),
    ("1000", ["--weighting", "p2"], None),
    ("100", [], "--weighting p2 --timesteps 1000 trains the same network and loss as --objective eps")])
def test_a_mean_run_under_the_bound_says_what_it_measured(tmp_path, mnist_root, capsys, timesteps, flags, note):
    """The bound's weighting drew worse digits than eps at T = 1000 and at T = 100 (docs/variants.md): a new run
    says so and names the flags that train the same network as eps; under another weighting there is nothing to
    say. A resumed older form (output at x_0's scale) gets its own note, not eq. 11's numbers."""
    ckpt_dir = str(tmp_path / "ckpt")
    tiny = list(TINY)
    tiny[tiny.index("--timesteps") + 1] = timesteps
    assert run.main(["--mode", "train", "--train-steps", "1", "--data-dir", mnist_root, "--ckpt-dir", ckpt_dir,
                     *tiny, "--objective", "mean", *flags]) == 0
    out = capsys.readouterr().out
    if note:
        assert "drew worse digits than eps" in out and note in out
    else:
        assert "note:" not in out
    if flags or timesteps != "1000":
        return
    old = load_checkpoint(latest_checkpoint(ckpt_dir))
    old["diffusion_config"]["mean_skip"] = "ct-c0"
    save_checkpoint(old, latest_checkpoint(ckpt_dir))
    assert run.main(["--mode", "train", "--resume", "--train-steps", "2", "--data-dir", mnist_root,
                     "--ckpt-dir", ckpt_dir, "--device", "cpu", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "whose output is not the noise" in out and "FID 100" not in out
