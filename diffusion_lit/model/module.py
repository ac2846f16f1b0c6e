"""DiffusionModule: the denoiser, its EMA copy, and the parts a config names: the noise process, the objective, the
conditioning and the latent space (each left out means the plain case: VP, DDPM's loss, unconditional, pixels)."""

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from diffusion_lit.model.conditioning import Unconditional
from diffusion_lit.core.errors import LoadsClearly, UserError, build_optimizer, reason
from diffusion_lit.model.ema import PowerAveraged, PowerEMA, averaged
from diffusion_lit.model.guidance import Guide, NetFactory
from diffusion_lit.model.latent import Pixels, absolute_paths
from diffusion_lit.model.objective import Objective
from diffusion_lit.model.process import VP, Process
from diffusion_lit.model.snapshots import Snapshots
from diffusion_lit.model.teacher import Teacher
from diffusion_lit.core.precision import autocast
from diffusion_lit.nets.unet import UNet
from diffusion_lit.model.old_model import recorded_process, upgrade_state_dict

GuideFactory = Callable[[int, int, int], Guide]  # (in_channels, image_size, num_classes) -> Guide


class DiffusionModule(LoadsClearly, LightningModule):
    """A diffusion model with an EMA of the denoiser's weights.

    Args:
        net: builds the denoiser from (in_channels, image_size, num_classes); a class path (UNet, DiT) and its
            other arguments in YAML.
        image_size: image height and width (linked from the data).
        channels: image channels (linked from the data).
        num_classes: classes in the data (linked from the data; 0 when it has none).
        process: the noise process (`diffusion_lit.model.process`): ``VP`` (DDPM's, the default) or ``Flow``
            (rectified flow).
        objective: what the network predicts, how t is drawn and the loss weighted (`diffusion_lit.model.objective`).
        conditioning: ``Labels`` (classes, for classifier-free guidance) or ``Prompts`` (text); left out:
            unconditional (`diffusion_lit.model.conditioning`).
        latent: ``Latent`` (an autoencoder's latent space); left out: pixels (`diffusion_lit.model.latent`).
        guide: autoguidance's weak model trained beside this one (`diffusion_lit.model.guidance.Guide`: a smaller network
            and a shorter EMA); sampling with guidance_scale w then gives D_guide + w (D - D_guide).
        teacher: a frozen model whose guided velocity a MeanFlow student learns in place of eps - x0
            (`diffusion_lit.io.teacher.CheckpointTeacher`: a `fit` checkpoint and its guidance); read when `fit`
            starts, never saved in this model's checkpoints (its fingerprint is); sampling does without it.
        ema_decay: the EMA's decay once warmed up (0.9999 in DDPM); or a `PowerEMA` (EDM2's power-function
            averages, `diffusion_lit.model.ema`), whose length `sample`, `evaluate` and `export` choose after training
            (``--ema_length``); null: no EMA copy (sampling, validation and export use the trained weights).
        ema_warmup: (a constant decay) ramp the decay as (1 + n) / (10 + n) over the first updates, an average over
            about the last 11% of the steps until ema_decay caps it; a number k ramps it as (1 + n) / (k + n): a smaller k
            averages longer (k = 5: about the last 25%).
        optimizer: the optimizer class and its arguments (learning rate, weight decay, ...).
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
    """

    def __init__(
        self,
        net: NetFactory = UNet,
        image_size: int = 32,
        channels: int = 3,
        num_classes: int = 0,
        process: Process | None = None,
        objective: Objective | None = None,
        conditioning: Unconditional | None = None,
        latent: Pixels | None = None,
        guide: GuideFactory | None = None,
        teacher: Teacher | None = None,
        ema_decay: float | PowerEMA | None = 0.9999,
        ema_warmup: bool | float = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise UserError(f"warmup_steps must not be negative, got {warmup_steps}")
        with warnings.catch_warnings():  # parts built in Python (not from a config) are modules: said, not an error
            warnings.filterwarnings("ignore", message="Attribute .* is an instance of `nn.Module`")
            self.save_hyperparameters()
        self.hparams.update(absolute_paths(dict(self.hparams)))
        self.process = process if process is not None else VP()
        self.objective = (objective if objective is not None else Objective()).bind(self.process)
        self.conditioning = conditioning if conditioning is not None else Unconditional()
        self.conditioning.bind(num_classes, ema_decay, ema_warmup)
        self.latent = latent if latent is not None else Pixels()
        self.shape = self.latent.bind(channels, image_size)  # what the denoiser works on: images, or their latents
        extra = {**self.conditioning.net_kwargs(), **self.objective.net_kwargs()}
        classes = self.conditioning.num_classes
        try:
            self.net = net(self.shape[0], self.shape[1], classes, **extra)
        except TypeError as err:
            if not extra:
                raise
            needs = {"context_dim": "text features (context_dim)", "interval_input": "the interval's length that "
                     "MeanFlow adds to the time (interval_input)"}
            raise UserError(f"the network does not take {' or '.join(needs.get(k, k) for k in extra)} "
                            f"({reason(err)}): use diffusion_lit's UNet or DiT") from None
        self.ema = averaged(self.net, ema_decay, ema_warmup) if ema_decay is not None else None
        self.guide = guide(self.shape[0], self.shape[1], classes, **extra) if guide is not None else None
        self.teacher, self.teacher_record = teacher, None  # a plain object: nothing of it in the state dict
        self.objective.check_parts(self.conditioning, self.guide, teacher)
        self.optimizer = optimizer

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The EMA denoiser's prediction (`objective.prediction`), the one sampling uses."""
        return self.denoiser()(x_t, t, y)

    def denoiser(self, ema: bool = True) -> nn.Module:
        """The EMA denoiser (with `ema`, when the model keeps one), or the trained one."""
        return self.ema.module if ema and self.ema is not None else self.net

    def weights_name(self, ema: bool = True) -> str:
        """Which weights `denoiser(ema)` holds, in words: ``EMA`` or ``trained``."""
        return "EMA" if ema and self.ema is not None else "trained"

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if stage == "fit" and datamodule is not None:
            self.conditioning.check_data(bool(getattr(datamodule, "captions", False)))

    def on_fit_start(self) -> None:
        self.latent.on_fit_start(self, self.trainer.datamodule)
        if self.teacher is not None:
            self.teacher.bind(self, self.teacher_record)

    def sampler_kwargs(self, clip_x0: bool = True, ema: bool = True) -> dict:
        """What every sampler call on this model takes beside the solver's settings: the prediction, x0 clipping
        (off in latent space, whose values are not bounded by [-1, 1]) and the null condition's features."""
        guide = None if self.guide is None else (self.guide.ema.module if ema else self.guide.net)
        return {"prediction": self.objective.prediction, "clip_x0": clip_x0 and self.latent.clip_x0,
                "null": self.conditioning.null(ema), "guide": guide}

    @contextmanager
    def sampling(self, precision: str = "32-true", ema: bool = True) -> Iterator[nn.Module]:
        """The denoiser to sample with (the EMA one, or the training one) in eval mode, under inference mode and
        autocast for a mixed `precision` ("bf16-mixed"); back in its former mode afterwards."""
        model = self.denoiser(ema)
        guide = [] if self.guide is None else [self.guide.ema.module if ema else self.guide.net]
        was_training = [m.training for m in (model, *guide)]
        for m in (model, *guide):
            m.eval()
        try:
            with torch.inference_mode(), autocast(self.device, precision):
                yield model
        finally:
            for m, mode in zip((model, *guide), was_training):
                m.train(mode)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        kept = self.conditioning.drop(batch[1] if len(batch) > 1 else None)  # images alone: no labels to drop
        x0, y = self.latent.encode(batch[0]), self.conditioning.condition(kept, ema=False)
        loss = total = self.objective.loss(self.net, self.process, x0, y, **self.guidance(kept, ema=False))
        if self.guide is not None:  # the same images and conditions, its own t and noise; unguided
            guide_loss = self.objective.loss(self.guide.net, self.process, x0, y)
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
        x0 = self.latent.encode(batch[0], generator)
        kept = batch[1] if len(batch) > 1 else None
        y = self.conditioning.condition(kept)
        loss = self.objective.loss(self.denoiser(), self.process, x0, y, generator, **self.guidance(kept))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch[0]))

    def guidance(self, kept, ema: bool = True) -> dict:
        """What the objective learns from beside the data: a student's teacher; for an objective that folds guidance
        into training, the null condition of each row (a class or text model) or else the guide's EMA network
        (autoguidance); nothing for others."""
        if self.teacher is not None:
            return {"teacher": self.teacher}
        if not self.objective.guided:
            return {}
        if self.conditioning.conditional:
            return {"null": self.conditioning.null_rows(kept, ema)}
        return {"weak": self.guide.ema.module}

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.trained_parameters() if p.grad is not None]
        self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        self.conditioning.update_ema()
        if self.guide is not None:
            self.guide.ema.update_parameters(self.guide.net)

    def configure_callbacks(self) -> list:
        """The snapshots of the power-function averages, when the model's EMA is a PowerEMA."""
        return [Snapshots(self.ema.settings)] if isinstance(self.ema, PowerAveraged) else []

    def trained_parameters(self) -> list[nn.Parameter]:
        """The denoiser's trained parameters (LoRA: the adapters), the conditioning's (a text encoder trained with
        it), and the guide's."""
        return [*(p for p in self.net.parameters() if p.requires_grad), *self.conditioning.trained(),
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
        # The process's buffers are not saved: what it was is, and loading checks it.
        checkpoint["process_spec"], checkpoint["prediction"] = self.process.spec(), self.objective.prediction
        if (found := self.latent.fingerprint()) is not None:  # which autoencoder the latents belong to
            checkpoint["autoencoder_fingerprint"] = found
        if self.teacher is not None:  # which teacher the student learnt from (never its weights)
            checkpoint["teacher"] = self.teacher.record()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_state_dict(checkpoint["state_dict"])
        recorded = recorded_process(checkpoint)
        ours = (self.process.spec(), self.objective.prediction)
        if recorded is not None and tuple(recorded) != ours:
            raise UserError(f"the checkpoint was trained with the process {recorded[0]} predicting {recorded[1]}, and "
                            f"this model is {ours[0]} predicting {ours[1]}: it would draw noise. Give the model the "
                            "checkpoint's process and objective (--model.process, --model.objective)")
        printed = checkpoint.get("autoencoder_fingerprint")
        if printed and (found := self.latent.fingerprint()) not in (None, printed):
            raise UserError(f"the autoencoder {self.latent.path} is not the one this model was trained with (its "
                            f"weights' fingerprint is {found}, the checkpoint records {printed}): point at that one "
                            f"with --autoencoder PATH (sample, evaluate, export) or {self.latent.fit_option} (fit)")
        self.teacher_record = checkpoint.get("teacher")
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"])
        if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng_state"])

    def on_train_start(self) -> None:
        # seed_everything gives every rank the same seed; give each rank its own noise.
        if self.trainer.world_size > 1:
            torch.manual_seed(int(torch.randint(2**62, ())) + self.global_rank)
