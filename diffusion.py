"""The DDPM noise process: linear-beta schedule, forward noising, the training loss and the samplers.

The network is always an argument (`model(x, t) -> output`), never an attribute, so this object holds
no trainable state. What the output means is the objective: the noise eps (DDPM's choice), the clean
image x0 (run.py's default), the velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho
2022), or the posterior mean of x_{t-1}; all four share the sampling loop.
References: Ho et al. 2020 (DDPM, arXiv:2006.11239), Song et al. 2021 (DDIM, arXiv:2010.02502), Lu et al.
2022 (DPM-Solver++, arXiv:2211.01095) and Karras et al. 2022 (EDM, arXiv:2206.00364); equation numbers
below are theirs.

Every sampler is a step function (model, x_t, t, t_prev, draw) -> (x_{t_prev}, predicted x_0) made by
`solver()` for one run, so the sampling loop is the same for all of them.
"""
import math

import torch
import torch.nn.functional as F

OBJECTIVES = ("eps", "x0", "v", "mean")
# How a posterior-mean network's output makes the mean (eq. 7, mean = c_t x_t + c_0 x_0), mean = skip x_t +
# scale output: the mean whole ("none"), the mean less x_t ("xt"), less c_t x_t ("ct"), that over c_0 ("ct-c0":
# EDM's c_skip and c_out, the output at x_0's scale), or DDPM's own eq. 11 ("eps": mean = (x_t - beta_t /
# sqrt(1 - alpha_bar_t) output) / sqrt(alpha_t), the output at the noise's scale). See Diffusion.__init__.
MEAN_SKIPS = ("none", "xt", "ct", "ct-c0", "eps")
# Where the training loss is spent over t. Each is a weight on the x0 error, w(t) || x0_hat - x0 ||^2, that
# the loss applies in the objective's own units (see Diffusion.loss); "uniform" is DDPM's unweighted loss.
#   uniform: t uniform, the objective's loss unweighted (for eps: w = SNR, Ho et al. 2020 eq. 14)
#   min-snr: t uniform, w = min(SNR, 5) (Hang et al. 2023, "Efficient diffusion training via Min-SNR")
#   p2: t uniform, w = SNR / (1 + SNR) (Choi et al. 2022, "Perception prioritized training", k=1, gamma=1)
#   p2-drawn: p2's loss by importance: t drawn in proportion to its weight in the objective's units, each draw
#             unweighted. For x0 that weight is alpha_bar_t: the 40% of uniform draws past t = 600, which p2
#             weighs under 0.03 (0.7% of its loss), become 0.7% of the draws, and the median draw is t = 149
#   lognormal: t drawn so that EDM's ln sigma ~ N(-1.2, 1.2) (Karras et al. 2022), the objective's loss
#              unweighted: few draws near pure noise, where uniform t spends about 40% of them
#   vlb: the variational bound's own weight, || mu - mu_theta ||^2 / (2 beta_t) on the posterior mean (DDPM
#        eq. 8 with sigma_t^2 = beta_t), i.e. w = c0^2 / (2 beta_t) on the x0 error, by importance: t drawn
#        in proportion to w in the objective's units, the loss unweighted. The default of the posterior-mean
#        objective, which fails unweighted (DDPM Table 2)
WEIGHTINGS = ("uniform", "min-snr", "p2", "p2-drawn", "lognormal", "vlb")
# How a batch's timesteps are drawn from the weighting's distribution (uniform unless it says otherwise):
#   independent: each on its own (DDPM)
#   stratified: one point in each 1/B of the distribution's quantiles, by one shared uniform offset, shuffled
#               (VDM's low-discrepancy sampler, Kingma et al. 2021): each t has the same distribution as an
#               independent draw, so the loss is the same in expectation, but every batch spreads its B draws
#               over the whole range instead of bunching them by chance
TIMESTEP_DRAWS = ("independent", "stratified")
MIN_SNR_GAMMA = 5.0
LOGNORMAL_MEAN, LOGNORMAL_STD = -1.2, 1.2
LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}
SOLVERS = ("ddim", "dpm2m", "dpm2m-sde", "heun")  # DDPM is DDIM over every step with eta 1
SPACINGS = ("linspace", "trailing", "logsnr", "karras")
KARRAS_RHO = 7.0  # EDM's rho: the sigma^(1/rho) of the steps are evenly spaced
MIN_TIMESTEPS = 20  # scaled by 1000/T, the paper's last beta (0.02) exceeds 1 below 20 steps


