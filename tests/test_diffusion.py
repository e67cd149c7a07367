"""The noise process: schedule, forward noising, posterior, and the shared sampling loop."""
import pytest
import torch

from diffusion import Diffusion


@pytest.mark.parametrize("T", [1000, 200, 50, 10])
def test_schedule_is_increasing_and_ends_near_pure_noise(T):
    d = Diffusion(T)
    assert d.betas.dtype == torch.float32 and d.betas.shape == (T,)
    assert (d.betas[1:] > d.betas[:-1]).all() or T == 10  # T=10 hits the 0.999 cap at the end
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
