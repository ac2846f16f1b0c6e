"""The EMA of a trained network: a constant decay with a warm-up ramp (the default), or EDM2's power-function
averages (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696),
whose length is chosen after training from snapshots (`diffusion_lit.model.snapshots`).

A power-function average after t optimizer steps weighs the weights theta_i of step i (i = 1..t) in proportion to
i^gamma: the update theta_hat <- beta_t theta_hat + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1) gives
theta_i the weight ((i / t)^(gamma + 1) - ((i - 1) / t)^(gamma + 1)) exactly (`power_profile`). Its relative width
sigma_rel (the profile's standard deviation over t) is sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (EDM2, eq. 3).
"""

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from diffusion_lit.core.errors import UserError

WIDEST = math.sqrt(1 / 12)  # sigma_rel of gamma = 0, the plain mean of every step; gamma < 0 would weigh the start


def sigma_rel_of(gamma: float) -> float:
    """The relative width of the power profile t^gamma (EDM2, eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent whose profile has relative width sigma_rel: the largest real root of
    (gamma + 2)^2 (gamma + 3) sigma_rel^2 = gamma + 1, i.e. gamma^3 + 7 gamma^2 + (16 - s) gamma + 12 - s = 0 with
    s = sigma_rel^-2."""
    check_sigma_rel(sigma_rel, "sigma_rel")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def check_sigma_rel(sigma_rel: float, option: str) -> None:
    """A UserError unless 0 < sigma_rel < WIDEST."""
    if not 0.0 < sigma_rel < WIDEST:
        raise UserError(f"{option} must be above 0 and below {WIDEST:.4f} (the width of the plain mean of every "
                        f"step), got {sigma_rel}: EDM2's widths are 0.05 to 0.2")


def power_profile(steps: np.ndarray, t: int, gamma: float) -> np.ndarray:
    """The weight the power-function average after t updates gives the weights of each of `steps` (1-based; zero
    after t), in float64: the weights over 1..t sum to one."""
    i = steps.astype(np.float64)
    weights = (np.minimum(i, t) / t) ** (gamma + 1) - (np.minimum(i - 1, t) / t) ** (gamma + 1)
    return np.where(i <= t, weights, 0.0)


class PowerEMA:
    """EDM2's power-function EMA, as a model's `ema_decay`: the averages of the given relative widths are kept
    (updated after every optimizer step) and saved as snapshots, from which `sample`, `evaluate` and `export` rebuild
    the average of any width in their range (``--ema_length``). Training-time sampling (grids, FID, validation) uses
    the first width.

    Args:
        sigma_rels: the relative widths tracked (EDM2: 0.05 and 0.10); each costs one copy of the trained weights.
        snapshot_every: save the averages every this many optimizer steps (and when training ends).
        keep: at most this many snapshots; past it the one whose removal leaves the steps most evenly spread goes.
        snapshot_dtype: the snapshots' precision: ``float16`` (half the disk; rebuilt averages differ from float32
            ones by about 1e-3 of a weight), ``bfloat16`` or ``float32``.
    """

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10), snapshot_every: int = 500, keep: int = 40,
                 snapshot_dtype: str = "float16") -> None:
        # Checked when the model takes it (`check`): a UserError raised here would reach the user inside
        # jsonargparse's report of the ema_decay union's failed types.
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.snapshot_every, self.keep, self.snapshot_dtype = snapshot_every, keep, snapshot_dtype

    def check(self) -> tuple[float, ...]:
        """The exponents of the tracked widths; a UserError for settings that make no sense."""
        if not self.sigma_rels or len(set(self.sigma_rels)) < len(self.sigma_rels):
            raise UserError(f"PowerEMA's sigma_rels must be one or more different widths (EDM2 tracks [0.05, 0.10]), "
                            f"got {list(self.sigma_rels)}")
        for s in self.sigma_rels:
            check_sigma_rel(s, "PowerEMA's sigma_rels")
        if self.snapshot_every < 1:
            raise UserError(f"PowerEMA's snapshot_every must be at least 1 step, got {self.snapshot_every}")
        if self.keep < 2:
            raise UserError(f"PowerEMA's keep must be at least 2 snapshots (a width is rebuilt from several), got "
                            f"{self.keep}")
        if self.snapshot_dtype not in ("float16", "bfloat16", "float32"):
            raise UserError(f"PowerEMA's snapshot_dtype must be float16, bfloat16 or float32, got "
                            f"{self.snapshot_dtype!r}")
        return tuple(gamma_of(s) for s in self.sigma_rels)

    def __repr__(self) -> str:
        return f"PowerEMA(sigma_rels={list(self.sigma_rels)})"


