"""Where the denoiser works, a part that a config names (`model.latent`): pixels (left out: the plain case, images
as they are) or an autoencoder's latent space (`Latent`, Rombach et al. 2022), with the latents' scale inside it
(as EDM2 keeps it inside its encoders)."""

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_lit.model.autoencoder import latent_shape, load_autoencoder
from diffusion_lit.core.errors import UserError, say
from diffusion_lit.nets.frozen import Frozen

SCALE_IMAGES = 512  # training images encoded to estimate the latents' scale


def fingerprint(module: nn.Module) -> str:
    """A short hash of a module's weights (names, shapes and values): the same weights give the same string."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):  # as float32, whatever precision it was cast to
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().reshape(-1).numpy().tobytes())
    return digest.hexdigest()[:16]


def absolute(spec: str | None) -> str | None:
    """An existing path made absolute; anything else (None, a missing path) as it is."""
    if spec is None or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


class ChannelMismatch(UserError):
    """An autoencoder of another channel count than the images: said for `fit`, whose data the user chooses; a
    loaded checkpoint says it its own way (`channels` is then what the model was trained on)."""

    def __init__(self, path: str, takes: int, channels: int) -> None:
        self.path, self.takes, self.channels = path, takes, channels
        super().__init__(f"the autoencoder {path} takes {takes}-channel images and the data has {channels}: use data "
                         f"of {takes} channels, or another autoencoder")


class Pixels(nn.Module):
    """Pixel space: the denoiser works on the images themselves, in [-1, 1]."""

    clip_x0 = True  # samplers may clip x0 to [-1, 1]
    pixels = True  # the denoiser's output is the image (diffusers' UNet2DModel pipelines can hold it)

    def bind(self, channels: int, image_size: int) -> tuple[int, int, int]:
        """The shape the denoiser works on, for images of this many channels and this size."""
        return channels, image_size, image_size

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What the denoiser learns from."""
        return images

    def decode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] from what the denoiser made."""
        return x

    def on_fit_start(self, module, datamodule) -> None:
        """Prepares what training needs (a latent scale, cached latents)."""

    def fingerprint(self) -> str | None:
        """The fingerprint of the autoencoder's weights, which checkpoints record (None: nothing to check)."""
        return None

    def spec(self) -> dict:
        """What a guide must share with the model."""
        return {"autoencoder": None}


