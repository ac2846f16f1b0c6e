"""Fast paths, each a switch that leaves the results the same (within rounding): torch.compile and channels-last
memory (run-time acts, the `Accelerate` callback: not part of the model or its checkpoints); bf16 autocast is
`core.precision`'s. Also
what a run costs on a CPU, said in one line: bf16 where the CPU has no bf16 instructions, a run of hours (`CpuCost`)."""

import math
import sys
from functools import cache
from time import perf_counter

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import Timer
from torch import nn

from diffusion_lit.core.errors import reason, say


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


# Each a CPU flag torch.cpu.get_capabilities() reports: x86's AVX-512 bf16 and AMX, ARM's bf16 (NEON) and SVE bf16.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_name() -> str:
    """The CPU's model name as torch reads it (cpuinfo), or its architecture."""
    capabilities = torch.cpu.get_capabilities()
    return str(capabilities.get("cpu_name") or capabilities.get("architecture") or "unknown CPU")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions; without them PyTorch's bf16 kernels fall back to generic
    code, tens of times slower than float32 (docs/speed.md)."""
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(flag) for flag in BF16_FLAGS)


def warn_bf16(precision: str | None, device: torch.device | str, option: str) -> None:
    """One line when bf16 (`bf16-mixed`, `bf16-true`) is asked for on a CPU without bf16 instructions; `option` is
    how the user set it (`--precision`, `--trainer.precision`)."""
    if str(precision).startswith("bf16") and torch.device(device).type == "cpu" and not cpu_has_bf16():
        say(f"{option} {precision}: this CPU ({cpu_name()}) has no bf16 instructions ({', '.join(BF16_FLAGS)}), so "
            "PyTorch runs bf16 in generic code, tens of times slower than float32 (a 1024x1024 matmul: 0.7 GFLOP/s "
            f"against 118 in float32 on an AVX2-only AMD EPYC, Zen 2); {option} 32-true is the fast one here")


SLOW_RUN_SECONDS = 3600.0  # CpuCost says nothing of a run that would end within this (an hour)
TIMED_STEPS = 3  # optimizer steps timed after the first (which holds the warm-up: allocation, compilation, caches)
TIMED_SECONDS = 30.0  # ... or fewer, once the timed ones have taken this long


def duration(seconds: float) -> str:
    """'47 minutes', '5.3 hours', '12.4 days'."""
    if seconds < 5400:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours" if seconds < 2 * 86400 else f"{seconds / 86400:.1f} days"


def run_left(trainer, per_step: float) -> tuple[float, str]:
    """(seconds, what ends it) of the rest of a run whose optimizer steps take `per_step` seconds: the first of
    max_steps, max_epochs and max_time to be reached; inf for a run of no set length."""
    step, limits = trainer.global_step, [(math.inf, "")]
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        left = max(0, trainer.max_steps - step)
        limits.append((left * per_step, f"{left:,} more steps to max_steps {trainer.max_steps:,}"))
    batches = trainer.num_training_batches
    if trainer.max_epochs not in (None, -1) and 0 < batches < math.inf:
        left = max(0, trainer.max_epochs * math.ceil(batches / trainer.accumulate_grad_batches) - step)
        limits.append((left * per_step, f"{left:,} more steps to max_epochs {trainer.max_epochs}"))
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None and (remaining := timer.time_remaining("train")) is not None:
        limits.append((remaining, f"max_time {duration(remaining + timer.time_elapsed('train'))}"))
    return min(limits, key=lambda limit: limit[0])


def cpu_recipe(pl_module) -> str:
    """What to try instead on a CPU, for this kind of model (its own `cpu_recipe`, or the diffusion recipes)."""
    return getattr(pl_module, "cpu_recipe", None) or (
        "on a CPU, try configs/mnist_cpu.yaml (MNIST digits in 10 minutes) or configs/tiny_cpu.yaml (a small network, "
        "a few steps a second)")


class CpuCost(Callback):
    """One line each on what a `fit` on a CPU costs (the CLI gives every fit this callback): bf16 asked for where
    the CPU has no bf16 instructions, and, once a few steps after the first are timed, a run that would take longer
    than SLOW_RUN_SECONDS (an hour): its time per step, the time the rest would take, and the CPU recipes to try.
    Nothing on a GPU, nothing for a run that ends within the hour."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last_step, self.done = -1, True

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            warn_bf16(trainer.precision, trainer.strategy.root_device, "--trainer.precision")

    def on_train_start(self, trainer, pl_module) -> None:
        self.times, self.last_step = [], trainer.global_step  # a resumed run starts at its step
        self.done = trainer.strategy.root_device.type != "cpu"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.done or trainer.global_step == self.last_step:  # once per optimizer step, not per micro-batch
            return
        self.last_step = trainer.global_step
        self.times.append(perf_counter())
        timed = len(self.times) - 1  # the steps after the first
        if timed < TIMED_STEPS and not (timed and self.times[-1] - self.times[0] >= TIMED_SECONDS):
            return
        self.done = True
        per_step = (self.times[-1] - self.times[0]) / timed
        seconds, limit = run_left(trainer, per_step)
        if seconds <= SLOW_RUN_SECONDS or math.isinf(seconds):
            return
        first, last = trainer.global_step - timed + 1, trainer.global_step
        steps = f"step {last}" if timed == 1 else f"steps {first}-{last}"
        say(f"fit: a training step takes {per_step:.2f} s on this CPU ({cpu_name()}; {steps}, after the first "
            f"one's warm-up), so the rest of the run would take about "
            f"{duration(seconds)} ({limit}): the config is sized for a GPU; {cpu_recipe(pl_module)}. (Said of a CPU "
            f"run longer than {duration(SLOW_RUN_SECONDS)}.)")
