"""The noise process: schedule, forward noising, posterior, the shared sampling loop, and the solvers: each
recovers the data from an exact predictor along the whole trajectory, reduces to DDIM where it should, and the
second-order ones converge on the probability-flow ODE at second order."""
import math

import pytest
import torch

from conftest import alpha_bar_at, exact_eps
from diffusion import Diffusion, DPMSolverPP, Heun


@pytest.mark.parametrize("T", [1000, 200, 50, 20])
def test_schedule_is_increasing_and_ends_near_pure_noise(T):
    d = Diffusion(T)
    assert d.betas.dtype == torch.float32 and d.betas.shape == (T,)
    assert (d.betas[1:] > d.betas[:-1]).all() or T == 20  # T=20: the last beta, 1.0, is capped at 0.999
    assert (d.betas > 0).all() and (d.betas < 1).all()
    assert (d.alpha_bar[1:] < d.alpha_bar[:-1]).all()
    assert d.alpha_bar[-1] < 1e-3, "x_T must be (almost) pure noise, whatever T is"
    assert d.alpha_bar[0] > 0.9


def test_paper_schedule_at_t1000():
    d = Diffusion(1000)
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)


def test_q_sample_statistics():
    d = Diffusion(1000)
    x0 = torch.full((20000, 1, 4, 4), 0.5)
    for t in (0, 100, 500, 999):
        tt = torch.full((x0.shape[0],), t)
        xt = d.q_sample(x0, tt, torch.randn_like(x0))
        ab = d.alpha_bar[t].item()
        assert xt.mean().item() == pytest.approx(0.5 * ab ** 0.5, abs=0.01)
        assert xt.std().item() == pytest.approx((1 - ab) ** 0.5, rel=0.02, abs=0.002)


def test_timestep_pairs():
    d = Diffusion(1000)
    full = d.timestep_pairs(1000)
    assert full[0] == (999, 998) and full[-1] == (0, -1) and len(full) == 1000
    for steps in (2, 10, 50, 999):
        pairs = d.timestep_pairs(steps)
        assert len(pairs) == steps and pairs[0][0] == 999 and pairs[-1] == (0, -1)
        assert all(t > t_prev for t, t_prev in pairs)
    assert d.timestep_pairs(1) == [(999, -1)]  # one step: straight from noise to the prediction
    with pytest.raises(ValueError):
        d.timestep_pairs(1001)


