"""Fast paths, each a switch that leaves the results the same (within rounding): torch.compile and channels-last
memory (run-time acts, the `Accelerate` callback: not part of the model or its checkpoints) and bf16 autocast."""

import sys
from contextlib import AbstractContextManager
from functools import cache
from typing import Literal

import torch
from lightning.pytorch import Callback
from torch import nn

from diffusion_lit.errors import reason


@cache
def compile_failure(device_type: str) -> str | None:
    """Why torch.compile cannot run on this device type (no C++ compiler, no Triton, an unsupported Python), or None.

    Compiles and runs a one-line function once per process, which is where such failures show up.
    """
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device_type))
    except Exception as err:  # the failure differs by platform: RuntimeError, BackendCompilerFailed, ...
        return reason(err)
    return None


def compile_modules(modules: list[nn.Module], device: torch.device) -> bool:
    """Compiles the modules in place (state_dict keys unchanged); if torch.compile cannot run here, says so in one
    line and leaves them as they are."""
    failure = compile_failure(torch.device(device).type)
    if failure:
        print(f"compile: torch.compile is unavailable on {device} ({failure}); running uncompiled", file=sys.stderr)
        return False
    for module in modules:
        module.compile()
    return True


Precision = Literal["32-true", "bf16-mixed"]
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast for Lightning's mixed precisions ("bf16-mixed", "16-mixed"); nothing for the others ("32-true")."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(torch.device(device).type, dtype, enabled=dtype is not None)


def to_channels_last(net: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the image x_t in channels-last memory format, as the network's weights are."""
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


class Accelerate(Callback):
    """Run-time speed switches for `fit`, applied to the denoiser and its EMA copy when training starts; they
    change neither the model nor its checkpoints.

    Args:
        channels_last: keep the denoisers' weights (and so their activations) in channels-last memory format.
        compile: `torch.compile` the denoisers (skipped, with one line saying why, where it cannot run).
    """

    def __init__(self, channels_last: bool = False, compile: bool = False) -> None:
        self.channels_last, self.compile, self.done = channels_last, compile, False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.done:
            return
        self.done = True
        nets = [pl_module.net, *([pl_module.ema.module] if pl_module.ema is not None else [])]
        if self.channels_last:
            for net in nets:
                net.to(memory_format=torch.channels_last)
                net.register_forward_pre_hook(to_channels_last)
        if self.compile:
            compile_modules(nets, trainer.strategy.root_device)