class Diffusion:
    def __init__(self, timesteps=1000, beta_start=1e-4, beta_end=0.02, objective="eps", loss="mse",
                 weighting="uniform", mean_skip="eps", timestep_draw="independent"):
        if timesteps < 1 or 1000 / timesteps * beta_end > 1 + 1e-9:
            raise ValueError(f"timesteps must be at least {1000 * beta_end:g}: the betas, scaled by 1000/T, "
                             f"would exceed 1")
        if (objective not in OBJECTIVES or loss not in LOSSES or weighting not in WEIGHTINGS
                or mean_skip not in MEAN_SKIPS or timestep_draw not in TIMESTEP_DRAWS):
            raise ValueError(f"objective must be one of {OBJECTIVES}, loss one of {tuple(LOSSES)}, weighting "
                             f"one of {WEIGHTINGS}, mean_skip one of {MEAN_SKIPS} and timestep_draw one of "
                             f"{TIMESTEP_DRAWS}")
        self.timestep_draw = timestep_draw
        self.timesteps, self.objective, self.loss_type, self.weighting = timesteps, objective, loss, weighting
        self.beta_start, self.beta_end = beta_start, beta_end
        # The posterior mean is c_t x_t + c_0 x_0 with c_t near 1 and c_0 down to 1e-4. A network that outputs
        # it whole ("none") must copy x_t to better than one step's noise, or its errors add up over the T
        # ancestral steps into saturated images (FID 2300 after 7,601 steps, docs/variants.md). Its step from
        # x_t ("xt", mean - x_t) still holds the shrink c_t - 1 (-0.010 at t=999 of T=1000): a gain off by
        # a few thousandths compounds over 1,000 steps, and it saturated too (FID 27,278 after 800 steps).
        # "ct" (a skip connection, EDM's c_skip) makes the shrink exact and leaves the network c_0 x_0, whose
        # scale runs from 1e-4 to 1 over t: grey blobs after 800 steps (FID 1,982). "ct-c0" also scales the
        # output by c_0 (EDM's c_out), so the output is x_0 at every t; but the bound's weight on it then
        # spans 10 orders of magnitude (636 at t=0, 6e-5 at t=500) and the middle timesteps go untrained
        # (FID 1,335 after 800 steps). "eps" (the default) is DDPM's own eq. 11: the output is the noise, on
        # which the bound's weight spans 100x, 50 at t=0 to 0.5 at t=500. Those two take every sampler;
        # the loss is always the bound's on the mean, and DDPM's step with the mean its own sampler.
        # Checkpoints record theirs (ckpt.load_checkpoint reads older ones).
        self.mean_skip = mean_skip
        # The paper's betas are for T=1000. Scaling them by 1000/T keeps alpha_bar at T near 0 for
        # smaller T, so sampling starts from (almost) pure noise; capped below 1 for tiny T.
        scale = 1000 / timesteps
        betas = torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)
        betas = betas.clamp(max=0.999)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        # Computed in float64 on the CPU, kept as float32 tensors (MPS has no float64). 1 - alpha_bar
        # is taken before the cast: near t=0 it is ~1e-4, which float32 alpha_bar would blur.
        self.betas = betas.float()
        self.alpha_bar = alpha_bar.float()
        self.sqrt_alpha_bar = alpha_bar.sqrt().float()
        self.sqrt_one_minus_alpha_bar = (1 - alpha_bar).sqrt().float()
        self._alpha_bar = alpha_bar.tolist()  # Python floats (float64) for the sampler's per-step scalars
        # EDM's noise level sigma = sqrt((1 - alpha_bar) / alpha_bar): x_t / sqrt(alpha_bar) = x_0 + sigma eps.
        log_sigma = 0.5 * ((1 - alpha_bar) / alpha_bar).log()
        self.log_sigma = log_sigma.float()  # increasing in t
        # Posterior q(x_{t-1} | x_t, x_0), eqs. (6)-(7) of DDPM.
        coef_x0 = betas * alpha_bar_prev.sqrt() / (1 - alpha_bar)
        self.posterior_var = (betas * (1 - alpha_bar_prev) / (1 - alpha_bar)).float()
        self.posterior_coef_x0 = coef_x0.float()
        coef_xt = (1 - alpha_bar_prev) * (1 - betas).sqrt() / (1 - alpha_bar)
        self.posterior_coef_xt = coef_xt.float()
        # A mean network's mean = skip x_t + scale output (mean_skip), with skip - c_t taken in float64 (x_0 is
        # that mean less c_t x_t, over c_0): Python floats for the sampler's steps, float32 tensors for the loss.
        zero, one = torch.zeros_like(betas), torch.ones_like(betas)
        skip, out_scale = {"none": (zero, one), "xt": (one, one), "ct": (coef_xt, one), "ct-c0": (coef_xt, coef_x0),
                           "eps": ((1 - betas) ** -0.5, -betas / ((1 - betas) * (1 - alpha_bar)).sqrt())}[mean_skip]
        self._mean_parts = list(zip(coef_x0.tolist(), skip.tolist(), (skip - coef_xt).tolist(), out_scale.tolist()))
        self.mean_scale, self.mean_skip_less_ct = out_scale.float(), (skip - coef_xt).float()
        self.t_weight, self.t_probs = self._weighting(alpha_bar, log_sigma, coef_x0, out_scale, betas)
        # t_probs' CDF, for the stratified draw's inverse: made once, in float32 (MPS has no float64)
        self.t_cdf = None if self.t_probs is None else self.t_probs.double().cumsum(0).float()

    def _weighting(self, alpha_bar, log_sigma, coef_x0, out_scale, betas):
        """The per-t loss weight in the objective's units and the distribution t is drawn from (None:
        uniform). An objective's squared error is a multiple of the x0 error: SNR times it for eps, once for
        x0, 1 + SNR times for v (x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v), (c0 / scale)^2 times for the
        posterior mean (c0 its x0 coefficient, scale its output's in the mean, out_scale), so w(t) on the x0
        error is w(t) / that multiple on the objective's loss (under the L1 loss, / its square root)."""
        snr = alpha_bar / (1 - alpha_bar)
        per_x0 = {"eps": snr, "x0": torch.ones_like(snr), "v": 1 + snr,
                  "mean": (coef_x0 / out_scale) ** 2}[self.objective]
        if self.loss_type == "l1":  # an absolute error is the square root of that multiple of the x0 error's
            per_x0 = per_x0.sqrt()
        if self.weighting == "min-snr":
            return (snr.clamp(max=MIN_SNR_GAMMA) / per_x0).float(), None
        if self.weighting in ("p2", "p2-drawn"):
            w = snr / (1 + snr) / per_x0
            return (w.float(), None) if self.weighting == "p2" else (None, (w / w.sum()).float())
        if self.weighting == "vlb":
            # Drawn by importance (Nichol & Dhariwal 2021, section 3.3): t ~ w(t), each draw unweighted, is the
            # same loss in expectation as w(t) on uniform t, without the weights' spread in each batch (for eps,
            # 50 at t = 0 against 0.5 at t = 500), whose rare large terms drive Adam's step size.
            w = coef_x0 ** 2 / (2 * betas) / per_x0
            return None, (w / w.sum()).float()
        if self.weighting == "lognormal":
            # The probability of N(mean, std) between the midpoints of neighbouring ln sigma_t.
            edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), (log_sigma[1:] + log_sigma[:-1]) / 2,
                               torch.tensor([math.inf], dtype=torch.float64)])
            cdf = torch.special.ndtr((edges - LOGNORMAL_MEAN) / LOGNORMAL_STD)
            return None, (cdf[1:] - cdf[:-1]).float()
        return None, None

    def config(self):
        return {"timesteps": self.timesteps, "beta_start": self.beta_start, "beta_end": self.beta_end,
                "objective": self.objective, "loss": self.loss_type, "weighting": self.weighting,
                "mean_skip": self.mean_skip, "timestep_draw": self.timestep_draw}

    @staticmethod
    def _at(a, t, x):
        """a[t] for a batch of timesteps t, shaped to broadcast against x: (B,) -> (B, 1, 1, 1)."""
        return a.to(t.device)[t].view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0), eq. (4): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return self._at(self.sqrt_alpha_bar, t, x0) * x0 + self._at(self.sqrt_one_minus_alpha_bar, t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0), eq. (7)."""
        mean = self._at(self.posterior_coef_x0, t, xt) * x0 + self._at(self.posterior_coef_xt, t, xt) * xt
        return mean, self._at(self.posterior_var, t, xt)

    def target(self, x0, xt, t, noise):
        """What the network learns to output for x_t: eps, x_0, v, or the posterior mean of x_{t-1} (eq. 7), less
        its skip and over its scale (mean_skip): for the forms whose output is the noise or x_0, exactly that."""
        if self.output_like == "eps":
            return noise
        elif self.output_like == "x0":
            return x0
        elif self.output_like == "v":
            return self._at(self.sqrt_alpha_bar, t, x0) * noise - self._at(self.sqrt_one_minus_alpha_bar, t, x0) * x0
        elif self.objective == "mean":
            c0, scale = self._at(self.posterior_coef_x0, t, xt), self._at(self.mean_scale, t, xt)
            # (mean - skip x_t) / scale = (c0 x_0 - (skip - c_t) x_t) / scale
            return (c0 * x0 - self._at(self.mean_skip_less_ct, t, xt) * xt) / scale
        else:
            raise ValueError(f"unknown objective {self.objective!r}")

    def loss(self, model, x0, part=slice(None)):
        """The simplified DDPM objective, eq. (14) for eps: || target - output ||^2 (or |.| for the l1
        loss), at t uniform and unweighted unless the weighting says otherwise (WEIGHTINGS), the batch's t drawn
        as timestep_draw says. On the part of the batch x0 that `part` slices, with t and noise drawn for the
        whole batch: the processes of a DDP run, each with its own part, draw what one process would."""
        t = self.draw_timesteps(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        x0, t, noise = x0[part], t[part], noise[part]
        xt = self.q_sample(x0, t, noise)
        out, target = model(xt, t).float(), self.target(x0, xt, t, noise)
        if self.t_weight is None:
            return LOSSES[self.loss_type](out, target)
        per_image = LOSSES[self.loss_type](out, target, reduction="none").flatten(1).mean(dim=1)
        return (self.t_weight.to(x0.device)[t] * per_image).mean()

    def draw_timesteps(self, n, device):
        """n training timesteps for one batch, from the weighting's distribution (t_probs, or uniform), drawn
        as timestep_draw says (TIMESTEP_DRAWS)."""
        if self.timestep_draw == "independent":
            if self.t_probs is None:
                return torch.randint(0, self.timesteps, (n,), device=device)
            return torch.multinomial(self.t_probs.to(device), n, replacement=True)
        u = (torch.arange(n, device=device) + torch.rand((), device=device)) / n  # one in each n-th of [0, 1)
        u = u[torch.randperm(n, device=device)]  # in no order: a DDP process's part of the batch covers all t
        if self.t_probs is None:
            return (u * self.timesteps).long().clamp(max=self.timesteps - 1)
        # the inverse of the distribution's CDF at u: the first t whose CDF passes it
        return torch.searchsorted(self.t_cdf.to(device), u, right=True).clamp(max=self.timesteps - 1)

    def timestep_pairs(self, steps, spacing="linspace"):
        """(t, t_prev) pairs from T-1 down; t_prev = -1 marks the final step, to x_0."""
        T = self.timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and the {T} timesteps of the schedule")
        if spacing == "linspace":  # evenly spaced, including T-1 (start from noise) and 0
            ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        elif spacing == "trailing":
            # T-1, T-1-T/steps, ... (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
            # flawed", Table 2): no network call is spent at t=0, where x_t already is the data.
            ts = [math.floor(T - i * T / steps + 0.5) - 1 for i in range(steps)]
        elif spacing in ("logsnr", "karras"):
            ts = self._sigma_spaced(steps, spacing)
        else:
            raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
        return list(zip(ts, ts[1:] + [-1]))

    def _sigma_spaced(self, steps, spacing):
        """Timesteps from T-1 down to 0 evenly spaced in log sigma (lambda = log(alpha/sigma), DPM-Solver's
        choice for pixel models) or in sigma^(1/7) (Karras et al. 2022, eq. 5), each at the timestep nearest
        in log sigma, and kept distinct: a repeat moves up, and one pushed past T-1-k comes back down."""
        ls = self.log_sigma.double()
        lo, hi = ls[0].item(), ls[-1].item()
        if spacing == "logsnr":
            at = torch.linspace(hi, lo, steps, dtype=torch.float64)
        else:
            r = 1 / KARRAS_RHO
            at = KARRAS_RHO * torch.linspace(math.exp(hi * r), math.exp(lo * r), steps, dtype=torch.float64).log()
        i = torch.searchsorted(ls, at).clamp(1, len(ls) - 1)
        ts = torch.where(at - ls[i - 1] < ls[i] - at, i - 1, i).tolist()
        for k in range(steps - 2, -1, -1):  # a step can be finer than one timestep (near t=0, or steps near T)
            ts[k] = max(ts[k], ts[k + 1] + 1)
        return [min(t, self.timesteps - 1 - k) for k, t in enumerate(ts)]  # and no higher than T-1 allows

    def predict_x0(self, out, xt, t):
        """The x_0 that the network's output at integer timestep t implies, clipped to [-1, 1]."""
        if self.output_like is not None:
            x0 = self.x0_of(out, xt, self._alpha_bar[t])
        elif self.objective == "mean":
            # eq. (7) of DDPM, mean = c0 x_0 + ct x_t, solved for x_0: mean - ct x_t = scale out + (skip - ct)
            # x_t, summed before dividing by c0 (down to 1e-4) so little is lost to rounding
            c0, _, skip_less_ct, scale = self._mean_parts[t]
            x0 = (scale * out + skip_less_ct * xt) / c0
        else:
            raise ValueError(f"unknown objective {self.objective!r}")
        return x0.clamp(-1, 1)

    def x0_of(self, out, xt, ab):
        """The x_0 that an eps, x0 or v network's output says at alpha_bar ab (a float), unclipped."""
        if self.output_like == "eps":
            return (xt - (1 - ab) ** 0.5 * out) / ab ** 0.5  # eq. (9) of DDIM solved for x_0
        elif self.output_like == "v":
            return ab ** 0.5 * xt - (1 - ab) ** 0.5 * out  # near t = 0 mostly x_t itself: the output corrects it
        return out

    @property
    def output_like(self):
        """"eps", "x0" or "v": what the network's output is, at any timestep, including a posterior-mean network's
        (its eq. 11 noise, or its x_0 scaled by c_0); None for a mean network that holds x_0 only times c_0."""
        if self.objective == "mean":
            return {"eps": "eps", "ct-c0": "x0"}.get(self.mean_skip)
        return self.objective

    @property
    def whole_steps_only(self):
        """Whether only DDPM's own step over every timestep serves this network: a posterior-mean network that
        gives x_0 only as its output divided by c_0, down to 1e-4 (any error blown up 10,000 times)."""
        return self.output_like is None

    def mean(self, out, xt, t):
        """The posterior mean of x_{t-1} that a mean network's output at integer timestep t says."""
        _, skip, _, scale = self._mean_parts[t]
        return skip * xt + scale * out

    def step(self, out, xt, t, t_prev, eta, noise):
        """One step x_t -> x_{t_prev} from the network's output; also returns the predicted x_0, clipped.

        The general rule is eq. (12) of DDIM on the predicted x_0: eta=0 is deterministic DDIM; eta=1 over
        consecutive steps is the DDPM ancestral step with the posterior variance beta-tilde. A network
        that predicts the posterior mean takes the DDPM step with its own output instead, eq. (11) of
        DDPM with mu_theta given: x_{t-1} = mu_theta + sigma_t z; its last step returns the clipped x_0, as
        every other path does.
        """
        ab = self._alpha_bar[t]
        ab_prev = self._alpha_bar[t_prev] if t_prev >= 0 else 1.0
        if self.objective == "mean" and t_prev == t - 1 and eta == 1 and t_prev >= 0:
            var = self.posterior_var[t].item()
            mean = self.mean(out, xt, t)
            x_prev = mean + var ** 0.5 * noise if var > 0 else mean
            return x_prev, self.predict_x0(out, xt, t)
        x0 = self.predict_x0(out, xt, t)
        eps = (xt - ab ** 0.5 * x0) / (1 - ab) ** 0.5  # the noise consistent with the clipped x_0
        # sigma_t(eta), eq. (16): eta=1 gives the DDPM posterior variance (1-ab_prev)/(1-ab) beta_t.
        var = eta ** 2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        x_prev = ab_prev ** 0.5 * x0 + max(1 - ab_prev - var, 0.0) ** 0.5 * eps
        if var > 0:
            x_prev = x_prev + var ** 0.5 * noise
        return x_prev, x0

    def solver(self, name="ddim", eta=1.0, churn=0.0, steps=None):
        """A step function (model, x_t, t, t_prev, draw) -> (x_{t_prev}, x_0) for one sampling run; draw()
        gives fresh noise. Multistep solvers keep their history inside, so make one per run."""
        if name == "ddim":
            return lambda model, x, t, t_prev, draw: self.step(
                model(x, _full(x, t)).float(), x, t, t_prev, eta, draw() if eta > 0 and t_prev >= 0 else None)
        elif name in ("dpm2m", "dpm2m-sde"):
            return DPMSolverPP(self, sde=name == "dpm2m-sde")
        elif name == "heun":
            return Heun(self, churn, steps or self.timesteps)
        else:
            raise ValueError(f"unknown solver {name!r}; expected one of {SOLVERS}")

    @torch.inference_mode()
    def sample_loop(self, model, shape, steps=None, eta=1.0, device="cpu", generator=None, noise=None,
                    solver="ddim", spacing="linspace", churn=0.0):
        """Run the reverse process from noise, yielding (t_prev, x_{t_prev}, predicted x_0) after every step
        (t_prev = -1 after the last step, where x is the finished sample).

        steps=None (or T) visits every timestep; with the ddim solver and eta=1 that is ancestral DDPM
        sampling, with eta=0 and fewer steps it is DDIM. Noise is drawn on the CPU generator, so a seed
        gives the same images on every device.
        """
        x = (torch.randn(shape, generator=generator) if noise is None else noise).to(device)
        draw = lambda: torch.randn(shape, generator=generator).to(device)  # noqa: E731
        step = self.solver(solver, eta, churn, steps)
        for t, t_prev in self.timestep_pairs(steps or self.timesteps, spacing):
            x, x0 = step(model, x, t, t_prev, draw)
            yield t_prev, x, x0

    def sample(self, model, shape, **kw):
        """The final images of sample_loop, in [-1, 1]."""
        for _, x, _ in self.sample_loop(model, shape, **kw):
            pass
        return x


