"""`InitFrom`: a new run started from another model's weights (a run-time act, so a callback, not a model setting)."""

from pathlib import Path

from lightning.pytorch import Callback

from diffusion_lit.core.errors import UserError, say
from diffusion_lit.io.diffusers_io import load_unet_weights
from diffusion_lit.io.loading import start_from_checkpoint
from diffusion_lit.model.schedulers import process_of
from diffusion_lit.nets.unet import UNet


class InitFrom(Callback):
    """Starts a new run from the weights of a local diffusers `UNet2DModel` (a folder written by save_pretrained, or
    a pipeline folder with `unet/`), loaded into the UNet and its EMA copy after checking that the plans match and
    that the pipeline's scheduler (when there is one) is the model's process and prediction; or from a `fit`
    checkpoint (a .ckpt file) of the same kind of model, its EMA weights, to tune it (a flow model can start a
    MeanFlow one: `loading.start_from_checkpoint`). A resumed run keeps its own weights.

    Args:
        path: the UNet2DModel or pipeline folder, or a checkpoint file.
    """

    def __init__(self, path: str) -> None:
        self.path = str(Path(path).expanduser().resolve())

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is not None:
            return
        if Path(self.path).is_file() or self.path.endswith(".ckpt"):  # a missing one is said as a checkpoint
            return start_from_checkpoint(pl_module, self.path)
        if not isinstance(pl_module.net, UNet):
            raise UserError(f"InitFrom loads a UNet2DModel into diffusion_lit's UNet; this model's net is a "
                            f"{type(pl_module.net).__name__}")
        scheduler = load_unet_weights(pl_module.net, self.path)
        if scheduler is not None:
            ours = pl_module.process.spec() | {"prediction": pl_module.objective.prediction}
            for key, value in process_of(scheduler).items():
                if ours.get(key, value) != value:
                    raise UserError(f"InitFrom {self.path}: its scheduler says {key} {value!r} and this model has "
                                    f"{ours[key]!r}: give the model that process and objective")
        if pl_module.ema is not None:
            pl_module.ema.module.load_state_dict(pl_module.net.state_dict())
        say(f"InitFrom: the UNet starts from {self.path}")
