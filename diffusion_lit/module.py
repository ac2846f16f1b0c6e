"""DiffusionModule: the denoiser, its EMA copy and the noising process (DDPM's or rectified flow), trained with the
diffusion objective, in pixel space or in an autoencoder's latent space, steered by class labels or text prompts."""

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from diffusion_lit.autoencoder import latent_shape, load_autoencoder
from diffusion_lit.errors import LoadsClearly, UserError, build_optimizer, reason, say
from diffusion_lit.guidance import Guide, NetFactory, averaged
from diffusion_lit.schedule import FlowSchedule, NoiseSchedule, ScheduleKind, TimeSampling
from diffusion_lit.speed import autocast, compile_modules, grad_off
from diffusion_lit.targets import PREDICTIONS, Prediction, Process, Weighting, min_snr_weight, target
from diffusion_lit.text import text_encoder as build_text_encoder
from diffusion_lit.unet import UNet, null_labels

GuideFactory = Callable[[int, int, int], Guide]  # (in_channels, image_size, num_classes) -> Guide
SCALE_IMAGES = 512  # training images encoded to estimate the latents' scale


def fingerprint(module: nn.Module) -> str:
    """A short hash of a module's weights (names, shapes and values): the same weights give the same string."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):  # as float32, whatever precision it was cast to
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().reshape(-1).numpy().tobytes())
    return digest.hexdigest()[:16]


def absolute(spec: str | None) -> str | None:
    """An existing path made absolute; anything else (None, ``bytes``, a missing path) as it is."""
    if spec in (None, "bytes") or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def drop_frozen(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: the pretrained parts (`module.frozen`) are read from their own files, not saved again."""
    for key in [k for k in state_dict if k.startswith(prefix + "frozen.")]:
        del state_dict[key]


