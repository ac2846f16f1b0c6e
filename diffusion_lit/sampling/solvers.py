"""Fast deterministic solvers of the diffusion ODE: Euler, Heun (EDM's second order) and DPM-Solver++(2M).

They walk a grid of noise levels, noisiest first, for either process x_t = alpha x0 + sigma eps. Each grid names
the variables its ODE is solved in: y = x_t / c with level k = sigma / c, so that dy/dk = (y - x0) / k while the
data prediction x0 stays fixed. On VP, c = alpha gives EDM's variables (Karras et al. 2022: y = x0 + k eps); on the
flow, c = 1 gives its own x_t and t. The last level is clean (k = 0). In these variables one first-order step is
y' = (k'/k) y + (1 - k'/k) x0: Euler's step, DDIM's (eta 0) and first-order DPM-Solver++'s at once, on both
processes, which the tests show.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_lit.model.grids import Grid
from diffusion_lit.model.targets import Prediction, inverse, split

Model = Callable[[Tensor, Tensor], Tensor]  # (x_t, network time) -> the network's prediction


def data_prediction(model: Model, y: Tensor, grid: Grid, i: int, clip_x0: bool, prediction: Prediction) -> Tensor:
    """The x0 the network predicts at level i for the ODE state y, optionally clipped to [-1, 1]."""
    c = float(grid.scale[i])
    t = grid.t[i].to(y.device).expand(y.shape[0])
    # x0 = p x_t + q out with x_t = c y: the coefficients in float64, so that y = x_t / alpha is never formed in
    # float32 where alpha is small (VP's noisiest levels)
    p, q, _, _ = inverse(prediction, grid.process, float(grid.alpha[i]), float(grid.sigma[i]))
    x0 = (p * c) * y + q * model(c * y, t)
    return x0.clamp(-1, 1) if clip_x0 else x0


def first_order(y: Tensor, x0: Tensor, k: float, k_next: float) -> Tensor:
    """y' = (k'/k) y + (1 - k'/k) x0: Euler, DDIM (eta 0) and DPM-Solver++ (first order) alike."""
    return (k_next / k) * y + (1 - k_next / k) * x0


def _finish(x: Tensor, states: list[Tensor], return_intermediates: bool):
    return (x, states) if return_intermediates else x


@torch.no_grad()
def euler_sample(model: Model, grid: Grid, x_T: Tensor, clip_x0: bool = False, return_intermediates: bool = False,
                 prediction: Prediction = "eps") -> Tensor | tuple[Tensor, list[Tensor]]:
    """Euler's method on the probability-flow ODE dy/dk = (y - x0) / k (EDM Alg. 1 without its second order; on
    the flow, SD3's sampler): one network call per level. x_T and the states returned are x_t."""
    k, c = grid.level.tolist(), grid.scale.tolist()
    y = x_T / c[0]
    states = [x_T]
    for i in range(len(grid.t)):
        x0 = data_prediction(model, y, grid, i, clip_x0, prediction)
        y = first_order(y, x0, k[i], k[i + 1])
        states.append(c[i + 1] * y)
    return _finish(y, states, return_intermediates)


@torch.no_grad()
def heun_sample(model: Model, grid: Grid, x_T: Tensor, clip_x0: bool = False, return_intermediates: bool = False,
                prediction: Prediction = "eps") -> Tensor | tuple[Tensor, list[Tensor]]:
    """EDM's Heun sampler (Karras et al. 2022, Alg. 1, deterministic): an Euler step, then the average of the slopes
    at both of its ends; the last step, onto k = 0, is Euler's alone. 2N - 1 network calls for N levels."""
    k, c = grid.level.tolist(), grid.scale.tolist()
    y = x_T / c[0]
    states = [x_T]
    for i in range(len(grid.t)):
        d = (y - data_prediction(model, y, grid, i, clip_x0, prediction)) / k[i]  # Alg. 1, line 7
        y_euler = y + (k[i + 1] - k[i]) * d  # line 8
        if k[i + 1] > 0:  # lines 9-11: the slope at the Euler step's end, averaged in
            d_next = (y_euler - data_prediction(model, y_euler, grid, i + 1, clip_x0, prediction)) / k[i + 1]
            y = y + (k[i + 1] - k[i]) * (d + d_next) / 2
        else:
            y = y_euler
        states.append(c[i + 1] * y)
    return _finish(y, states, return_intermediates)


@torch.no_grad()
def dpmpp_2m_sample(model: Model, grid: Grid, x_T: Tensor, clip_x0: bool = False, return_intermediates: bool = False,
                    prediction: Prediction = "eps") -> Tensor | tuple[Tensor, list[Tensor]]:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): multistep, second order in lambda = log(alpha / sigma), on data
    predictions.

    y' = (k'/k) y + (1 - k'/k) D, with D = x0 at the first and the last step (the last lands on k = 0) and
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev otherwise, r = h_prev / h, h = lambda' - lambda. One network call per
    level. (On the flow, whose first level has lambda = -inf, the second step is first order too.)
    """
    k, c = grid.level.tolist(), grid.scale.tolist()
    y = x_T / c[0]
    states = [x_T]
    x0_prev, h_prev = None, None
    for i in range(len(grid.t)):
        x0 = data_prediction(model, y, grid, i, clip_x0, prediction)
        h = grid.log_snr(i + 1) - grid.log_snr(i) if k[i + 1] > 0 else None
        if x0_prev is None or h is None:  # first order at the first step and onto k = 0
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        y = first_order(y, d, k[i], k[i + 1])
        x0_prev, h_prev = x0, h
        states.append(c[i + 1] * y)
    return _finish(y, states, return_intermediates)


@torch.no_grad()
def ddim_grid_sample(model: Model, grid: Grid, x_T: Tensor, eta: float = 0.0, generator: torch.Generator | None = None,
                     clip_x0: bool = False, return_intermediates: bool = False,
                     prediction: Prediction = "eps") -> Tensor | tuple[Tensor, list[Tensor]]:
    """DDIM (Song et al. 2021, Eq. 12) on any grid, in its alpha and sigma: x' = alpha' x0 + sqrt(sigma'² - s²) eps
    + s z with s = eta sigma' sqrt(1 - (alpha sigma' / (alpha' sigma))²), which on VP is Eq. 16's sigma. eta 0 is
    Euler's step; eta 1 draws x' from the posterior q(x' | x_t, x0), as DDPM does. It is how a flow model samples
    with noise (`ddim` in `sample`); VP models use `samplers.ddim_sample` on their integer timesteps."""
    alpha, sigma = grid.alpha.tolist(), grid.sigma.tolist()
    x = x_T
    states = [x_T]
    for i in range(len(grid.t)):
        out = model(x, grid.t[i].to(x.device).expand(x.shape[0]))
        x0, eps = split(prediction, grid.process, out, x, alpha[i], sigma[i])
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        a_next, s_next = alpha[i + 1], sigma[i + 1]
        noise = eta * s_next * max(0.0, 1 - (alpha[i] * s_next / (a_next * sigma[i])) ** 2) ** 0.5
        x = a_next * x0 + max(0.0, s_next**2 - noise**2) ** 0.5 * eps
        if noise > 0:
            x = x + noise * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        states.append(x)
    return _finish(x, states, return_intermediates)


SOLVERS = {"euler": euler_sample, "heun": heun_sample, "dpmpp_2m": dpmpp_2m_sample}
