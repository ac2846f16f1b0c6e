"""The betas of VP noise schedules: DDPM's linear ones (Ho et al. 2020), improved DDPM's cosine ones (Nichol &
Dhariwal 2021) and Stable Diffusion's scaled-linear ones; the processes built on them are in `process`."""

import math
from typing import Literal

import torch
from torch import Tensor

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
