"""Today's constant-decay EMA kept beside a run's power-function averages, for comparing the two on one training
trajectory (docs/ema.md): the callback averages the trained denoiser as `ema_decay` and `ema_warmup` would, and
`python benchmarks/ema_alongside.py CKPT` writes CKPT's copy whose EMA weights are that average (constant.ckpt
beside it), which `sample` and `evaluate` draw as any checkpoint.

    python -m diffusion_lit fit --config configs/mnist_cpu.yaml --model.ema_decay diffusion_lit.model.ema.PowerEMA \
        --trainer.callbacks+=benchmarks.ema_alongside.ConstantEMA --trainer.callbacks.decay 0.999
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

from diffusion_lit.core.files import write_atomic
from diffusion_lit.model.ema import averaged

NAME = "constant_ema.pt"


class ConstantEMA(Callback):
    """Keeps averaged(net, decay, warmup) beside the model's own EMA; saves its weights beside the checkpoints when
    training ends (a run of one piece: it is not resumed)."""

    def __init__(self, decay: float = 0.999, warmup: bool | float = True) -> None:
        self.decay, self.warmup, self.ema, self.step = decay, warmup, None, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.ema, self.step = averaged(pl_module.net, self.decay, self.warmup), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.step:  # once per optimizer step, as the model's own EMA
            self.step = trainer.global_step
            self.ema.update_parameters(pl_module.net)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            state = self.ema.module.state_dict()
            write_atomic(Path(trainer.checkpoint_callback.dirpath, NAME), lambda f: torch.save(state, f),
                         "the constant EMA", "free some space")


def main(ckpt: str) -> None:
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    constant = torch.load(Path(ckpt).parent / NAME, map_location="cpu", weights_only=True)
    for key, value in constant.items():
        checkpoint["state_dict"][f"ema.module.{key}"] = value
    out = Path(ckpt).with_name("constant.ckpt")
    write_atomic(out, lambda f: torch.save(checkpoint, f), "the checkpoint", "free some space")
    print(f"wrote {out}: {ckpt} with the constant EMA of step {checkpoint['global_step']}")


if __name__ == "__main__":
    main(sys.argv[1])
