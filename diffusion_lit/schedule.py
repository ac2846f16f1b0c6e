"""The noising processes x_t = alpha x0 + sigma eps: DDPM's variance-preserving one with the schedules of DDPM (Ho et
al. 2020) and improved DDPM (Nichol & Dhariwal 2021), and rectified flow (Liu et al. 2022; Esser et al. 2024)."""

import math
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_lit.errors import UserError

ScheduleKind = Literal["linear", "cosine", "scaled_linear"]
TimeSampling = Literal["uniform", "logit_normal"]


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's betas, evenly spaced from beta_start to beta_end (float64)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def scaled_linear_betas(timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's betas: evenly spaced square roots from sqrt(beta_start) to sqrt(beta_end), squared
    (float64)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> Tensor:
    """The closed form alpha_bar(t) = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2), at t = 0..T (float64)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return f / f[0]


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Betas of the cosine schedule, clipped at max_beta so the last steps stay finite (float64)."""
    alphas_cumprod = cosine_alphas_cumprod(timesteps, s)
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)


def gather(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """values[t] reshaped to [B, 1, ..., 1] so it broadcasts against a batch of `ndim` dimensions."""
    return values.gather(0, t).reshape(-1, *([1] * (ndim - 1)))


BETAS = {"linear": linear_betas, "cosine": cosine_betas, "scaled_linear": scaled_linear_betas}


class NoiseSchedule(nn.Module):
    """Precomputed schedule terms as non-persistent float32 buffers, indexed by 0-based t in [0, T-1].

    Args:
        kind: ``linear`` (DDPM), ``cosine`` (improved DDPM) or ``scaled_linear`` (Stable Diffusion's).
        timesteps: number of diffusion steps T.
    """

    def __init__(self, kind: ScheduleKind = "linear", timesteps: int = 1000) -> None:
        super().__init__()
        if kind not in BETAS:
            raise UserError(f"unknown noise schedule {kind!r}: use 'linear', 'cosine' or 'scaled_linear'")
        if timesteps < 1:
            raise UserError(f"timesteps must be at least 1, got {timesteps}")
        self.kind = kind
        self.timesteps = timesteps

        betas = BETAS[kind](timesteps)
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

    process = "vp"

    def alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        """(sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) at integer timesteps t, shaped to broadcast against `ndim` dimensions."""
        return gather(self.sqrt_alphas_cumprod, t, ndim), gather(self.sqrt_one_minus_alphas_cumprod, t, ndim)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps  (DDPM Eq. 4)."""
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return alpha * x0 + sigma * eps

    def network_time(self, t: Tensor) -> Tensor:
        """The timestep as the network sees it: t itself."""
        return t

    def draw_t(self, n: int, how: TimeSampling, device, generator: torch.Generator | None = None) -> Tensor:
        """n training timesteps: uniform over [0, T-1] (DDPM), or u ~ logit-normal(0, 1) placed at floor(u T)."""
        if how == "uniform":
            return torch.randint(0, self.timesteps, (n,), device=device, generator=generator)
        u = torch.sigmoid(torch.randn(n, device=device, generator=generator))
        return (u * self.timesteps).long().clamp(max=self.timesteps - 1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, timesteps={self.timesteps}"


class FlowSchedule(nn.Module):
    """Rectified flow: x_t = (1 - t) x0 + t eps for continuous t in [0, 1], t = 1 pure noise.

    The network sees 1000 t (Stable Diffusion 3's convention), so the denoisers built for DDPM's timesteps take it
    unchanged. Sampling walks t from 1 to 0 on levels shifted towards the noise by `shift` (SD3 Eq. 23).

    Args:
        shift: the sampling levels' shift s: t -> s t / (1 + (s - 1) t); 1 leaves them evenly spaced.
    """

    process = "flow"
    timesteps = 1000  # the network's time scale

    def __init__(self, shift: float = 1.0) -> None:
        super().__init__()
        if shift <= 0:
            raise UserError(f"flow_shift must be positive, got {shift}")
        self.shift = shift

    def alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        """(1 - t, t), shaped to broadcast against `ndim` dimensions."""
        t = t.reshape(-1, *([1] * (ndim - 1)))
        return 1 - t, t

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = (1 - t) x0 + t eps."""
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return alpha * x0 + sigma * eps

    def network_time(self, t: Tensor) -> Tensor:
        return t * self.timesteps

    def draw_t(self, n: int, how: TimeSampling, device, generator: torch.Generator | None = None) -> Tensor:
        """n training times in (0, 1): uniform, or logit-normal with mean 0 and std 1 (SD3's default)."""
        if how == "uniform":
            return torch.rand(n, device=device, generator=generator)
        return torch.sigmoid(torch.randn(n, device=device, generator=generator))

    def shifted(self, t: Tensor) -> Tensor:
        """SD3's timestep shift s t / (1 + (s - 1) t)."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def extra_repr(self) -> str:
        return f"shift={self.shift}"
