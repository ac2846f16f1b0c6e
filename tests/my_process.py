"""A noise process of "the user's own package", written against diffusion_lit.model.process.Process as docs/extending.md
shows: EDM's variance-exploding process (Karras et al. 2022), x_t = x0 + sigma eps with sigma from sigma_min to
sigma_max geometrically over t in [0, 1]."""

import torch
from torch import Tensor

from diffusion_lit.model.process import Process


class VE(Process):
    """Variance exploding: alpha = 1, sigma = sigma_min^(1 - t) sigma_max^t.

    Args:
        sigma_min: the noise level at t = 0.
        sigma_max: the noise level at t = 1.
    """

    default_prediction = "x0"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 20.0) -> None:
        super().__init__()
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        t = t.reshape(-1, *([1] * (ndim - 1)))
        sigma = self.sigma_min ** (1 - t) * self.sigma_max**t
        return torch.ones_like(sigma), sigma

    def spec(self) -> dict:
        return {"process": "ve", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}
