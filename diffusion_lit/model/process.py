"""The noise processes x_t = alpha x0 + sigma eps, each a part that a config names (`model.process`): DDPM's
variance-preserving one (`VP`) with the schedules of DDPM (Ho et al. 2020), improved DDPM (Nichol & Dhariwal 2021)
and Stable Diffusion, and rectified flow (`Flow`: Liu et al. 2022; Esser et al. 2024).

A process owns everything that differs from one process to the next: alpha and sigma at a time t, the time the
network sees, how training draws t, the noise level sigma / alpha, the solvers' grids, which predictions it can be
sampled from, and `spec()`, the identity that checkpoints record and guides, `InitFrom` and `export` compare. Its
buffers are not saved (`persistent=False`): a checkpoint records `spec()` and loading checks it.

A process of one's own subclasses `Process` and gives `alpha_sigma` and `spec` (docs/extending.md).
"""

import torch
from torch import Tensor, nn

from diffusion_lit.core.errors import UserError
from diffusion_lit.model.grids import Grid, vp_grid
from diffusion_lit.model.schedule import BETAS, ScheduleKind, TimeSampling, gather


class Process(nn.Module):
    """A noising process x_t = alpha(t) x0 + sigma(t) eps over continuous t in [0, 1], t = 1 the noisiest; the
    network sees `timesteps` t. A subclass gives `alpha_sigma` and `spec`; the rest has defaults it may replace.
    """

    timesteps = 1000  # the scale of the time the network sees
    discrete = False  # True: DDPM and DDIM walk its integer timesteps (VP); otherwise they walk `grid`'s levels
    default_prediction = "eps"  # what the network predicts when the objective names nothing
    default_t_sampling: TimeSampling = "uniform"
    predictions = ("eps", "v", "x0")  # the targets that sample on it
    straight = False  # True: x_t = (1 - t) x0 + t eps, whose velocity eps - x0 is constant along each path (MeanFlow)

    def alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) at training times t, shaped to broadcast against `ndim` dimensions."""
        raise NotImplementedError

    def spec(self) -> dict:
        """What makes two models of this process interchangeable (recorded in checkpoints, compared on load)."""
        raise NotImplementedError

    def network_time(self, t: Tensor) -> Tensor:
        """The time as the network sees it: `timesteps` t."""
        return t * self.timesteps

    def draw_t(self, n: int, how: TimeSampling, device, generator: torch.Generator | None = None) -> Tensor:
        """n training times in (0, 1): uniform, or logit-normal with mean 0 and std 1 (SD3's default)."""
        if how == "uniform":
            return torch.rand(n, device=device, generator=generator)
        return torch.sigmoid(torch.randn(n, device=device, generator=generator))

    def time_of(self, u: Tensor) -> Tensor:
        """Where the solvers' levels lie: the training time at u, evenly spaced in [0, 1] (float64)."""
        return u

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = alpha x0 + sigma eps."""
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return alpha * x0 + sigma * eps

    def v_coefficients(self, alpha, sigma) -> tuple:
        """(a, b) of the velocity target v = a x0 + b eps: dx_t/dτ in the process's own time (VP: τ = atan(sigma /
        alpha), Salimans & Ho 2022)."""
        return -sigma, alpha

    def noise_level(self, t: Tensor) -> Tensor:
        """sigma / alpha at the network's time t: the noise level of x_t / alpha = x0 + (sigma / alpha) eps, which
        means the same on every process (EDM's sigma); float64."""
        alpha, sigma = self.alpha_sigma((t.double() / self.timesteps).clamp(0, 1), 1)
        return (sigma / alpha).reshape(-1)

    def grid(self, steps: int, spacing: str = "linspace"):
        """The solvers' `steps` levels, noisiest first, then clean: at `time_of` evenly spaced u (``linspace``),
        solved in EDM's variables x_t / alpha."""
        t = self.time_of(check_levels(self, steps, spacing))
        alpha, sigma = (v.double().reshape(-1) for v in self.alpha_sigma(t, 1))
        alpha, sigma = torch.cat([alpha[:-1], alpha.new_ones(1)]), torch.cat([sigma[:-1], sigma.new_zeros(1)])
        return Grid(self.network_time(t[:-1]).float(), alpha, sigma, self.solver_scale(alpha), self)

    def solver_scale(self, alpha: Tensor) -> Tensor:
        """c of the solvers' variables y = x_t / c, level k = sigma / c: alpha (EDM's) by default."""
        return alpha.clone()


def check_levels(process: Process, steps: int, spacing: str) -> Tensor:
    """u = 1, 1 - 1/N, ..., 0 (float64) after checking the settings of a process evenly spaced in time."""
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if spacing != "linspace":
        raise UserError(f"spacing {spacing!r} is for VP models; a {type(process).__name__} model takes linspace")
    return torch.linspace(1, 0, steps + 1, dtype=torch.float64)


class VP(Process):
    """DDPM's variance-preserving process: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps at integer timesteps t in
    [0, T-1]; its terms are precomputed in float64 and kept as non-persistent float32 buffers.

    Args:
        schedule: the betas: ``linear`` (DDPM), ``cosine`` (improved DDPM) or ``scaled_linear`` (Stable Diffusion's).
        timesteps: number of diffusion steps T.
    """

    discrete = True

    def __init__(self, schedule: ScheduleKind = "linear", timesteps: int = 1000) -> None:
        super().__init__()
        if schedule not in BETAS:
            raise UserError(f"unknown noise schedule {schedule!r}: use 'linear', 'cosine' or 'scaled_linear'")
        if timesteps < 1:
            raise UserError(f"timesteps must be at least 1, got {timesteps}")
        self.kind = schedule
        self.timesteps = timesteps

        betas = BETAS[schedule](timesteps)
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, posterior_variance)  (DDPM Eq. 6-7)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        terms = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            # posterior_variance is 0 at t = 0; its log is taken from t = 1 there, as in DDPM's code.
            "posterior_log_variance_clipped": torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        }
        for name, value in terms.items():
            self.register_buffer(name, value.float(), persistent=False)

    def alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        """(sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) at integer timesteps t, shaped to broadcast against `ndim` dimensions."""
        return gather(self.sqrt_alphas_cumprod, t, ndim), gather(self.sqrt_one_minus_alphas_cumprod, t, ndim)

    def network_time(self, t: Tensor) -> Tensor:
        """The timestep as the network sees it: t itself."""
        return t

    def draw_t(self, n: int, how: TimeSampling, device, generator: torch.Generator | None = None) -> Tensor:
        """n training timesteps: uniform over [0, T-1] (DDPM), or u ~ logit-normal(0, 1) placed at floor(u T)."""
        if how == "uniform":
            return torch.randint(0, self.timesteps, (n,), device=device, generator=generator)
        u = torch.sigmoid(torch.randn(n, device=device, generator=generator))
        return (u * self.timesteps).long().clamp(max=self.timesteps - 1)

    def noise_level(self, t: Tensor) -> Tensor:
        """sigma / alpha at timesteps t, fractional ones interpolated between the integer timesteps."""
        ac = self.alphas_cumprod.double()
        levels = ((1 - ac) / ac).sqrt()
        t = t.double().clamp(0, len(levels) - 1)
        low, high = t.floor().long(), t.ceil().long()
        return torch.lerp(levels[low], levels[high], t - low)

    def grid(self, steps: int, spacing: str = "linspace"):
        """`steps` levels on the timesteps (``linspace``, ``trailing``) or EDM's sigmas (``karras``)."""
        return vp_grid(self, steps, spacing)

    def spec(self) -> dict:
        return {"process": "vp", "schedule": self.kind, "timesteps": self.timesteps}

    def extra_repr(self) -> str:
        return f"schedule={self.kind!r}, timesteps={self.timesteps}"