def _full(x, t, dtype=torch.long):
    """Timestep t for every image of the batch x: (B,)."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=dtype)


class DPMSolverPP:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) and its SDE variant (their eq. 18 with the same
    second-order correction, diffusers' "sde-dpmsolver++"): multistep solvers in the data prediction x_0
    over lambda = log(alpha / sigma). Their first step is first order: DDIM with eta 0 (ODE) or eta 1 (SDE).
    The final step, to sigma = 0, returns the data prediction."""

    def __init__(self, diffusion, sde):
        self.d, self.sde, self.last = diffusion, sde, None  # last: (x_0, h) of the previous step

    def vp(self, t):
        """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of x_t = alpha_t x_0 + sigma_t eps."""
        ab = self.d._alpha_bar[t]
        return ab ** 0.5, (1 - ab) ** 0.5, 0.5 * math.log(ab / (1 - ab))

    def __call__(self, model, x, t, t_prev, draw):
        x0 = self.d.predict_x0(model(x, _full(x, t)).float(), x, t)
        if t_prev < 0:
            return x0, x0
        _, s_t, lam_t = self.vp(t)
        a_p, s_p, lam_p = self.vp(t_prev)
        h = lam_p - lam_t
        d = x0
        if self.last is not None:  # second order: D = (1 + 1/2r) x0_i - 1/2r x0_{i-1}, r = h_{i-1} / h_i
            x0_last, h_last = self.last
            d = x0 + (x0 - x0_last) * (h / (2 * h_last))
        self.last = (x0, h)
        if self.sde:  # x_s = (s_p/s_t) e^-h x + a_p (1 - e^-2h) D + s_p sqrt(1 - e^-2h) z
            return (s_p / s_t * math.exp(-h)) * x + (a_p * -math.expm1(-2 * h)) * d \
                + (s_p * (-math.expm1(-2 * h)) ** 0.5) * draw(), x0
        return (s_p / s_t) * x + (a_p * -math.expm1(-h)) * d, x0  # Algorithm 2: x = s_p/s_t x - a_p (e^-h - 1) D


