"""Guidance as one wrapper over the model that the samplers call: classifier-free guidance (the null condition as
the weak side, Ho & Salimans 2022), autoguidance (a weaker denoiser of the same data, Karras et al. 2024), and the
interval of noise levels where either applies (Kynkäänniemi et al. 2024). The samplers never learn which they got;
the wrapper counts the network evaluations it makes.

The guide that autoguidance needs is a `Guide`: a small network trained beside the main one in the same `fit`,
with its own EMA (a part of the config, `model.guide`), or an earlier or smaller checkpoint of the same process.
On a class or text model the guide may see the null condition instead of each sample's: the weak side is then both
less trained and unconditional, autoguidance and classifier-free guidance in one pair of passes.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_lit.core.errors import UserError
from diffusion_lit.model.ema import PowerEMA, averaged
from diffusion_lit.nets.unet import UNet, null_labels

Model = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> the network's prediction
NetFactory = Callable[[int, int, int], nn.Module]  # (in_channels, image_size, num_classes) -> out = net(x_t, t, y)


class Guide(nn.Module):
    """Autoguidance's weak model, trained beside the main one on the same batches (its own draws of t and noise):
    a network of less capacity with a shorter EMA. Sampling guides away from its EMA copy.

    Args:
        net: builds the guide's network, as `model.net` does (a class path and its arguments); make it smaller.
        ema_decay: its EMA's decay once warmed up (shorter than the main model's: EDM2's guides average less), or
            a `PowerEMA` (`diffusion_lit.model.ema`: the guide then guides with its first width's average).
        ema_warmup: ramp the decay as (1 + n) / (10 + n) over the first updates (a number k: (1 + n) / (k + n)).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, net: NetFactory = UNet,
                 ema_decay: float | PowerEMA = 0.99, ema_warmup: bool | float = True, **text) -> None:
        super().__init__()
        self.net = net(in_channels, image_size, num_classes, **text)
        self.ema = averaged(self.net, ema_decay, ema_warmup)


@dataclass
class Evaluations:
    """Network passes over images made by the samplers, the model's and the guide's; per image, for `sample`."""

    model: int = 0
    guide: int = 0
    images: int = 0

    def per_image(self) -> tuple[float, float]:
        return self.model / max(self.images, 1), self.guide / max(self.images, 1)


Interval = tuple[float, float]
GuideCondition = Literal["same", "null"]  # what a guide is given: each sample's condition, or the null one


def check_interval(interval: Interval | None) -> Interval:
    """(lo, hi) with 0 <= lo < hi (hi may be inf); None: every level."""
    if interval is None:
        return 0.0, math.inf
    lo, hi = interval
    if not 0.0 <= lo < hi:
        raise UserError(f"guidance_interval must be two noise levels (sigma / alpha) LO < HI, LO >= 0, got {interval}")
    return float(lo), float(hi)


def check_guide_condition(guide_condition: str) -> None:
    """A UserError unless it is ``same`` or ``null``."""
    if guide_condition not in ("same", "null"):
        raise UserError(f"guide_condition must be 'same' (the guide sees each sample's condition) or 'null' (the null "
                        f"label or empty prompt), got {guide_condition!r}")


def guided(net: nn.Module, y: Tensor | None, guidance_scale: float, null: Tensor | None = None,
           guide: nn.Module | None = None, interval: Interval | None = None, schedule=None,
           counts: Evaluations | None = None, guide_condition: GuideCondition = "same") -> Model:
    """The guided model D = D_weak + w (D_main - D_weak) for the samplers.

    D_main is `net` at the condition y. D_weak is the `guide` at the same condition (autoguidance), the guide at the
    null condition (`guide_condition` ``null``: autoguidance and classifier-free guidance in one weak model) or,
    without a guide, `net` at the null condition (the null label, or `null`: the empty prompt's features [1, L, D]; the two
    passes batched into one call). w = 1 is D_main alone, w = 0 D_weak alone. With an `interval` (lo, hi] of noise
    levels sigma / alpha (`schedule` tells them from t), guidance applies only there and D_main alone elsewhere: one
    pass. The mix is the same on eps, v or x0: each is linear in the others at a given x_t.
    """
    lo, hi = check_interval(interval)
    check_guide_condition(guide_condition)
    if interval is not None and schedule is None:
        raise ValueError("a guidance interval needs the schedule, to tell noise levels from t")
    counts = counts if counts is not None else Evaluations()
    if y is not None and (guide is None or guide_condition == "null"):
        weak_y = null_labels(net.num_classes, y) if null is None else null.expand(len(y), *null.shape[1:])
    else:
        weak_y = y  # the guide sees the same condition (or none: an unconditional model)

    def call(network: Model, x_t: Tensor, t: Tensor, condition: Tensor | None, rows: Tensor | None) -> Tensor:
        if condition is None:
            return network(x_t, t)
        return network(x_t, t, condition if rows is None else condition[rows])

    def main(x_t: Tensor, t: Tensor) -> Tensor:
        counts.model += len(x_t)
        return call(net, x_t, t, y, None)

    def weak(x_t: Tensor, t: Tensor, rows: Tensor | None = None) -> Tensor:
        if guide is None:
            counts.model += len(x_t)
            return call(net, x_t, t, weak_y, rows)
        counts.guide += len(x_t)
        return call(guide, x_t, t, weak_y, rows)

    def both(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if guide is not None:
            return main(x_t, t), weak(x_t, t)
        counts.model += 2 * len(x_t)  # classifier-free: the two passes in one call
        return net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, weak_y])).chunk(2)

    def mix(strong: Tensor, low: Tensor) -> Tensor:
        return low if guidance_scale == 0.0 else low + guidance_scale * (strong - low)

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        if guidance_scale == 1.0:
            return main(x_t, t)
        if interval is not None:
            level = schedule.noise_level(t)
            inside = (level > lo) & (level <= hi)
            if not inside.any():
                return main(x_t, t)
            if not inside.all():  # a batch of many t (a teacher's): the weak side on the rows inside only
                rows = inside.nonzero().flatten().to(x_t.device)
                strong = main(x_t, t)
                return strong.index_put((rows,), mix(strong[rows], weak(x_t[rows], t[rows], rows)))
        return weak(x_t, t) if guidance_scale == 0.0 else mix(*both(x_t, t))

    return model