class PowerAveraged(nn.Module):
    """The power-function averages of a trained module, one copy per tracked width; `module` is the first (the one
    the model samples with), `others` the rest. Frozen weights (a LoRA's base) are shared, not copied."""

    def __init__(self, module: nn.Module, ema: PowerEMA) -> None:
        super().__init__()
        self.settings, self.sigma_rels, self.gammas = ema, ema.sigma_rels, ema.check()
        self.trained = [name for name, p in module.named_parameters() if p.requires_grad]
        copies = [frozen_copy(module) for _ in self.gammas]
        self.module, self.others = copies[0], nn.ModuleList(copies[1:])
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))

    def averages(self) -> list[nn.Module]:
        return [self.module, *self.others]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """One update per optimizer step: beta_t = (1 - 1/t)^(gamma + 1) after the t-th (the first copies)."""
        self.n_averaged += 1
        t = int(self.n_averaged)
        params = dict(model.named_parameters())
        current = [params[name].detach() for name in self.trained]
        for average, gamma in zip(self.averages(), self.gammas):
            own = dict(average.named_parameters())
            torch._foreach_lerp_([own[name] for name in self.trained], current, 1.0 - (1.0 - 1.0 / t) ** (gamma + 1))

    def trained_state(self, index: int) -> dict[str, Tensor]:
        """The trained weights of one average (what a snapshot holds of it)."""
        own = dict(self.averages()[index].named_parameters())
        return {name: own[name].detach() for name in self.trained}


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy without gradients whose frozen weights are the original's own tensors."""
    clone = copy.deepcopy(module).requires_grad_(False)
    share_frozen(module, clone)
    return clone


def share_frozen(module: nn.Module, clone: nn.Module) -> None:
    for name, p in module.named_parameters():  # a frozen weight (LoRA's base) is shared, not copied
        if not p.requires_grad:
            owner, _, leaf = name.rpartition(".")
            setattr(clone.get_submodule(owner), leaf, p)


@dataclass
class EMAUpdate:
    """AveragedModel's update with the warm-up ramp (a class, not a closure: a model built in Python pickles)."""

    decay: float
    ramp: float | None

    def __call__(self, ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        n = int(num_averaged)
        d = min(self.decay, (1 + n) / (self.ramp + n)) if self.ramp is not None else self.decay
        for ema, param in zip(ema_params, params):
            if ema.data_ptr() != param.data_ptr():  # a frozen weight the copy shares (LoRA) needs no averaging
                ema.lerp_(param, 1 - d)


def averaged(module: nn.Module, decay: "float | PowerEMA", warmup: bool | float) -> AveragedModel | PowerAveraged:
    """The EMA copy of a trained module (no gradients). A number: ema <- decay ema + (1 - decay) param after each
    optimizer step; warming up, decay = min(decay, (1 + n) / (k + n)) after n updates, k = 10 (`warmup` true) or the
    number `warmup`: an average over about the last n / (k - 1) steps, whose length grows with the run until `decay`
    caps it; a smaller k averages longer. A `PowerEMA`: its power-function averages (`warmup` unused)."""
    if isinstance(decay, PowerEMA):
        return PowerAveraged(module, decay)
    if not 0.0 <= decay <= 1.0:
        raise UserError(f"ema_decay must lie in [0, 1], got {decay}")
    ramp = 10.0 if warmup is True else float(warmup) if warmup is not False else None
    if ramp is not None and ramp <= 1:
        raise UserError(f"ema_warmup must be true, false or a number above 1 (the k of (1 + n) / (k + n)), got "
                        f"{warmup}")
    averaged_model = AveragedModel(module, multi_avg_fn=EMAUpdate(decay, ramp), use_buffers=False).requires_grad_(False)
    share_frozen(module, averaged_model.module)
    return averaged_model