class Flow(Process):
    """Rectified flow: x_t = (1 - t) x0 + t eps for continuous t in [0, 1], t = 1 pure noise.

    The network sees 1000 t (Stable Diffusion 3's convention), so the denoisers built for DDPM's timesteps take it
    unchanged. Sampling walks t from 1 to 0 on levels shifted towards the noise by `shift` (SD3 Eq. 23).

    Args:
        shift: the sampling levels' shift s: t -> s t / (1 + (s - 1) t); 1 leaves them evenly spaced.
    """

    default_prediction = "v"
    default_t_sampling: TimeSampling = "logit_normal"
    straight = True
    # At t = 1 the flow's x_t is the noise itself: an eps prediction says nothing about x0 there.
    predictions = ("v", "x0")

    def __init__(self, shift: float = 1.0) -> None:
        super().__init__()
        if shift <= 0:
            raise UserError(f"flow shift must be positive, got {shift}")
        self.shift = shift

    def alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        """(1 - t, t), shaped to broadcast against `ndim` dimensions."""
        t = t.reshape(-1, *([1] * (ndim - 1)))
        return 1 - t, t

    def time_of(self, u: Tensor) -> Tensor:
        """The sampling levels: SD3's timestep shift s u / (1 + (s - 1) u)."""
        return self.shift * u / (1 + (self.shift - 1) * u)

    def v_coefficients(self, alpha, sigma) -> tuple:
        """The flow's velocity dx_t/dt = eps - x0."""
        return -1.0, 1.0

    def solver_scale(self, alpha: Tensor) -> Tensor:
        """c = 1: the solvers walk the flow's own x_t and t (alpha reaches 0 at t = 1)."""
        return torch.ones_like(alpha)

    def spec(self) -> dict:
        return {"process": "flow"}

    def extra_repr(self) -> str:
        return f"shift={self.shift}"