def keep_frozen(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a checkpoint without the pretrained parts keeps the ones already loaded."""
    for key, value in module.frozen.state_dict(prefix=prefix + "frozen.").items():
        state_dict.setdefault(key, value)


def to_channels_last(net: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the image x_t in channels-last memory format, as the network's weights are."""
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


class DiffusionModule(LoadsClearly, LightningModule):
    """A diffusion model with an EMA of the denoiser's weights: DDPM's VP process or rectified flow, the network
    predicting eps, v or x0.

    Args:
        net: builds the denoiser from (in_channels, image_size, num_classes); a class path (UNet, DiT) and its
            other arguments in YAML.
        image_size: image height and width (linked from the data).
        channels: image channels (linked from the data).
        num_classes: classes in the data (linked from the data; 0 when it has none).
        conditional: condition the denoiser on the labels, for classifier-free guidance at sampling time.
        p_uncond: with `conditional`, the probability that a training label is dropped to the "null" class.
        schedule: VP noise schedule, ``linear`` or ``cosine``.
        timesteps: number of VP diffusion steps T.
        process: ``vp`` (DDPM: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps) or ``flow`` (rectified flow:
            x_t = (1 - t) x0 + t eps, t in [0, 1]).
        prediction: what the network predicts: ``eps``, ``v`` (VP: alpha eps - sigma x0; flow: eps - x0) or ``x0``;
            unset, the process's own (eps for vp, v for flow).
        loss_weighting: ``none`` (the plain MSE on the prediction) or ``min_snr`` (Min-SNR-gamma, Hang et al. 2023).
        snr_gamma: gamma of Min-SNR-gamma.
        t_sampling: how training draws t: ``uniform`` or ``logit_normal`` (SD3's, mean 0, std 1); unset, uniform for
            vp and logit-normal for flow.
        flow_shift: SD3's shift of the flow's sampling levels towards the noise (1: none).
        ema_decay: the EMA's decay once warmed up (0.9999 in DDPM); null: no EMA copy (sampling, validation and
            export use the trained weights).
        ema_warmup: ramp the decay as (1 + n) / (10 + n) over the first updates, an average over about the
            last 11% of the steps until ema_decay caps it; a number k ramps it as (1 + n) / (k + n): a smaller k
            averages longer (k = 5: about the last 25%).
        optimizer: the optimizer class and its arguments (learning rate, weight decay, ...).
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        channels_last: keep the denoiser's weights (and so its activations) in channels-last memory format.
        compile: `torch.compile` the denoiser and its EMA copy (skipped, with one line saying why, where it cannot
            run).
        inference_mode: sample under `torch.inference_mode` (under `torch.no_grad` when off).
        text_encoder: condition on text prompts (the data's captions, `--data.captions true`) through cross-attention:
            ``bytes`` for a small byte-level transformer trained with the denoiser, or a local folder with a CLIP
            text model (`transformers`, frozen). Captions are dropped to the empty prompt with `p_uncond`.
        text_width: width of the ``bytes`` text encoder.
        text_depth: transformer layers of the ``bytes`` text encoder.
        max_prompt_length: bytes of a prompt the ``bytes`` encoder reads (the rest is cut).
        autoencoder: diffuse in the latent space of this autoencoder: a checkpoint of `diffusion_lit autoencoder fit`
            or a local diffusers folder with an `AutoencoderKL` (SD's `vae`). Frozen, and read from there again when
            the checkpoint is loaded (it is not saved in this model's checkpoints).
        latent_scale: multiply the latents by this; unset, the autoencoder's own scaling factor (a diffusers
            folder's), or for one of ours 1 / std of the latents of the first 512 training images, measured when fit
            starts.
        cache_latents: with an autoencoder, encode the training images once when fit starts (their latent
            distributions, from which each step draws) instead of at every step: for datasets that fit in memory.
        init_from: start from the weights of a local diffusers `UNet2DModel` (a folder written by save_pretrained,
            or a pipeline folder with `unet/`), loaded into the UNet and its EMA copy when a new fit starts, after
            checking that the plans match and that the pipeline's scheduler (when there is one) is this model's
            process and prediction.
        guide: autoguidance's weak model trained beside this one (`diffusion_lit.guidance.Guide`: a smaller network
            and a shorter EMA); sampling with guidance_scale w then gives D_guide + w (D - D_guide).
    """

    warn_latent_eps = True  # say that eps prediction samples badly in latent space
    moved_key = "autoencoder"  # the argument that `--autoencoder PATH` (a moved autoencoder) replaces
    moved_hint = "--autoencoder PATH (sample, evaluate, export) or --model.autoencoder PATH (fit)"

    def __init__(
        self,
        net: NetFactory = UNet,
        image_size: int = 32,
        channels: int = 3,
        num_classes: int = 0,
        conditional: bool = False,
        p_uncond: float = 0.1,
        schedule: ScheduleKind = "linear",
        timesteps: int = 1000,
        process: Process = "vp",
        prediction: Prediction | None = None,
        loss_weighting: Weighting = "none",
        snr_gamma: float = 5.0,
        t_sampling: TimeSampling | None = None,
        flow_shift: float = 1.0,
        ema_decay: float | None = 0.9999,
        ema_warmup: bool | float = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        warmup_steps: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        inference_mode: bool = True,
        text_encoder: str | None = None,
        text_width: int = 128,
        text_depth: int = 2,
        max_prompt_length: int = 32,
        autoencoder: str | None = None,
        latent_scale: float | None = None,
        cache_latents: bool = False,
        init_from: str | None = None,
        guide: GuideFactory | None = None,
    ) -> None:
        super().__init__()
        if ema_decay is not None and not 0.0 <= ema_decay <= 1.0:
            raise UserError(f"ema_decay must lie in [0, 1], got {ema_decay}")
        if warmup_steps < 0:
            raise UserError(f"warmup_steps must not be negative, got {warmup_steps}")
        if conditional and num_classes < 1:
            raise UserError(
                "conditional: true needs labelled data: MNIST, CIFAR-10, or a folder with one sub-folder per class"
            )
        if not 0.0 <= p_uncond <= 1.0:
            raise UserError(f"p_uncond must lie in [0, 1], got {p_uncond}")
        if process not in ("vp", "flow"):
            raise UserError(f"unknown process {process!r}: use 'vp' (DDPM) or 'flow' (rectified flow)")
        if prediction not in (None, *PREDICTIONS):
            raise UserError(f"unknown prediction {prediction!r}: use 'eps', 'v' or 'x0'")
        if process == "flow" and prediction == "eps":
            # At t = 1 the flow's x_t is the noise itself: an eps prediction says nothing about x0 there.
            raise UserError("prediction eps cannot be sampled on the flow (x0 is lost at t = 1): use v or x0")
        if loss_weighting not in ("none", "min_snr") or snr_gamma <= 0:
            raise UserError(f"loss_weighting must be 'none' or 'min_snr' with snr_gamma > 0, got {loss_weighting!r} "
                            f"and {snr_gamma}")
        if text_encoder is not None and conditional:
            raise UserError("conditional (class labels) and text_encoder (prompts) exclude each other: choose one")
        if latent_scale is not None and latent_scale <= 0:
            raise UserError(f"latent_scale must be positive, got {latent_scale}")
        if not autoencoder and (latent_scale is not None or cache_latents):
            raise UserError("latent_scale and cache_latents are for latent diffusion: give model.autoencoder too")
        # Pretrained parts are read again whenever the model is built: by absolute path, so `sample` and `evaluate`
        # find them from any folder.
        autoencoder, text_encoder, init_from = (absolute(spec) for spec in (autoencoder, text_encoder, init_from))
        self.save_hyperparameters()
        for key, value in (("autoencoder", autoencoder), ("text_encoder", text_encoder), ("init_from", init_from)):
            if self.hparams.get(key) is not None:  # the CLI's hyperparameters hold them as they were typed
                self.hparams[key] = value
        # Read from here, not from hparams: a module built on this one (StableDiffusionModule) names them itself.
        self.text_encoder_spec, self.autoencoder_spec, self.init_from = text_encoder, autoencoder, init_from
        self.num_classes = num_classes if conditional else 0  # what the network is conditioned on
        self.frozen = nn.ModuleDict()  # pretrained parts, read from their own files (not saved in checkpoints)
        self.register_state_dict_post_hook(drop_frozen)
        self.register_load_state_dict_pre_hook(keep_frozen)
        encoder = build_text_encoder(text_encoder, text_width, text_depth, max_prompt_length) if text_encoder else None
        self.text_encoder = encoder if encoder is not None and encoder.trainable else None
        if encoder is not None and not encoder.trainable:
            self.frozen["text_encoder"] = encoder
        self.shape = (channels, image_size, image_size)  # what the denoiser works on: images, or their latents
        self.cached = False  # the data serves latent distributions (cache_latents), not images
        if autoencoder:
            vae, own_scale, self.latent_shift = load_autoencoder(autoencoder)
            if vae.config.in_channels != channels:
                raise UserError(f"the autoencoder {autoencoder} takes {vae.config.in_channels}-channel images and the "
                                f"data has {channels}: set --data.channels {vae.config.in_channels}")
            self.frozen["autoencoder"] = vae
            latent_channels, latent_size = latent_shape(vae, image_size)
            self.shape = (latent_channels, latent_size, latent_size)
            if self.prediction_of(process, prediction) == "eps" and self.warn_latent_eps:
                say("model.autoencoder with eps prediction: samplers cannot clip x0 in latent space, and at the "
                    "noisiest VP step x0 = (x_t - sigma eps) / alpha divides the error of eps by alpha (0.006 linear, "
                    "5e-5 cosine); --model.prediction v or --model.process flow sample far better there")
            # 0 until measured when fit starts; saved, so a resumed or loaded model uses the same scale.
            self.register_buffer("latent_scale", torch.tensor(float(latent_scale or own_scale or 0.0)))
        text = {"context_dim": encoder.width} if encoder is not None else {}
        try:
            self.net = net(self.shape[0], self.shape[1], self.num_classes, **text)
        except TypeError as err:
            if not text:
                raise
            raise UserError(f"the network does not take text features (context_dim) ({reason(err)}): use "
                            "diffusion_lit's UNet or DiT for a text model") from None
        if channels_last:  # before the EMA copy is made, which then has the same format and hook
            self.net.to(memory_format=torch.channels_last)
            self.net.register_forward_pre_hook(to_channels_last)
        self.ema = averaged(self.net, ema_decay, ema_warmup) if ema_decay is not None else None
        # A text encoder trained with the denoiser is averaged with it.
        self.text_ema = (averaged(self.text_encoder, ema_decay, ema_warmup)
                         if self.text_encoder is not None and ema_decay is not None else None)
        self.guide = guide(self.shape[0], self.shape[1], self.num_classes, **text) if guide is not None else None
        self.schedule = NoiseSchedule(schedule, timesteps) if process == "vp" else FlowSchedule(flow_shift)
        self.prediction = self.prediction_of(process, prediction)
        self.t_sampling = t_sampling or ("uniform" if process == "vp" else "logit_normal")
        self.optimizer = optimizer
        self._compiled = False
        self._autoencoder_fingerprint: str | None = None

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The EMA denoiser's prediction (eps, v or x0: `self.prediction`), the one sampling uses."""
        return self.denoiser()(x_t, t, y)

    def denoiser(self, ema: bool = True) -> nn.Module:
        """The EMA denoiser (with `ema`, when the model keeps one), or the trained one."""
        return self.ema.module if ema and self.ema is not None else self.net

    def weights_name(self, ema: bool = True) -> str:
        """Which weights `denoiser(ema)` holds, in words: ``EMA`` or ``trained``."""
        return "EMA" if ema and self.ema is not None else "trained"

    @staticmethod
    def prediction_of(process: Process, prediction: Prediction | None) -> Prediction:
        """What the network predicts: the one asked for, or the process's own (eps for vp, v for flow)."""
        return prediction or ("eps" if process == "vp" else "v")

    @property
    def text(self) -> bool:
        """Conditioned on text prompts."""
        return self.text_encoder_spec is not None

    @property
    def latent(self) -> bool:
        """Diffusing the latents of an autoencoder."""
        return "autoencoder" in self.frozen

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if stage == "fit" and datamodule is not None and bool(getattr(datamodule, "captions", False)) != self.text:
            raise UserError(
                "model.text_encoder is set but the data serves labels: add --data.captions true" if self.text else
                "the data serves captions (data.captions true) but the model has no text encoder: set "
                "--model.text_encoder bytes (or a CLIP folder), or leave data.captions false"
            )
        self.compile_denoisers(self.trainer.strategy.root_device)

    def on_fit_start(self) -> None:
        if self.init_from and self.trainer.ckpt_path is None:  # a new run (a resumed one has its weights)
            self.load_diffusers_unet(self.init_from)
        data = self.trainer.datamodule
        if self.latent and not self.latent_scale:
            if data is None:
                raise UserError("the latents' scale is measured on a DiffusionDataModule's images: train with one, "
                                "or give model.latent_scale")
            self.latent_scale.fill_(self.measure_latent_scale(data.reference_set))
            say(f"latent_scale: {self.latent_scale.item():.4g} (1 / std of the latents of "
                f"{min(SCALE_IMAGES, len(data.reference_set))} training images)")
        if self.latent and self.hparams.cache_latents and not self.cached:
            with torch.random.fork_rng(devices=[]):  # random flips must not move the stream training draws from
                data.cache(lambda x: self.encode_distribution(x.to(self.device)).parameters.float())
            self.cached = True

    def load_diffusers_unet(self, spec: str) -> None:
        """The weights of a diffusers UNet2DModel folder into the denoiser and its EMA copy (see `init_from`)."""
        from diffusion_lit.diffusers_io import load_unet_weights, process_of

        if not isinstance(self.net, UNet):
            raise UserError(f"init_from loads a UNet2DModel into diffusion_lit's UNet; this model's net is a "
                            f"{type(self.net).__name__}")
        scheduler = load_unet_weights(self.net, spec)
        if scheduler is not None:
            ours = {"process": self.schedule.process, "prediction": self.prediction}
            if self.schedule.process == "vp":
                ours |= {"schedule": self.schedule.kind, "timesteps": self.schedule.timesteps}
            for key, value in process_of(scheduler).items():
                if ours.get(key, value) != value:
                    raise UserError(f"init_from {spec}: its scheduler says {key} {value!r} and this model has "
                                    f"{ours[key]!r}: set --model.{key} {value}")
        if self.ema is not None:
            self.ema.module.load_state_dict(self.net.state_dict())
        say(f"init_from: the UNet starts from {spec}")

    @torch.no_grad()
    def measure_latent_scale(self, dataset) -> float:
        """1 / std of the autoencoder's latents (drawn from their distributions, with a fixed seed) of the first
        images of `dataset` (the training images without augmentation): the same on every rank."""
        images = torch.stack([dataset[i][0] for i in range(min(SCALE_IMAGES, len(dataset)))]).to(self.device)
        generator = torch.Generator(self.device).manual_seed(0)
        latents = torch.cat([self.encode_distribution(x).sample(generator).float() for x in images.split(64)])
        return 1.0 / (latents - self.latent_shift).std().item()

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What the denoiser learns from: the images, or their scaled latents drawn from the latent distribution
        (computed here, or cached: `cache_latents`) with `generator`."""
        if not self.latent:
            return images
        if self.cached:  # [B, 2C, h, w]: the mean and log-variance, as diffusers keeps them
            mean, logvar = images.chunk(2, dim=1)
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latents = mean + (0.5 * logvar.clamp(-30, 20)).exp() * noise
        else:
            latents = self.encode_distribution(images).sample(generator).float()
        return (latents - self.latent_shift) * self.latent_scale

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] from what the denoiser made (latents are decoded)."""
        if not self.latent:
            return x
        vae = self.frozen["autoencoder"]
        return vae.decode((x / self.latent_scale + self.latent_shift).to(vae.dtype)).sample.float().clamp(-1, 1)

    def encode_distribution(self, images: Tensor):
        """The autoencoder's latent distribution of the images (in the autoencoder's precision)."""
        vae = self.frozen["autoencoder"]
        return vae.encode(images.to(vae.dtype)).latent_dist

    def encode_prompts(self, prompts: Sequence[str], ema: bool = True) -> Tensor:
        """Text features [B, L, width] of the prompts (the averaged text encoder's, with `ema`)."""
        if "text_encoder" in self.frozen:
            encoder = self.frozen["text_encoder"]
        else:
            encoder = self.text_ema.module if ema and self.text_ema is not None else self.text_encoder
        return encoder(encoder.tokenize(list(prompts)).to(self.device))

    def condition(self, y, ema: bool = True) -> Tensor | None:
        """What the network is given as y for a batch's labels or prompts (None when unconditional)."""
        if self.text:
            if isinstance(y, Tensor):
                raise UserError("this model reads prompts, not labels: give it captions (--data.captions true) or "
                                "prompts (--prompt)")
            return self.encode_prompts(y, ema)
        return y if self.num_classes else None

    def null_condition(self, ema: bool = True) -> Tensor | None:
        """The unconditional y of classifier-free guidance for a text model: the empty prompt's features [1, L, D]."""
        return self.encode_prompts([""], ema) if self.text else None

    def sampler_kwargs(self, clip_x0: bool = True, ema: bool = True) -> dict:
        """What every sampler call on this model takes beside the solver's settings: the prediction, x0 clipping
        (off in latent space, whose values are not bounded by [-1, 1]) and the empty prompt's features."""
        guide = None if self.guide is None else (self.guide.ema.module if ema else self.guide.net)
        return {"prediction": self.prediction, "clip_x0": clip_x0 and not self.latent,
                "null": self.null_condition(ema), "guide": guide}

    def compile_denoisers(self, device: torch.device) -> None:
        """With `compile` on, torch.compile the training and the EMA denoiser for `device` (once; nothing when it
        cannot run there)."""
        if self.hparams.compile and not self._compiled:
            self._compiled = compile_modules([self.net, *([self.ema.module] if self.ema is not None else [])], device)

    @contextmanager
    def sampling(self, precision: str = "32-true", ema: bool = True) -> Iterator[nn.Module]:
        """The denoiser to sample with (the EMA one, or the training one) in eval mode, with gradients off and
        autocast for a mixed `precision` ("bf16-mixed"); back in its former mode afterwards."""
        model = self.denoiser(ema)
        guide = [] if self.guide is None else [self.guide.ema.module if ema else self.guide.net]
        was_training = [m.training for m in (model, *guide)]
        for m in (model, *guide):
            m.eval()
        try:
            with grad_off(self.hparams.inference_mode), autocast(self.device, precision):
                yield model
        finally:
            for m, mode in zip((model, *guide), was_training):
                m.train(mode)

    def diffusion_loss(
        self, net: nn.Module, x0: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """The MSE between the net's prediction and its target at a drawn t, weighted per sample by Min-SNR-gamma
        when asked (with eps, uniform t and no weighting: DDPM's simple loss)."""
        t = self.schedule.draw_t(x0.shape[0], self.t_sampling, x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        alpha, sigma = self.schedule.alpha_sigma(t, x0.ndim)
        out = net(alpha * x0 + sigma * eps, self.schedule.network_time(t), y)
        goal = target(self.prediction, self.schedule.process, x0, eps, alpha, sigma)
        if self.hparams.loss_weighting == "none":
            return F.mse_loss(out, goal)
        weight = min_snr_weight(self.prediction, self.schedule.process, alpha, sigma, self.hparams.snr_gamma)
        return (weight.flatten() * (out.float() - goal).pow(2).flatten(1).mean(1)).mean()

    def drop_labels(self, y):
        """Each label replaced by the null class (index num_classes), each prompt by the empty one, with probability
        p_uncond."""
        drop = torch.rand(len(y), device=self.device) < self.hparams.p_uncond
        if self.text:
            return ["" if dropped else prompt for prompt, dropped in zip(y, drop.tolist())]
        return torch.where(drop, null_labels(self.num_classes, y), y)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        y = self.drop_labels(batch[1]) if self.num_classes or self.text else None
        x0, y = self.encode(batch[0]), self.condition(y, ema=False)
        loss = total = self.diffusion_loss(self.net, x0, y)
        if self.guide is not None:  # the same images and conditions, its own t and noise
            guide_loss = self.diffusion_loss(self.guide.net, x0, y)
            self.log("train/guide_loss", guide_loss, batch_size=len(batch[0]))
            total = loss + guide_loss
        if not torch.isfinite(total):
            # Stop before the optimizer spreads it into the weights; the last checkpoint is still good.
            raise UserError(
                f"the training loss became {total.item()} at step {self.global_step}: training diverged. Lower the "
                "learning rate (--model.optimizer.init_args.lr) or lengthen the warm-up (--model.warmup_steps), "
                "then resume from the last good checkpoint with --ckpt_path last"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch[0]))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return total

    def validation_step(self, batch, batch_idx: int) -> None:
        # Fixed t and noise per batch, so val/loss moves only when the EMA weights do.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        x0 = self.encode(batch[0], generator)
        loss = self.diffusion_loss(self.denoiser(), x0, self.condition(batch[1]), generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch[0]))

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.trained_parameters() if p.grad is not None]
        self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        if self.text_ema is not None:
            self.text_ema.update_parameters(self.text_encoder)
        if self.guide is not None:
            self.guide.ema.update_parameters(self.guide.net)

    def trained_parameters(self) -> list[nn.Parameter]:
        """The denoiser's trained parameters (LoRA: the adapters), the text encoder's when it is trained with it, and
        the guide's."""
        return [*(p for p in self.net.parameters() if p.requires_grad),
                *(self.text_encoder.parameters() if self.text_encoder is not None else ()),
                *(self.guide.net.parameters() if self.guide is not None else ())]

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer, self.trained_parameters())
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Dropout, t and eps draw from the global generator: keep its state so a resumed run continues identically.
        checkpoint["rng_state"] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state_all()
        if self.latent:  # which autoencoder the latents belong to, checked when the checkpoint is loaded
            checkpoint["autoencoder_fingerprint"] = self.autoencoder_fingerprint()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        recorded = checkpoint.get("autoencoder_fingerprint")
        if self.latent and recorded and recorded != (found := self.autoencoder_fingerprint()):
            raise UserError(f"the autoencoder {self.autoencoder_spec} is not the one this model was trained with "
                            f"(its weights' fingerprint is {found}, the checkpoint records {recorded}): point at that "
                            f"one with {self.moved_hint}")
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"])
        if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng_state"])

    def autoencoder_fingerprint(self) -> str:
        """The fingerprint of the autoencoder's weights that a checkpoint records and checks when it is loaded
        (computed once: the autoencoder is frozen)."""
        if self._autoencoder_fingerprint is None:
            self._autoencoder_fingerprint = fingerprint(self.frozen["autoencoder"])
        return self._autoencoder_fingerprint

    def on_train_start(self) -> None:
        # seed_everything gives every rank the same seed; give each rank its own noise.
        if self.trainer.world_size > 1:
            torch.manual_seed(int(torch.randint(2**62, ())) + self.global_rank)
