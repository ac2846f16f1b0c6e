"""Noise schedules of DDPM (Ho et al. 2020) and improved DDPM (Nichol & Dhariwal 2021)."""

import math
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_lit.errors import UserError

ScheduleKind = Literal["linear", "cosine"]


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's betas, evenly spaced from beta_start to beta_end (float64)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


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


class NoiseSchedule(nn.Module):
    """Precomputed schedule terms as non-persistent float32 buffers, indexed by 0-based t in [0, T-1].

    Args:
        kind: ``linear`` (DDPM) or ``cosine`` (improved DDPM).
        timesteps: number of diffusion steps T.
    """

    def __init__(self, kind: ScheduleKind = "linear", timesteps: int = 1000) -> None:
        super().__init__()
        if kind not in ("linear", "cosine"):
            raise UserError(f"unknown noise schedule {kind!r}: use 'linear' or 'cosine'")
        if timesteps < 1:
            raise UserError(f"timesteps must be at least 1, got {timesteps}")
        self.kind = kind
        self.timesteps = timesteps

        betas = linear_betas(timesteps) if kind == "linear" else cosine_betas(timesteps)
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

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps  (DDPM Eq. 4)."""
        return gather(self.sqrt_alphas_cumprod, t, x0.ndim) * x0 + gather(
            self.sqrt_one_minus_alphas_cumprod, t, x0.ndim
        ) * eps

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, timesteps={self.timesteps}"
