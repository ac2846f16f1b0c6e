"""Fast paths, each a switch that leaves the results the same (within rounding): torch.compile, bf16 autocast,
and a grad-free mode for sampling. The channels_last switch lives in the module (weights and a pre-hook)."""

import sys
from contextlib import AbstractContextManager
from functools import cache
from typing import Literal

import torch
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


def grad_off(inference_mode: bool) -> AbstractContextManager:
    """torch.inference_mode (no autograd bookkeeping at all) or the plainer torch.no_grad."""
    return torch.inference_mode() if inference_mode else torch.no_grad()
