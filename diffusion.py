"""The DDPM noise process: linear-beta schedule, forward noising, the training loss and the samplers.

The network is always an argument (`model(x, t) -> output`), never an attribute, so this object holds
no trainable state. What the output means is the objective: the noise eps (DDPM's choice, the default),
the clean image x0, or the posterior mean of x_{t-1}; all three share the sampling loop.
References: Ho et al. 2020 (DDPM, arXiv:2006.11239) and Song et al. 2021 (DDIM, arXiv:2010.02502);
equation numbers below are theirs.
"""
import torch
import torch.nn.functional as F

OBJECTIVES = ("eps", "x0", "mean")
LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}


class Diffusion:
    def __init__(self, timesteps=1000, beta_start=1e-4, beta_end=0.02, objective="eps", loss="mse"):
        if timesteps < 1:
            raise ValueError("timesteps must be positive")
        if objective not in OBJECTIVES or loss not in LOSSES:
            raise ValueError(f"objective must be one of {OBJECTIVES} and loss one of {tuple(LOSSES)}")
        self.timesteps, self.objective, self.loss_type = timesteps, objective, loss
        self.beta_start, self.beta_end = beta_start, beta_end
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
        # Posterior q(x_{t-1} | x_t, x_0), eqs. (6)-(7) of DDPM.
        self.posterior_var = (betas * (1 - alpha_bar_prev) / (1 - alpha_bar)).float()
        self.posterior_coef_x0 = (betas * alpha_bar_prev.sqrt() / (1 - alpha_bar)).float()
        self.posterior_coef_xt = ((1 - alpha_bar_prev) * (1 - betas).sqrt() / (1 - alpha_bar)).float()

    def config(self):
        return {"timesteps": self.timesteps, "beta_start": self.beta_start, "beta_end": self.beta_end,
                "objective": self.objective, "loss": self.loss_type}

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
        """What the network learns to output for x_t: eps, x_0, or the posterior mean of x_{t-1} (eq. 7)."""
        if self.objective == "eps":
            return noise
        elif self.objective == "x0":
            return x0
        elif self.objective == "mean":
            return self.q_posterior(x0, xt, t)[0]
        else:
            raise ValueError(f"unknown objective {self.objective!r}")

    def loss(self, model, x0):
        """The simplified DDPM objective at a uniform t, eq. (14) for eps: || target - output ||^2 (or |.|
        for the l1 loss), unweighted over t for every objective."""
        t = torch.randint(0, self.timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        return LOSSES[self.loss_type](model(xt, t).float(), self.target(x0, xt, t, noise))

    def timestep_pairs(self, steps):
        """(t, t_prev) pairs from T-1 down to 0; t_prev = -1 marks the final step to x_0."""
        T = self.timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and the {T} timesteps of the schedule")
        # Evenly spaced, always including T-1 (start from noise) and 0 (end on the data).
        ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        return list(zip(ts, ts[1:] + [-1]))

    def step(self, out, xt, t, t_prev, eta, noise):
        """One step x_t -> x_{t_prev} from the network's output; also returns the predicted x_0, clipped.

        The general rule is eq. (12) of DDIM on the predicted x_0: eta=0 is deterministic DDIM; eta=1 over
        consecutive steps is the DDPM ancestral step with the posterior variance beta-tilde. A network
        that predicts the posterior mean takes the DDPM step with its own output instead, eq. (11) of
        DDPM with mu_theta given: x_{t-1} = mu_theta + sigma_t z.
        """
        ab = self._alpha_bar[t]
        ab_prev = self._alpha_bar[t_prev] if t_prev >= 0 else 1.0
        if self.objective == "eps":
            x0 = (xt - (1 - ab) ** 0.5 * out) / ab ** 0.5  # eq. (9) solved for x_0
        elif self.objective == "x0":
            x0 = out
        elif self.objective == "mean":
            # The network predicts the mean of x_{t-1} (not of x_{t_prev}): eq. (7), mean = c0 x_0 + ct x_t.
            ab_before = self._alpha_bar[t - 1] if t > 0 else 1.0
            beta = 1 - ab / ab_before
            c0, ct = beta * ab_before ** 0.5 / (1 - ab), (1 - ab_before) * (1 - beta) ** 0.5 / (1 - ab)
            if t_prev == t - 1 and eta == 1:
                var = beta * (1 - ab_before) / (1 - ab)
                x_prev = out + var ** 0.5 * noise if var > 0 else out
                return x_prev, ((out - ct * xt) / c0).clamp(-1, 1)
            x0 = (out - ct * xt) / c0  # solved for x_0, then the general step below
        else:
            raise ValueError(f"unknown objective {self.objective!r}")
        x0 = x0.clamp(-1, 1)
        eps = (xt - ab ** 0.5 * x0) / (1 - ab) ** 0.5  # the noise consistent with the clipped x_0
        # sigma_t(eta), eq. (16): eta=1 gives the DDPM posterior variance (1-ab_prev)/(1-ab) beta_t.
        var = eta ** 2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        x_prev = ab_prev ** 0.5 * x0 + max(1 - ab_prev - var, 0.0) ** 0.5 * eps
        if var > 0:
            x_prev = x_prev + var ** 0.5 * noise
        return x_prev, x0

    @torch.inference_mode()
    def sample_loop(self, model, shape, steps=None, eta=1.0, device="cpu", generator=None, noise=None):
        """Run the reverse process from noise, yielding (t_prev, x_{t_prev}, predicted x_0) after every step
        (t_prev = -1 after the last step, where x is the finished sample).

        steps=None (or T) visits every timestep; with eta=1 that is ancestral DDPM sampling, with
        eta=0 and fewer steps it is DDIM. Noise is drawn on the CPU generator, so a seed gives the
        same images on every device.
        """
        x = (torch.randn(shape, generator=generator) if noise is None else noise).to(device)
        for t, t_prev in self.timestep_pairs(steps or self.timesteps):
            tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
            out = model(x, tt).float()
            z = torch.randn(shape, generator=generator).to(device) if eta > 0 and t_prev >= 0 else None
            x, x0 = self.step(out, x, t, t_prev, eta, z)
            yield t_prev, x, x0

    def sample(self, model, shape, **kw):
        """The final images of sample_loop, in [-1, 1]."""
        for _, x, _ in self.sample_loop(model, shape, **kw):
            pass
        return x