class Latent(Pixels):
    """The latent space of a frozen autoencoder, read from its own file whenever the model is built (it is not saved
    in this model's checkpoints; its fingerprint is, and is checked on load).

    Args:
        autoencoder: a checkpoint of `diffusion_lit autoencoder fit` or a local diffusers folder with an
            `AutoencoderKL` (SD's `vae`).
        scale: multiply the latents by this; unset, the autoencoder's own scaling factor (a diffusers folder's), or
            for one of ours 1 / std of the latents of the first 512 training images, measured when fit starts.
        cache: encode the training images once when fit starts (their latent distributions, from which each step
            draws) instead of at every step: for datasets that fit in memory.
    """

    clip_x0 = False  # latents are not bounded by [-1, 1]
    pixels = False
    fit_option = "--model.latent.autoencoder PATH"  # how `fit` points at a moved autoencoder
    warn_eps = True  # say that eps prediction samples badly here (off where the prediction is not a choice: SD)

    def __init__(self, autoencoder: str, scale: float | None = None, cache: bool = False) -> None:
        super().__init__()
        if scale is not None and scale <= 0:
            raise UserError(f"the latent scale must be positive, got {scale}")
        self.path, self.cache = absolute(autoencoder), cache
        vae, own_scale, self.shift = load_autoencoder(self.path)
        self.frozen = Frozen(autoencoder=vae)
        # 0 until measured when fit starts; saved, so a resumed or loaded model uses the same scale.
        self.register_buffer("scale", torch.tensor(float(scale or own_scale or 0.0)))
        self.cached = False  # the data serves latent distributions (cache), not images
        self._fingerprint: str | None = None

    @property
    def vae(self) -> nn.Module:
        return self.frozen["autoencoder"]

    def bind(self, channels: int, image_size: int) -> tuple[int, int, int]:
        if self.vae.config.in_channels != channels:
            raise ChannelMismatch(self.path, self.vae.config.in_channels, channels)
        latent_channels, latent_size = latent_shape(self.vae, image_size)
        return latent_channels, latent_size, latent_size

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The scaled latents drawn from the images' latent distribution (computed here, or cached) with
        `generator`."""
        if self.cached:  # [B, 2C, h, w]: the mean and log-variance, as diffusers keeps them
            mean, logvar = images.chunk(2, dim=1)
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latents = mean + (0.5 * logvar.clamp(-30, 20)).exp() * noise
        else:
            latents = self.distribution(images).sample(generator).float()
        return (latents - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        return self.vae.decode((x / self.scale + self.shift).to(self.vae.dtype)).sample.float().clamp(-1, 1)

    def distribution(self, images: Tensor):
        """The autoencoder's latent distribution of the images (in the autoencoder's precision)."""
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist

    def on_fit_start(self, module, datamodule) -> None:
        if module.objective.prediction == "eps" and self.warn_eps:
            say("a latent model with eps prediction: samplers cannot clip x0 in latent space, and at the noisiest VP "
                "step x0 = (x_t - sigma eps) / alpha divides the error of eps by alpha (0.006 linear, 5e-5 cosine); "
                "--model.objective.prediction v or --model.process Flow sample far better there")
        if not self.scale:
            if datamodule is None:
                raise UserError("the latents' scale is measured on a DiffusionDataModule's images: train with one, "
                                "or give model.latent.init_args.scale")
            self.scale.fill_(self.measure_scale(datamodule.reference_set, module.device))
            say(f"latent scale: {self.scale.item():.4g} (1 / std of the latents of "
                f"{min(SCALE_IMAGES, len(datamodule.reference_set))} training images)")
        if self.cache and not self.cached:
            with torch.random.fork_rng(devices=[]):  # random flips must not move the stream training draws from
                datamodule.cache(lambda x: self.distribution(x.to(module.device)).parameters.float())
            self.cached = True

    @torch.no_grad()
    def measure_scale(self, dataset, device) -> float:
        """1 / std of the latents (drawn from their distributions, with a fixed seed) of the first images of
        `dataset` (the training images without augmentation): the same on every rank."""
        images = torch.stack([dataset[i][0] for i in range(min(SCALE_IMAGES, len(dataset)))]).to(device)
        generator = torch.Generator(device).manual_seed(0)
        latents = torch.cat([self.distribution(x).sample(generator).float() for x in images.split(64)])
        return 1.0 / (latents - self.shift).std().item()

    def fingerprint(self) -> str:
        """Computed once: the autoencoder is frozen (and taken of its float32 weights, before any cast)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.vae)
        return self._fingerprint

    def spec(self) -> dict:
        return {"autoencoder": self.fingerprint()}


def works_on_latents(hparams: dict) -> bool:
    """Whether a checkpoint's (upgraded) hyperparameters build a latent model: a `Latent` part, or a Stable
    Diffusion fine-tune (its pretrained folder's autoencoder)."""
    latent = hparams.get("latent")
    named = latent.get("class_path") if isinstance(latent, dict) else None
    return "pretrained" in hparams or (isinstance(named, str) and named.rpartition(".")[2] != Pixels.__name__)


def absolute_paths(hparams):
    """Hyperparameters with the pretrained parts' paths (an autoencoder, a CLIP folder, a pipeline) made absolute, so
    that `sample` and `evaluate` find them from any folder (the CLI keeps them as they were typed)."""
    if isinstance(hparams, dict):
        paths = ("autoencoder", "folder", "pretrained", "ckpt_path", "guide_ckpt")  # the last two: a teacher's
        return {k: absolute(v) if k in paths and isinstance(v, str)
                else absolute_paths(v) for k, v in hparams.items()}
    return hparams
