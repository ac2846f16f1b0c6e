"""Latent diffusion's first stage: Stable Diffusion's KL autoencoder (diffusers' `AutoencoderKL`), trained here on
any dataset the DataModule serves, or read from a local diffusers folder (such as SD's `vae`).

    python -m diffusion_lit autoencoder fit --config configs/digits_autoencoder.yaml

A diffusion config then names it as `model.latent`'s autoencoder (`diffusion_lit.model.latent.Latent`): the checkpoint this writes, or a diffusers folder.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from diffusion_lit.core.errors import LoadsClearly, UserError, build_optimizer, reason
from diffusion_lit.data.images import grid, to_uint8
from diffusion_lit.core.optional import need
from diffusion_lit.core.trust import from_pretrained, read_checkpoint


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1], per image [B] (on the [0, 1] scale)."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


class AutoencoderModule(LoadsClearly, LightningModule):
    """Trains a diffusers `AutoencoderKL`: reconstruction (L1 or MSE, summed over an image) plus `kl_weight` times
    the KL divergence of the latent distribution from N(0, I), as in Rombach et al. 2022 without the perceptual and
    adversarial terms (their weights cannot be had offline).

    Args:
        image_size: image height and width (linked from the data).
        channels: image channels (linked from the data).
        block_out_channels: channels per level; each level after the first halves the image (3 levels: 4x smaller).
        latent_channels: channels of the latent.
        layers_per_block: residual blocks per level.
        norm_num_groups: GroupNorm groups; every level's channel count must be divisible by it.
        kl_weight: weight of the KL term.
        reconstruction: ``l1`` or ``mse``.
        optimizer: the optimizer class and its arguments.
    """

    cpu_recipe = "on a CPU, configs/digits_autoencoder.yaml trains an autoencoder in 5 minutes"  # CpuCost's line

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        block_out_channels: Sequence[int] = (32, 64, 64),
        latent_channels: int = 4,
        layers_per_block: int = 1,
        norm_num_groups: int = 16,
        kl_weight: float = 1e-6,
        reconstruction: str = "l1",
        optimizer: OptimizerCallable = torch.optim.Adam,
    ) -> None:
        super().__init__()
        if reconstruction not in ("l1", "mse"):
            raise UserError(f"reconstruction must be 'l1' or 'mse', got {reconstruction!r}")
        if latent_channels < 1 or layers_per_block < 1 or not block_out_channels or min(block_out_channels) < 1:
            raise UserError(f"latent_channels ({latent_channels}), layers_per_block ({layers_per_block}) and every "
                            f"block_out_channels entry ({list(block_out_channels)}) must be at least 1")
        if kl_weight < 0:
            raise UserError(f"kl_weight must not be negative (a negative weight rewards a divergent latent), got "
                            f"{kl_weight}")
        if image_size % 2 ** (len(block_out_channels) - 1):
            raise UserError(f"image_size {image_size} cannot be halved {len(block_out_channels) - 1} times for "
                            f"block_out_channels {list(block_out_channels)}: use fewer levels or resize the images")
        if bad := [c for c in block_out_channels if c % norm_num_groups]:
            raise UserError(f"block_out_channels {bad} are not divisible by norm_num_groups={norm_num_groups}")
        self.save_hyperparameters()
        diffusers = need("diffusers")
        levels = len(block_out_channels)
        self.vae = diffusers.AutoencoderKL(
            in_channels=channels, out_channels=channels, latent_channels=latent_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            norm_num_groups=norm_num_groups, sample_size=image_size,
        )
        self.optimizer = optimizer

    def loss(self, x: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, reconstruction, the KL term), each per image averaged over the batch."""
        posterior = self.vae.encode(x).latent_dist
        rec = self.vae.decode(posterior.sample() if sample else posterior.mode()).sample
        error = (rec - x).abs() if self.hparams.reconstruction == "l1" else (rec - x).pow(2)
        nll, kl = error.flatten(1).sum(1).mean(), posterior.kl().mean()
        return nll + self.hparams.kl_weight * kl, rec, kl

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, rec, kl = self.loss(batch[0])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/kl", kl)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x = batch[0]
        loss, rec, _ = self.loss(x, sample=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/psnr", psnr(rec.clamp(-1, 1), x).mean(), prog_bar=True, sync_dist=True)
        experiment = getattr(self.logger, "experiment", None)
        if batch_idx == 0 and hasattr(experiment, "add_image"):  # originals above, reconstructions below
            pair = torch.cat([x[:8], rec[:8].clamp(-1, 1)])
            experiment.add_image("reconstructions", grid(to_uint8(pair), 8), self.global_step)

    def configure_optimizers(self):
        return build_optimizer(self.optimizer, self.parameters())


def load_autoencoder(spec: str) -> tuple[nn.Module, float | None, float]:
    """(the frozen AutoencoderKL, its scaling factor or None when it has none, its shift) from a checkpoint of
    `AutoencoderModule` or a local diffusers folder (its own, or one with a `vae` sub-folder, as SD's)."""
    diffusers = need("diffusers")
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            checkpoint = read_checkpoint(path, advice="give a checkpoint of `diffusion_lit autoencoder fit`")
            hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
            hparams.pop("optimizer", None)
            module = AutoencoderModule(**hparams)
            module.load_state_dict(checkpoint["state_dict"])
        except UserError as err:  # named as the autoencoder's fault, not the diffusion checkpoint's
            raise UserError(f"autoencoder {spec}: {err}") from None
        except Exception as err:
            raise UserError(f"autoencoder {spec} is not a checkpoint of `diffusion_lit autoencoder fit` "
                            f"({reason(err)})") from None
        vae, scale, shift = module.vae, None, 0.0
    elif path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise UserError(f"autoencoder {spec}: no config.json there (nor in a vae sub-folder); give a folder "
                            "written by save_pretrained or a checkpoint of `diffusion_lit autoencoder fit`")
        vae = from_pretrained(diffusers.AutoencoderKL, folder, f"autoencoder {spec}",
                              "it could not be loaded as an AutoencoderKL ({reason})")
        scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    else:
        raise UserError(f"autoencoder {spec} does not exist: give a checkpoint of `diffusion_lit autoencoder fit` or "
                        "a local diffusers folder (one that moved: --autoencoder PATH on sample and evaluate, "
                        "--model.latent.autoencoder PATH on fit)")
    return vae.requires_grad_(False).eval(), scale, float(shift)


def latent_shape(vae: nn.Module, image_size: int) -> tuple[int, int]:
    """(channels, size) of the latent of an image_size image."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise UserError(f"image_size {image_size} is not a multiple of the autoencoder's downsampling ({factor})")
    return vae.config.latent_channels, image_size // factor
