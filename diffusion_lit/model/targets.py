"""What the network predicts, and the one place where it becomes x0 and eps.

Every process is x_t = alpha x0 + sigma eps (VP: alpha² + sigma² = 1; rectified flow: alpha = 1 - t, sigma = t);
`process` below is the process object (`diffusion_lit.model.process`), which gives v's coefficients. Each prediction target is a fixed mix a x0 + b eps of the two:
    eps: the noise (Ho et al. 2020)                      a = 0,        b = 1
    x0:  the clean image                                 a = 1,        b = 0
    v:   the path's velocity dx_t/dτ in its own time     VP (τ = atan(sigma/alpha)): a = -sigma, b = alpha
         (Salimans & Ho 2022; the flow's eps - x0)       flow (τ = t):                a = -1,     b = 1
so with x_t known, x0 and eps follow from the prediction by solving two linear equations (determinant
alpha b - sigma a).

A MeanFlow model (`objective.MeanFlow`) predicts none of them but u, the flow's average velocity over an interval
[r, t], which depends on r as well and is no fixed mix of x0 and eps: only the ``meanflow`` sampler reads it.
"""

from typing import Literal

import torch
from torch import Tensor

Prediction = Literal["eps", "v", "x0"]
PREDICTIONS = ("eps", "v", "x0")
AVERAGE_VELOCITY = "u"  # what a MeanFlow model predicts


def coefficients(prediction: Prediction, process, alpha: Tensor, sigma: Tensor) -> tuple:
    """(a, b) with target = a x0 + b eps."""
    if prediction == AVERAGE_VELOCITY:
        raise ValueError("a MeanFlow model's average velocity u is no fixed mix of x0 and eps: sample it with the "
                         "meanflow sampler")
    if prediction == "eps":
        return 0.0, 1.0
    if prediction == "x0":
        return 1.0, 0.0
    return process.v_coefficients(alpha, sigma)


def target(prediction: Prediction, process, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """What the network is trained to output for this x0 and eps."""
    a, b = coefficients(prediction, process, alpha, sigma)
    return a * x0 + b * eps


def inverse(prediction: Prediction, process, alpha, sigma) -> tuple:
    """(p, q, r, u) with x0 = p x_t + q out and eps = r x_t + u out, for the network's output `out` at x_t."""
    a, b = coefficients(prediction, process, alpha, sigma)
    det = alpha * b - sigma * a  # alpha for eps, -sigma for x0, 1 for v on both processes
    return b / det, -sigma / det, -a / det, alpha / det


def split(prediction: Prediction, process, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor):
    """(x0, eps) read from the network's output `out` at the state x_t."""
    if prediction == "eps":  # DDPM's x0 = (x_t - sqrt(1 - ᾱ_t) eps) / sqrt(ᾱ_t), as it was computed before v and x0
        return (x_t - sigma * out) / alpha, out
    p, q, r, u = inverse(prediction, process, alpha, sigma)
    return p * x_t + q * out, r * x_t + u * out


def min_snr_weight(prediction: Prediction, process, alpha: Tensor, sigma: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023): the loss on x0 weighted by min(SNR, gamma), SNR = alpha² / sigma², written
    for the target the network predicts. An error d on x0 is an error (det / sigma) d on the target, so the target's
    weight is min(SNR, gamma) sigma² / det²: min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and, on VP,
    min(SNR, gamma) / (SNR + 1) for v."""
    snr = alpha**2 / sigma**2  # inf at sigma = 0
    if prediction == "eps":
        return torch.clamp(gamma / snr, max=1.0)  # = min(SNR, gamma) / SNR, finite at SNR = 0
    if prediction == "x0":
        return torch.clamp(snr, max=gamma)
    a, b = coefficients(prediction, process, alpha, sigma)
    det = alpha * b - sigma * a
    return torch.clamp(snr, max=gamma) * sigma**2 / det**2
