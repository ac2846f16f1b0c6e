"""Fast deterministic solvers of the diffusion ODE: Euler, Heun (EDM's second order) and DPM-Solver++(2M).

They walk a grid of noise levels, noisiest first, in EDM's variables (Karras et al. 2022): a VP state
x_t = alpha x0 + sigma eps is x~ = x_t / alpha = x0 + s eps with s = sigma / alpha, and the last level is clean
(s = 0). The network is asked for eps at the level's timestep t (a fractional one between two integers on a Karras
grid) with its own input x_t = alpha x~, alpha = 1 / sqrt(1 + s²), and its answer becomes the data prediction
x0 = x~ - s eps. In these variables one first-order step is x~' = (s'/s) x~ + (1 - s'/s) x0: Euler's step, DDIM's
(eta 0) and first-order DPM-Solver++'s at once, which the tests show.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from diffusion_lit.errors import UserError
from diffusion_lit.schedule import NoiseSchedule

EpsModel = Callable[[Tensor, Tensor], Tensor]
Spacing = Literal["linspace", "karras"]


@dataclass
class Grid:
    """Noise levels, noisiest first: the network's timesteps t [N] and EDM's sigmas s [N + 1], the last 0."""

    t: Tensor
    s: Tensor

    def alpha(self, i: int) -> float:
        """The VP scale alpha = 1 / sqrt(1 + s²) of level i."""
        return float(1 / (1 + self.s[i] ** 2).sqrt())


def edm_sigmas(schedule: NoiseSchedule) -> Tensor:
    """s = sqrt((1 - ᾱ_t) / ᾱ_t) of every integer timestep t = 0..T-1 (float64, increasing)."""
    alphas_cumprod = schedule.alphas_cumprod.double().cpu()
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def timestep_of(s: Tensor, sigmas: Tensor) -> Tensor:
    """The fractional timestep of each sigma, interpolating log-sigma between the integer timesteps."""
    return torch.from_numpy(np.interp(s.log().numpy(), sigmas.log().numpy(), np.arange(len(sigmas), dtype=np.float64)))


def evenly_spaced(timesteps: int, steps: int) -> Tensor:
    """`steps` integer timesteps evenly spaced over [0, T-1], both ends included, ascending: DDIM's."""
    return torch.linspace(0, timesteps - 1, steps).round().long().unique()


def vp_grid(schedule: NoiseSchedule, steps: int, spacing: Spacing = "linspace", rho: float = 7.0) -> Grid:
    """`steps` levels of a VP schedule and then clean.

    ``linspace``: the integer timesteps evenly spaced over [0, T-1], both ends included (DDIM's). ``karras``: EDM's
    sigmas, s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho between the sigmas of t = T-1 and
    t = 0 (Karras et al. 2022, Eq. 5), each at its fractional timestep.
    """
    timesteps = schedule.timesteps
    if not 1 <= steps <= timesteps:
        raise UserError(f"steps must lie in [1, {timesteps}], got {steps}")
    sigmas = edm_sigmas(schedule)
    if spacing == "linspace":
        t = evenly_spaced(timesteps, steps).flip(0)
        s = sigmas[t]
    elif spacing == "karras":
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        s_max, s_min = sigmas[-1] ** (1 / rho), sigmas[0] ** (1 / rho)
        s = (s_max + ramp * (s_min - s_max)) ** rho
        t = timestep_of(s, sigmas)
    else:
        raise UserError(f"unknown step spacing {spacing!r}: use 'linspace' or 'karras'")
    return Grid(t.float(), torch.cat([s, s.new_zeros(1)]))


def data_prediction(model: EpsModel, x: Tensor, grid: Grid, i: int, clip_x0: bool) -> Tensor:
    """x0 = x~ - s eps, with eps asked of the network at level i, optionally clipped to [-1, 1]."""
    t = grid.t[i].to(x.device).expand(x.shape[0])
    x0 = x - float(grid.s[i]) * model(grid.alpha(i) * x, t)
    return x0.clamp(-1, 1) if clip_x0 else x0


def first_order(x: Tensor, x0: Tensor, s: float, s_next: float) -> Tensor:
    """x~' = (s'/s) x~ + (1 - s'/s) x0: Euler, DDIM (eta 0) and DPM-Solver++ (first order) alike."""
    return (s_next / s) * x + (1 - s_next / s) * x0


def _finish(x: Tensor, states: list[Tensor], return_intermediates: bool):
    return (x, states) if return_intermediates else x


@torch.no_grad()
def euler_sample(model: EpsModel, grid: Grid, x_T: Tensor, clip_x0: bool = False,
                 return_intermediates: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Euler's method on the probability-flow ODE dx~/ds = (x~ - x0) / s (EDM Alg. 1 without its second order):
    one network call per level. x_T is the VP state at the first level; the states returned are VP states."""
    x = x_T / grid.alpha(0)
    states = [x_T]
    for i in range(len(grid.t)):
        x0 = data_prediction(model, x, grid, i, clip_x0)
        x = first_order(x, x0, float(grid.s[i]), float(grid.s[i + 1]))
        states.append(grid.alpha(i + 1) * x)
    return _finish(x, states, return_intermediates)


@torch.no_grad()
def heun_sample(model: EpsModel, grid: Grid, x_T: Tensor, clip_x0: bool = False,
                return_intermediates: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
    """EDM's Heun sampler (Karras et al. 2022, Alg. 1, deterministic): an Euler step, then the average of the slopes
    at both of its ends; the last step, onto s = 0, is Euler's alone. 2N - 1 network calls for N levels."""
    x = x_T / grid.alpha(0)
    states = [x_T]
    for i in range(len(grid.t)):
        s, s_next = float(grid.s[i]), float(grid.s[i + 1])
        d = (x - data_prediction(model, x, grid, i, clip_x0)) / s  # Alg. 1, line 7
        x_euler = x + (s_next - s) * d  # line 8
        if s_next > 0:  # lines 9-11: the slope at the Euler step's end, averaged in
            d_next = (x_euler - data_prediction(model, x_euler, grid, i + 1, clip_x0)) / s_next
            x = x + (s_next - s) * (d + d_next) / 2
        else:
            x = x_euler
        states.append(grid.alpha(i + 1) * x)
    return _finish(x, states, return_intermediates)


@torch.no_grad()
def dpmpp_2m_sample(model: EpsModel, grid: Grid, x_T: Tensor, clip_x0: bool = False,
                    return_intermediates: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): multistep, second order in lambda = -log s, on data predictions.

    x~' = (s'/s) x~ + (1 - s'/s) D, with D = x0 at the first and the last step (the last lands on s = 0) and
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev otherwise, r = h_prev / h, h = log(s / s'). One network call per level.
    """
    x = x_T / grid.alpha(0)
    states = [x_T]
    x0_prev, h_prev = None, None
    for i in range(len(grid.t)):
        s, s_next = float(grid.s[i]), float(grid.s[i + 1])
        x0 = data_prediction(model, x, grid, i, clip_x0)
        h = np.log(s / s_next) if s_next > 0 else None
        if x0_prev is None or h is None:  # first order at the first step and onto s = 0
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = first_order(x, d, s, s_next)
        x0_prev, h_prev = x0, h
        states.append(grid.alpha(i + 1) * x)
    return _finish(x, states, return_intermediates)


SOLVERS = {"euler": euler_sample, "heun": heun_sample, "dpmpp_2m": dpmpp_2m_sample}