def test_ddim_with_eta_1_over_every_step_is_the_ddpm_posterior_step():
    d = Diffusion(1000)
    g = torch.Generator().manual_seed(0)
    xt, eps, z = (torch.randn(8, 1, 28, 28, generator=g) for _ in range(3))
    for t in (999, 500, 10, 1):
        tt = torch.full((8,), t)
        x_prev, x0 = d.step(eps, xt, t, t - 1, eta=1.0, noise=z)
        ab = d.alpha_bar[t]
        x0_ref = ((xt - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)  # eq. (15) of DDPM, clipped
        mean, var = d.q_posterior(x0_ref, xt, tt)
        torch.testing.assert_close(x0, x0_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x_prev, mean + var.sqrt() * z, atol=2e-5, rtol=1e-4)


def oracle(d, target):
    """The exact eps-predictor when the data is one image: eps = (x_t - sqrt(ab) x*) / sqrt(1 - ab)."""
    def model(x, t):
        ab = d._at(d.alpha_bar, t, x)
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()
    return model


@pytest.mark.parametrize("steps,eta", [(None, 1.0), (50, 0.0), (10, 0.5), (1, 0.0)])
def test_samplers_recover_the_data_from_an_exact_denoiser(steps, eta):
    d = Diffusion(100)
    target = torch.rand(4, 1, 28, 28) * 2 - 1
    x = d.sample(oracle(d, target), target.shape, steps=steps, eta=eta,
                 generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, target, atol=1e-4, rtol=0)


def test_sample_loop_yields_every_step_and_is_reproducible():
    d = Diffusion(50)
    dummy = lambda x, t: x * t.view(-1, 1, 1, 1) / (t.view(-1, 1, 1, 1) + 1)  # noqa: E731
    frames = list(d.sample_loop(dummy, (3, 1, 28, 28), steps=7, eta=1.0,
                                generator=torch.Generator().manual_seed(5)))
    assert [t for t, _, _ in frames] == [t_prev for _, t_prev in d.timestep_pairs(7)]
    again = d.sample(dummy, (3, 1, 28, 28), steps=7, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(frames[-1][1], again)
    other = d.sample(dummy, (3, 1, 28, 28), steps=7, eta=1.0, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(again, other)


def gaussian_eps(d, s):
    """The exact eps-predictor for data N(0, s^2): eps = sqrt(1 - ab) x / (ab s^2 + 1 - ab)."""
    def model(x, t):
        ab = alpha_bar_at(d, t.float())
        return (1 - ab).sqrt() * x / (ab * s ** 2 + 1 - ab)
    return model


def trajectory(d, model, solver, steps, spacing="trailing", seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    return [x for _, x, _ in d.sample_loop(model, (4, 1, 28, 28), steps=steps, solver=solver, spacing=spacing,
                                           generator=g, **kw)]


@pytest.mark.parametrize("solver", ["dpm2m", "heun"])
@pytest.mark.parametrize("steps", [1, 5, 20])
def test_deterministic_solvers_follow_ddim_exactly_when_the_prediction_is_exact(solver, steps):
    """With one data point the exact x0-prediction never changes, so the second-order terms vanish and every
    step, not only the last, must be DDIM's (eta 0): a check of the whole trajectory."""
    d, target = Diffusion(100), torch.rand(4, 1, 28, 28) * 2 - 1
    ours = trajectory(d, exact_eps(d, target), solver, steps)
    ddim = trajectory(d, exact_eps(d, target), "ddim", steps, eta=0.0)
    assert len(ours) == len(ddim) == steps
    for a, b in zip(ours, ddim):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[-1], target, atol=1e-4, rtol=0)


@pytest.mark.parametrize("steps", [5, 20])
def test_the_sde_solver_follows_ddim_with_eta_1_when_the_prediction_is_exact(steps):
    d, target = Diffusion(100), torch.rand(4, 1, 28, 28) * 2 - 1
    ours = trajectory(d, exact_eps(d, target), "dpm2m-sde", steps)
    ddim = trajectory(d, exact_eps(d, target), "ddim", steps, eta=1.0)  # the same noise, drawn in the same order
    for a, b in zip(ours, ddim):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_first_order_dpm_solver_pp_is_ddim():
    """The first step of each multistep solver is first order: DDIM with eta 0 (ODE) or eta 1 (SDE)."""
    d, x, eps, z = Diffusion(1000), *torch.randn(3, 3, 1, 28, 28).unbind(0)
    model = lambda x_, t: eps  # noqa: E731
    for sde, eta in ((False, 0.0), (True, 1.0)):
        x_prev, x0 = DPMSolverPP(d, sde)(model, x, 700, 600, lambda: z)
        ref_prev, ref_x0 = d.step(eps, x, 700, 600, eta, z)
        torch.testing.assert_close(x_prev, ref_prev, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(x0, ref_x0)


def test_second_order_solvers_converge_on_the_probability_flow_ode_at_second_order():
    """For Gaussian data N(0, s^2) the probability-flow ODE is known: x_t / std_t stays constant, std_t^2 =
    ab s^2 + 1 - ab. Doubling the steps halves DDIM's error at t=199 (first order) and quarters that of
    DPM-Solver++(2M) and Heun (second order)."""
    d, s = Diffusion(1000), 0.3
    x_T = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    std = (d.alpha_bar * s ** 2 + 1 - d.alpha_bar).sqrt()
    exact = x_T * std[199] / std[999]

    def error(solver, steps):
        kw = {"eta": 0.0} if solver == "ddim" else {}
        for t, x, _ in d.sample_loop(gaussian_eps(d, s), x_T.shape, steps=steps, solver=solver, spacing="trailing",
                                     noise=x_T, **kw):
            if t == 199:  # on the trailing grid of 20 and 40 steps
                return (x - exact).abs().max().item()

    ratio = {solver: error(solver, 20) / error(solver, 40) for solver in ("ddim", "dpm2m", "heun")}
    assert 1.6 < ratio["ddim"] < 2.5 and ratio["dpm2m"] > 3.2 and ratio["heun"] > 3.2, ratio
    assert error("dpm2m", 20) < error("ddim", 20) / 4


def test_heun_churn_adds_noise_and_still_recovers_the_data():
    d, target = Diffusion(100), torch.rand(4, 1, 28, 28) * 2 - 1
    plain = trajectory(d, exact_eps(d, target), "heun", 10)
    churned = trajectory(d, exact_eps(d, target), "heun", 10, churn=5.0)
    assert not torch.allclose(plain[3], churned[3], atol=1e-3)
    torch.testing.assert_close(churned[-1], target, atol=1e-4, rtol=0)
    assert Heun(d, churn=100.0, steps=10).gamma == pytest.approx(math.sqrt(2) - 1)  # EDM's cap


def test_trailing_spacing_starts_at_the_last_timestep_and_spends_no_call_at_t0():
    d = Diffusion(1000)
    pairs = d.timestep_pairs(20, "trailing")
    assert pairs[0][0] == 999 and pairs[-1] == (49, -1) and len(pairs) == 20
    assert all(t - t_prev == 50 for t, t_prev in pairs[:-1])
    for T, steps in ((20, 19), (30, 29), (1000, 7), (1000, 1000), (50, 1)):
        ts = [t for t, _ in Diffusion(T).timestep_pairs(steps, "trailing")]
        assert ts[0] == T - 1 and len(set(ts)) == steps and ts == sorted(ts, reverse=True) and ts[-1] >= 0


@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
def test_sigma_spacings_put_each_step_at_the_timestep_nearest_its_even_target(spacing):
    d = Diffusion(1000)
    ts = [t for t, _ in d.timestep_pairs(20, spacing)]
    ls = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    ls = 0.5 * ((1 - ls) / ls).log()  # log sigma_t, from the schedule written out
    if spacing == "logsnr":  # evenly in lambda = -log sigma
        targets = torch.linspace(ls[-1].item(), ls[0].item(), 20, dtype=torch.float64)
    else:  # evenly in sigma^(1/7), EDM's eq. 5
        s_max, s_min = ls[-1].exp().item(), ls[0].exp().item()
        ramp = torch.linspace(0, 1, 20, dtype=torch.float64)
        targets = ((s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7).log()
    assert ts == [int((ls - target).abs().argmin()) for target in targets]  # no repeats at 20 steps of 1000
    ends = {"logsnr": ([999, 947, 893], [10, 4, 1, 0]), "karras": ([999, 971, 940], [41, 16, 4, 0])}[spacing]
    assert (ts[:3], ts[-4:]) == ends  # the lists docs/recipe.md quotes


@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
def test_sigma_spacings_keep_every_call_distinct_from_t_minus_1_to_0(spacing):
    # Where a step is finer than one timestep (near t=0, or steps near T), repeats move: every call distinct.
    for T, steps in ((20, 20), (20, 19), (20, 8), (100, 99), (1000, 1000), (1000, 1), (1000, 60)):
        ts = [t for t, _ in Diffusion(T).timestep_pairs(steps, spacing)]
        assert ts[0] == T - 1 and len(ts) == steps and ts == sorted(set(ts), reverse=True) and ts[-1] >= 0
        assert steps == 1 or ts[-1] == 0
    assert [t for t, _ in Diffusion(20).timestep_pairs(20, spacing)] == list(range(19, -1, -1))


def test_the_spacings_differ_in_how_many_steps_they_spend_at_low_noise():
    d = Diffusion(1000)
    low = lambda spacing: sum(t < 200 for t, _ in d.timestep_pairs(20, spacing))  # noqa: E731
    assert low("trailing") == 4 and low("logsnr") > low("karras") > low("trailing")


@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
def test_the_solvers_recover_the_data_on_the_sigma_spacings(spacing):
    d, target = Diffusion(100), torch.rand(4, 1, 28, 28) * 2 - 1
    for solver, kw in (("dpm2m", {}), ("heun", {}), ("ddim", {"eta": 0.0})):
        x = trajectory(d, exact_eps(d, target), solver, 10, spacing=spacing, **kw)
        assert len(x) == 10
        torch.testing.assert_close(x[-1], target, atol=1e-4, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("t,t_prev", [(999, 949), (500, 300), (60, 0), (20, -1)])
def test_each_strided_step_is_the_closed_form_ddim_update(t, t_prev, eta):
    """Eq. (12) of Song et al. written out in float64 from the schedule, against the step function, one step at
    a time (not only the end of a trajectory, which an exact predictor would reach whatever came before)."""
    d = Diffusion(1000)
    xt, eps, z = torch.randn(3, 2, 1, 28, 28, generator=torch.Generator().manual_seed(t)).double().unbind(0)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    a_t, a_p = ab[t], ab[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
    x0 = ((xt - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)  # "predicted x0", clipped
    eps_hat = (xt - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()  # eq. (16)
    expected = a_p.sqrt() * x0 + (1 - a_p - sigma ** 2).clamp(min=0).sqrt() * eps_hat + sigma * z
    x_prev, x0_out = d.step(eps.float(), xt.float(), t, t_prev, eta, z.float())
    torch.testing.assert_close(x_prev, expected.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x0_out, x0.float(), atol=2e-5, rtol=1e-4)


def test_a_posterior_mean_converts_to_its_x0_by_eq_7():
    """mean = c0 x0 + ct x_t with c0 = beta_t sqrt(ab_{t-1}) / (1 - ab_t), ct = (1 - ab_{t-1}) sqrt(alpha_t) / (1 - ab_t)."""
    x0 = torch.rand(2, 1, 28, 28, dtype=torch.float64) * 1.6 - 0.8
    xt = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    for t in (999, 300, 1):
        c0 = betas[t] * ab[t - 1].sqrt() / (1 - ab[t])
        ct = (1 - ab[t - 1]) * (1 - betas[t]).sqrt() / (1 - ab[t])
        mean = c0 * x0 + ct * xt
        # The network outputs the noise of eq. 11 (the default), (mean - ct x_t) / c0, mean - ct x_t, mean - x_t
        # or the mean whole: mean = skip x_t + scale out.
        eq_11 = ((1 - betas[t]) ** -0.5, -betas[t] / ((1 - betas[t]) * (1 - ab[t])).sqrt())
        for skip, part, scale in (("eps", *eq_11), ("ct-c0", ct, c0), ("ct", ct, 1.0), ("xt", 1.0, 1.0),
                                  ("none", 0.0, 1.0)):
            d, out = Diffusion(1000, objective="mean", mean_skip=skip), (mean - part * xt) / scale
            torch.testing.assert_close(d.predict_x0(out, xt, t), x0, atol=1e-6 / c0.item(), rtol=0)
            torch.testing.assert_close(d.mean(out, xt, t), mean)


def test_the_mean_objectives_last_ancestral_step_returns_the_clipped_x0():
    d = Diffusion(50, objective="mean")
    xt, out = torch.randn(2, 2, 1, 28, 28).unbind(0)
    x, x0 = d.step(out * 5, xt, 0, -1, 1.0, None)
    assert torch.equal(x, x0) and x.abs().max() <= 1


OBJECTIVES_AND_SKIPS = ["eps", "x0", "v", "mean", "mean/ct-c0", "mean/ct", "mean/xt", "mean/none"]  # mean/ct: that mean_skip


def diffusion_for(objective, **kw):
    objective, _, skip = objective.partition("/")
    return Diffusion(1000, objective=objective, **({"mean_skip": skip} if skip else {}), **kw)


def per_x0(d):
    """How many times the x0 error the objective's squared error is, at every t, found from the target
    itself: (d target / d x0)^2 at fixed x_t (for eps, x_t fixed means eps = (x_t - sqrt(ab) x0) / ...)."""
    t = torch.arange(1000)
    x0, xt = torch.zeros(1000, 1, 1, 1, dtype=torch.float64), torch.zeros(1000, 1, 1, 1, dtype=torch.float64)
    ab = d.alpha_bar.double().view(-1, 1, 1, 1)
    eps = lambda x0: (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
    slope = d.target(x0 + 1, xt, t, eps(x0 + 1)).double() - d.target(x0, xt, t, eps(x0)).double()
    return slope.flatten() ** 2


@pytest.mark.parametrize("objective", OBJECTIVES_AND_SKIPS)
def test_each_weighting_puts_its_weight_on_the_x0_error(objective):
    """An objective's squared error is a multiple of the x0 error (SNR for eps, 1 for x0, 1 + SNR for v, c0^2 for
    the mean, or 1 when the mean network's output is scaled by c0), so the weight on the objective's loss times
    that multiple is the weighting's w(t) on the x0 error: min(SNR, 5) or SNR/(1+SNR). Under the L1 loss the
    absolute errors are the square root of that multiple apart, and the weight makes up that instead."""
    base = diffusion_for(objective)
    ab = base.alpha_bar.double()
    snr = ab / (1 - ab)
    multiple = per_x0(base)
    for weighting, w in (("min-snr", snr.clamp(max=5)), ("p2", snr / (1 + snr))):
        d = diffusion_for(objective, weighting=weighting)
        assert d.t_probs is None
        assert torch.allclose(d.t_weight.double() * multiple, w, rtol=2e-3)
        l1 = diffusion_for(objective, weighting=weighting, loss="l1")
        assert torch.allclose(l1.t_weight.double() * multiple.sqrt(), w, rtol=2e-3)


@pytest.mark.parametrize("objective", OBJECTIVES_AND_SKIPS)
def test_the_vlb_weighting_draws_t_in_proportion_to_ddpms_bound_on_the_mean(objective):
    """DDPM's L_{t-1} = || mu - mu_theta ||^2 / (2 beta_t) (eq. 8, sigma_t^2 = beta_t): on the mean's error the
    weight is 1 / (2 beta_t), on the x0 error c0^2 / (2 beta_t). It is drawn by importance: t with probability
    in proportion to that weight in the objective's units, each draw unweighted, the same loss in expectation."""
    d = diffusion_for(objective, weighting="vlb")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    c0 = betas * torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]]).sqrt() / (1 - ab)  # eq. 7
    assert d.t_weight is None and d.t_probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    on_x0 = d.t_probs.double() * per_x0(d)
    ratio = on_x0 / (c0 ** 2 / (2 * betas))
    assert torch.allclose(ratio, ratio[500].expand(1000), rtol=2e-3)
    if objective in ("mean/ct", "mean/xt", "mean/none"):  # output at the mean's scale: 1/beta_t on it
        assert d.t_probs[0] / d.t_probs[999] == pytest.approx(0.02 / 1e-4, rel=1e-3)


def test_the_loss_under_vlb_is_the_bound_on_uniform_t_in_expectation():
    """A network off by f(t) everywhere has the per-t loss f(t)^2; under vlb the loss over many draws is the
    bound's weighted mean of it over uniform t, mean_t w(t) f(t)^2 with w averaging 1."""
    d = Diffusion(1000, objective="eps", weighting="vlb")
    x0 = torch.rand(200_000, 1, 1, 1) * 2 - 1
    off = lambda t: (t.double() / 999).sqrt()
    sab, s1ab = d.sqrt_alpha_bar, d.sqrt_one_minus_alpha_bar
    network = lambda xt, t: (xt - sab[t].view(-1, 1, 1, 1) * x0) / s1ab[t].view(-1, 1, 1, 1) + off(t).view(-1, 1, 1, 1)
    torch.manual_seed(0)
    loss = d.loss(network, x0).item()
    # The bound on the noise: DDPM's 1 / (2 beta_t) on the mean times eq. 11's (beta_t / sqrt(alpha_t (1 - ab)))^2.
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    w = betas / (2 * (1 - betas) * (1 - torch.cumprod(1 - betas, 0)))
    w = w / w.mean()
    assert loss == pytest.approx((w * off(torch.arange(1000)) ** 2).mean().item(), rel=0.02)


@pytest.mark.parametrize("objective", OBJECTIVES_AND_SKIPS)
def test_p2_drawn_draws_t_in_proportion_to_p2s_weight(objective):
    """p2-drawn is p2's loss by importance: t with probability in proportion to p2's weight in the objective's
    units, each draw unweighted."""
    p2, drawn = diffusion_for(objective, weighting="p2"), diffusion_for(objective, weighting="p2-drawn")
    assert drawn.t_weight is None and drawn.t_probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    w = p2.t_weight.double()
    assert torch.allclose(drawn.t_probs.double(), w / w.sum(), rtol=1e-4)
    if objective == "x0":  # the weight on the x0 error is alpha_bar: few draws near pure noise
        assert drawn.t_probs[600:].sum() < 0.01 and drawn.t_probs[:300].sum() > 0.8


def test_the_loss_under_p2_drawn_is_p2s_loss_over_its_mean_weight_in_expectation():
    """A network off by f(t) everywhere: p2 on uniform t gives mean_t w(t) f(t)^2, p2-drawn the same over the
    weight's mean (each draw counts 1, not w(t))."""
    x0 = torch.rand(200_000, 1, 1, 1) * 2 - 1
    off = lambda t: 0.1 + (t.double() / 999)
    losses = []
    for weighting in ("p2", "p2-drawn"):
        d = Diffusion(1000, objective="x0", weighting=weighting)
        torch.manual_seed(0)
        losses.append(d.loss(lambda xt, t: x0 + off(t).view(-1, 1, 1, 1).float(), x0).item())
    w = Diffusion(1000, objective="x0", weighting="p2").t_weight.double()
    exact = (w * off(torch.arange(1000)) ** 2).mean().item()
    assert losses[0] == pytest.approx(exact, rel=0.02)
    assert losses[1] == pytest.approx(exact / w.mean().item(), rel=0.02)


def test_lognormal_draws_few_timesteps_near_pure_noise():
    d = Diffusion(1000, weighting="lognormal")
    assert d.t_weight is None and d.t_probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert d.t_probs[600:].sum() < 0.01  # uniform t puts 40% of the draws there
    # The median draw is where EDM's ln sigma = -1.2, sigma 0.30.
    median = int((d.t_probs.cumsum(0) >= 0.5).nonzero()[0])
    assert math.exp(d.log_sigma[median]) == pytest.approx(math.exp(-1.2), rel=0.05)


@pytest.mark.parametrize("weighting", ["p2", "p2-drawn"])
def test_a_stratified_batch_puts_one_timestep_in_each_1_bth_of_the_distribution_in_no_order(weighting):
    """Stratified: the i-th of B draws lies between the distribution's i/B and (i+1)/B quantiles (uniform t, or
    p2-drawn's), each batch in another place and shuffled; the same distribution as an independent draw."""
    d = Diffusion(1000, objective="x0", weighting=weighting, timestep_draw="stratified")
    probs = d.t_probs.double() if d.t_probs is not None else torch.full((1000,), 1e-3, dtype=torch.float64)
    cdf = probs.cumsum(0)
    B, counts, firsts = 16, torch.zeros(1000, dtype=torch.float64), set()
    torch.manual_seed(0)
    for _ in range(4000):
        t = d.draw_timesteps(B, torch.device("cpu"))
        assert t.dtype == torch.long and not torch.equal(t, t.sort().values)  # shuffled
        ts = t.sort().values
        below, upto = cdf[ts] - probs[ts], cdf[ts]  # the CDF just below and at each t
        i = torch.arange(B, dtype=torch.float64)
        assert (below <= (i + 1) / B + 1e-9).all() and (upto >= i / B - 1e-9).all()  # t in its own 1/B
        counts += torch.bincount(t, minlength=1000).double()
        firsts.add(int(ts[0]))
    assert len(firsts) > 10  # the offset moves from batch to batch
    share = counts / counts.sum()
    for lo, hi in ((0, 100), (100, 300), (300, 600), (600, 1000)):  # the weighting's distribution of t
        assert share[lo:hi].sum().item() == pytest.approx(probs[lo:hi].sum().item(), abs=0.005)


def test_stratified_timesteps_train_the_same_loss_in_expectation_with_less_spread():
    """A network off by f(t): the stratified batch's loss has the independent one's mean and a smaller spread
    between batches."""
    x0 = torch.rand(64, 1, 1, 1) * 2 - 1
    off = lambda t: 0.1 + (t.double() / 999)
    losses = {}
    for draw in ("independent", "stratified"):
        d = Diffusion(1000, objective="x0", weighting="uniform", timestep_draw=draw)
        torch.manual_seed(0)
        losses[draw] = torch.tensor([d.loss(lambda xt, t: x0 + off(t).view(-1, 1, 1, 1).float(), x0).item()
                                     for _ in range(2000)])
    exact = (off(torch.arange(1000)) ** 2).mean().item()
    assert losses["independent"].mean().item() == pytest.approx(exact, rel=0.01)
    assert losses["stratified"].mean().item() == pytest.approx(exact, rel=0.002)
    assert losses["stratified"].std() < 0.25 * losses["independent"].std()  # 0.12 here


def test_the_weighted_loss_is_the_weighted_mean_of_each_images_loss():
    d = Diffusion(100, weighting="min-snr")
    x0 = torch.rand(6, 1, 28, 28) * 2 - 1
    torch.manual_seed(3)
    loss = d.loss(lambda x, t: torch.zeros_like(x), x0)  # the network says 0: the loss is the noise's square
    torch.manual_seed(3)
    t = torch.randint(0, 100, (6,))
    noise = torch.randn_like(x0)
    expected = (d.t_weight[t] * noise.pow(2).mean(dim=(1, 2, 3))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("skip, same_as", [("ct-c0", "x0"), ("eps", "eps")])
@pytest.mark.parametrize("weighting", ["p2", "vlb"])
def test_a_mean_network_at_x0s_or_the_noises_scale_is_that_network_with_the_bounds_weighting(skip, same_as,
                                                                                          weighting):
    """mu_theta = c_t x_t + c_0 o makes o's target x_0 at every t, and DDPM's eq. 11, mu_theta = (x_t - beta_t /
    sqrt(1 - alpha_bar_t) o) / sqrt(alpha_t), makes it the noise: under one weighting each trains as that
    objective does (the same loss on the same draws) and gives the same x_0 to every sampler."""
    mean = Diffusion(1000, objective="mean", mean_skip=skip, weighting=weighting)
    other = Diffusion(1000, objective=same_as, weighting=weighting)
    images = torch.rand(8, 1, 28, 28) * 2 - 1
    network = lambda x, t: 0.5 * x + t.view(-1, 1, 1, 1) / 2000
    losses = []
    for d in (mean, other):
        torch.manual_seed(7)
        losses.append(d.loss(network, images).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    x0, noise = torch.rand(4, 1, 28, 28) * 1.6 - 0.8, torch.randn(4, 1, 28, 28)
    for t in (0, 300, 999):
        tt = torch.full((4,), t)
        xt = mean.q_sample(x0, tt, noise)
        out = mean.target(x0, xt, tt, noise)
        torch.testing.assert_close(out, other.target(x0, xt, tt, noise))
        torch.testing.assert_close(mean.predict_x0(out, xt, t), x0, atol=1e-4, rtol=0)