class Heun:
    """Heun's second-order method with churn, Algorithm 2 of Karras et al. 2022 (EDM), on the VP network:
    in EDM's variables x / sqrt(alpha_bar) = x_0 + sigma eps, a step from sigma_i to sigma_{i+1} first adds
    noise up to sigma_hat = sigma_i (1 + gamma), gamma = min(churn / steps, sqrt(2) - 1), then takes an
    Euler step and corrects it with the slope at its end (two network calls; one on the last step, to
    sigma = 0). The network sees the continuous timestep of sigma_hat, interpolated in log sigma."""

    def __init__(self, diffusion, churn, steps):
        if diffusion.whole_steps_only:
            raise ValueError("the heun solver needs an eps, x0 or v network, or a posterior-mean one whose output is "
                             "the noise or at x_0's scale: this one's mean is only defined at whole timesteps")
        self.d, self.gamma = diffusion, min(churn / steps, 2 ** 0.5 - 1)

    def sigma(self, t):
        return math.exp(self.d.log_sigma[t].item()) if t >= 0 else 0.0

    def denoise(self, model, x_edm, sigma):
        """D(x; sigma): the network's x_0 for x_edm = x_0 + sigma eps, at the continuous timestep of sigma."""
        log_sigma = self.d.log_sigma
        t = float(_interp(math.log(sigma), log_sigma))
        ab = 1 / (1 + sigma ** 2)
        xt = x_edm * ab ** 0.5  # back to the network's x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps
        out = model(xt, _full(xt, t, torch.float32)).float()
        return self.d.x0_of(out, xt, ab).clamp(-1, 1)

    def __call__(self, model, x, t, t_prev, draw):
        s_i, s_next = self.sigma(t), self.sigma(t_prev)
        x = x * (1 + s_i ** 2) ** 0.5  # (B, ...) in EDM's variables
        s_hat = min(s_i * (1 + self.gamma), self.sigma(self.d.timesteps - 1))  # no higher than the network knows
        if s_hat > s_i:
            x = x + (s_hat ** 2 - s_i ** 2) ** 0.5 * draw()
        x0 = self.denoise(model, x, s_hat)
        d = (x - x0) / s_hat  # dx / dsigma, eq. (4) of EDM
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:  # the correction with the slope at sigma_{i+1}
            x0 = self.denoise(model, x_next, s_next)
            x_next = x + (s_next - s_hat) * 0.5 * (d + (x_next - x0) / s_next)
        return x_next / (1 + s_next ** 2) ** 0.5, x0


def _interp(v, table):
    """The fractional index at which the increasing 1-d table reaches v (clamped to its ends)."""
    i = int(torch.searchsorted(table, torch.tensor(v, dtype=table.dtype)).clamp(1, len(table) - 1))
    lo, hi = table[i - 1].item(), table[i].item()
    return min(max(i - 1 + (v - lo) / (hi - lo), 0.0), len(table) - 1.0)
