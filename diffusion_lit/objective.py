"""The training objective, a part that a config names (`model.objective`): what the network predicts, how training
draws t, how the loss is weighted, and the loss itself."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lit.errors import UserError
from diffusion_lit.schedule import TimeSampling
from diffusion_lit.targets import PREDICTIONS, Prediction, min_snr_weight, target

Weighting = Literal["none", "min_snr"]


class Objective:
    """The diffusion objective: the MSE between the network's prediction and its target at a drawn t, weighted per
    sample by Min-SNR-gamma when asked (with eps, uniform t and no weighting: DDPM's simple loss).

    Args:
        prediction: what the network predicts: ``eps``, ``v`` (VP: alpha eps - sigma x0; flow: eps - x0) or ``x0``;
            unset, the process's own (eps for VP, v for the flow).
        loss_weighting: ``none`` (the plain MSE on the prediction) or ``min_snr`` (Min-SNR-gamma, Hang et al. 2023).
        snr_gamma: gamma of Min-SNR-gamma.
        t_sampling: how training draws t: ``uniform`` or ``logit_normal`` (SD3's, mean 0, std 1); unset, the
            process's own (uniform for VP, logit-normal for the flow).
    """

    def __init__(self, prediction: Prediction | None = None, loss_weighting: Weighting = "none",
                 snr_gamma: float = 5.0, t_sampling: TimeSampling | None = None) -> None:
        if prediction not in (None, *PREDICTIONS):
            raise UserError(f"unknown prediction {prediction!r}: use 'eps', 'v' or 'x0'")
        if loss_weighting not in ("none", "min_snr") or snr_gamma <= 0:
            raise UserError(f"loss_weighting must be 'none' or 'min_snr' with snr_gamma > 0, got {loss_weighting!r} "
                            f"and {snr_gamma}")
        if t_sampling not in (None, "uniform", "logit_normal"):
            raise UserError(f"unknown t_sampling {t_sampling!r}: use 'uniform' or 'logit_normal'")
        self.prediction, self.loss_weighting, self.snr_gamma, self.t_sampling = (
            prediction, loss_weighting, snr_gamma, t_sampling)

    def bind(self, process) -> "Objective":
        """This objective on `process`: its unset choices filled in with the process's own, a prediction that
        cannot be sampled there refused."""
        self.prediction = self.prediction or process.default_prediction
        self.t_sampling = self.t_sampling or process.default_t_sampling
        if self.prediction not in process.predictions:
            raise UserError(f"prediction {self.prediction} cannot be sampled on {type(process).__name__} (x0 is lost "
                            f"where alpha is 0): use {' or '.join(process.predictions)}")
        return self

    def loss(self, net: nn.Module, process, x0: Tensor, y: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """The loss of `net` on the clean batch x0 (conditions y), its t and noise drawn with `generator`."""
        t = process.draw_t(x0.shape[0], self.t_sampling, x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        alpha, sigma = process.alpha_sigma(t, x0.ndim)
        out = net(alpha * x0 + sigma * eps, process.network_time(t), y)
        goal = target(self.prediction, process, x0, eps, alpha, sigma)
        if self.loss_weighting == "none":
            return F.mse_loss(out, goal)
        weight = min_snr_weight(self.prediction, process, alpha, sigma, self.snr_gamma)
        return (weight.flatten() * (out.float() - goal).pow(2).flatten(1).mean(1)).mean()
