"""The noise levels a solver walks, noisiest first, for either process: `Grid` (the network's times, alpha, sigma
and the ODE's scale of every level) and VP's spacings of them (DDIM's evenly spaced timesteps, diffusers' trailing
ones, EDM's Karras sigmas). A process makes its grid (`Process.grid`); the solvers (`diffusion_lit.sampling`) walk
it."""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from diffusion_lit.core.errors import UserError

Spacing = Literal["linspace", "trailing", "karras"]


@dataclass
class Grid:
    """Noise levels, noisiest first: the network's times t [N], and alpha, sigma and the ODE's scale c [N + 1] of
    every level, the last one clean (alpha = c = 1, sigma = 0)."""

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    scale: Tensor
    process: object  # the process (`diffusion_lit.model.process`) the levels belong to

    @classmethod
    def vp(cls, t: Tensor, s: Tensor, process) -> "Grid":
        """A VP grid from EDM's sigmas s = sigma / alpha [N + 1] (the last 0)."""
        alpha = 1 / (1 + s.double() ** 2).sqrt()
        return cls(torch.as_tensor(t).float(), alpha, alpha * s, alpha, process)

    @property
    def level(self) -> Tensor:
        """k = sigma / c of every level: EDM's sigma on VP, t on the flow."""
        return self.sigma / self.scale

    def log_snr(self, i: int) -> float:
        """lambda = log(alpha / sigma) of level i: DPM-Solver's time (-inf at the flow's t = 1, inf when clean)."""
        return float((self.alpha[i] / self.sigma[i]).log())


def edm_sigmas(process) -> Tensor:
    """s = sqrt((1 - ᾱ_t) / ᾱ_t) of every integer timestep t = 0..T-1 (float64, increasing)."""
    alphas_cumprod = process.alphas_cumprod.double().cpu()
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def timestep_of(s: Tensor, sigmas: Tensor) -> Tensor:
    """The fractional timestep of each sigma, interpolating log-sigma between the integer timesteps."""
    return torch.from_numpy(np.interp(s.log().numpy(), sigmas.log().numpy(), np.arange(len(sigmas), dtype=np.float64)))


def evenly_spaced(timesteps: int, steps: int) -> Tensor:
    """`steps` integer timesteps evenly spaced over [0, T-1], both ends included, ascending: DDIM's."""
    return torch.linspace(0, timesteps - 1, steps).round().long().unique()


def trailing(timesteps: int, steps: int) -> Tensor:
    """`steps` integer timesteps T - 1, T - 1 - T/N, ... (rounded), ascending: the "trailing" spacing of Lin et al.
    2024 and diffusers, which starts at the noisiest timestep and leaves the clean end's gap of T/N to the last step."""
    return torch.from_numpy(np.round(np.arange(timesteps, 0, -timesteps / steps)).astype(np.int64) - 1).flip(0)


def vp_grid(process, steps: int, spacing: Spacing = "linspace", rho: float = 7.0) -> Grid:
    """`steps` levels of a VP process and then clean.

    ``linspace``: the integer timesteps evenly spaced over [0, T-1], both ends included (DDIM's). ``trailing``: T - 1
    and every T/N below it (see `trailing`). ``karras``: EDM's
    sigmas, s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho between the sigmas of t = T-1 and
    t = 0 (Karras et al. 2022, Eq. 5), each at its fractional timestep.
    """
    timesteps = process.timesteps
    if not 1 <= steps <= timesteps:
        raise UserError(f"steps must lie in [1, {timesteps}], got {steps}")
    sigmas = edm_sigmas(process)
    if spacing in ("linspace", "trailing"):
        t = (evenly_spaced if spacing == "linspace" else trailing)(timesteps, steps).flip(0)
        s = sigmas[t]
    elif spacing == "karras":
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        s_max, s_min = sigmas[-1] ** (1 / rho), sigmas[0] ** (1 / rho)
        s = (s_max + ramp * (s_min - s_max)) ** rho
        t = timestep_of(s, sigmas)
    else:
        raise UserError(f"unknown step spacing {spacing!r}: use 'linspace', 'trailing' or 'karras'")
    return Grid.vp(t, torch.cat([s, s.new_zeros(1)]), process)
