"""Callbacks: the side effects of training (sample grids, FID) live here, not in the module."""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar, Timer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor

from diffusion_lit.data.digits import judge_counts, judge_shares
from diffusion_lit.core.errors import UserError, reason, say
from diffusion_lit.data.images import grid, save_images, to_uint8
from diffusion_lit.training.metrics import (
    ImageFeatures,
    compute,
    dataset_features,
    extract,
    fid_and_kid,
    load_features,
    reference_cache_path,
    save_features,
)
from diffusion_lit.io.loading import load_guide
from diffusion_lit.sampling.samplers import generate, sample
from diffusion_lit.sampling.settings import Sampling


class ProgressBar(RichProgressBar):
    """Lightning's rich bar, whose epoch reads `Epoch 10/-2` when no epoch count is set (a run limited by max_time
    or max_steps): then it reads `Epoch 10`."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"/{max_epochs - 1}", "", 1)
        return description


def _due(trainer, every_n_steps: int, last_step: int) -> bool:
    """True once per optimizer step that is a multiple of every_n_steps (not on each accumulated micro-batch)."""
    step = trainer.global_step
    return every_n_steps > 0 and step > 0 and step % every_n_steps == 0 and step != last_step


def setup_sampling(callback, pl_module, name: str) -> None:
    """Checks a callback's sampler settings against the model and loads its guide checkpoint, when fit starts rather
    than at the first grid: bad settings stop before the first step."""
    callback.sampling.check(pl_module.process)
    if callback.guide is None and callback.sampling.guide_ckpt:  # once, however many stages set the callback up
        callback.guide = load_guide(callback.sampling.guide_ckpt, pl_module)
    callback.sampling = callback.sampling.for_model(pl_module, callback.guide is not None, name)


def sampling_kwargs(callback, pl_module) -> dict:
    """What a callback's sampler calls take: the model's own settings, the callback's, and its guide checkpoint's
    denoiser in place of the model's guide."""
    kwargs = pl_module.sampler_kwargs() | callback.sampling.kwargs()
    if callback.guide is not None:
        kwargs["guide"] = callback.guide.to(pl_module.device)
    return kwargs


def run_share(trainer, total_steps: float) -> float | None:
    """How much of the run has passed, 0 to 1: the larger of its steps' share (of `total_steps`, from max_steps or
    max_epochs; inf for neither) and its time's (of max_time); None for a run of no known length."""
    shares = [trainer.global_step / total_steps] if 0 < total_steps < float("inf") else []
    if timer := next((c for c in trainer.callbacks if isinstance(c, Timer)), None):
        elapsed, remaining = timer.time_elapsed("train"), timer.time_remaining("train")
        if remaining is not None and elapsed + remaining > 0:
            shares.append(elapsed / (elapsed + remaining))
    return max(shares) if shares else None


class GuideCheckpoint(Callback):
    """Writes one checkpoint, `guide.ckpt` beside the run's others, once `share` of the run has passed: the young
    model that autoguidance takes as its guide (`--guide_ckpt`). A share of the run rather than a step number, so that
    the guide is as young beside the finished model on a fast machine as on a slow one.

    Args:
        share: the part of the run (of max_steps, max_epochs or max_time) after which to write it, in (0, 1).
        filename: its name, without `.ckpt`.
    """

    def __init__(self, share: float = 0.12, filename: str = "guide") -> None:
        if not 0.0 < share < 1.0:
            raise UserError(f"GuideCheckpoint: share must lie in (0, 1), got {share}")
        self.share, self.filename = share, filename
        self.written, self._last_step, self._total = False, -1, float("inf")

    def on_train_start(self, trainer, pl_module) -> None:
        self._total = trainer.estimated_stepping_batches
        if run_share(trainer, self._total) is None:
            raise UserError("GuideCheckpoint writes its checkpoint after a share of the run, and this run has no set "
                            "length: give it trainer.max_steps, max_epochs or max_time")

    def path(self, trainer) -> Path:
        folder = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
        return Path(folder or trainer.default_root_dir) / f"{self.filename}.ckpt"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.written or trainer.global_step == self._last_step:  # once per optimizer step, at most once a run
            return
        self._last_step = trainer.global_step
        # Rank zero's clock decides, so that every rank calls the save (a collective) at the same step.
        if trainer.strategy.broadcast(run_share(trainer, self._total) >= self.share, src=0):
            self.written = True  # before the save, so that the checkpoint records it and a resume skips it
            # The whole checkpoint, as before; said, so that Lightning does not log that it defaulted to it.
            trainer.save_checkpoint(self.path(trainer), weights_only=False)
            say(f"GuideCheckpoint: wrote {self.path(trainer)} at step {trainer.global_step}")

    def state_dict(self) -> dict:
        return {"written": self.written}

    def load_state_dict(self, state_dict: dict) -> None:
        self.written = state_dict["written"]


class SampleGrid(Callback):
    """Logs a grid of samples from the EMA weights as `samples/grid`, every N steps and at the end of training, and
    writes the newest one to `samples.png` in the run's folder.

    The starting noise is drawn from a fixed seed, so the grids are comparable across steps and across a resume.

    Args:
        every_n_steps: optimizer steps between grids.
        num_samples: images in the grid.
        sampling: the sampler and its guidance (`diffusion_lit.sampling.settings.Sampling`); guidance is classifier-free for
            a conditional model (one row per class) or a text model (one row per prompt), autoguidance with a guide.
        seed: seed of the noise.
        denoising_strip: also log `samples/denoising`, one image at ten points of its denoising.
        prompts: for a text model, the prompts of the rows (by default up to 8 distinct captions of the data).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        sampling: Sampling | None = None,
        seed: int = 0,
        denoising_strip: bool = True,
        prompts: list[str] | None = None,
    ) -> None:
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.sampling, self.guide = sampling or Sampling(), None
        self.denoising_strip = denoising_strip
        self.prompts = prompts
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        setup_sampling(self, pl_module, "SampleGrid")
        self.rows = pl_module.conditioning.rows(self.prompts, trainer.datamodule)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _due(trainer, self.every_n_steps, self._last_step):
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.log_grid(trainer, pl_module)

    @rank_zero_only
    def log_grid(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        # A conditional model shows one row per class, a text model one row per prompt.
        rows = self.rows
        per_row = max(1, self.num_samples // len(rows)) if rows else None
        labels = [row for row in rows for _ in range(per_row)] if rows else None
        if labels is not None:
            labels = pl_module.conditioning.batch(labels, pl_module.device)
        n = self.num_samples if labels is None else len(labels)
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        x_T = torch.randn((n, *pl_module.shape), generator=generator, device=pl_module.device)
        with pl_module.sampling(trainer.precision) as model:
            y = pl_module.conditioning.condition(labels) if labels is not None else None
            x, states = sample(model, pl_module.process, x_T, generator=generator, return_intermediates=True,
                               labels=y, **sampling_kwargs(self, pl_module))
            x = pl_module.latent.decode(x)
            if self.denoising_strip:
                picks = torch.linspace(0, len(states) - 1, 10).round().long().tolist()
                strip = pl_module.latent.decode(torch.stack([states[i][0] for i in picks]))
        # The newest grid as a picture to open, beside the run's other files. The logger's folder, not
        # trainer.log_dir: that one is a collective under DDP, and only rank zero is here.
        if log_dir := getattr(trainer.logger, "log_dir", None):
            save_images(to_uint8(x), Path(log_dir) / "samples.png", per_row)
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
            return
        experiment.add_image("samples/grid", grid(to_uint8(x), per_row), trainer.global_step)
        if self.denoising_strip:
            experiment.add_image("samples/denoising", grid(to_uint8(strip.clamp(-1, 1)), nrow=10), trainer.global_step)


class FID(Callback):
    """Logs `val/fid` and `val/kid` (mean and std) of generated against real training images every N steps; with the
    digit judge as the feature network also `val/confident_share` (and `val/requested_share` for a conditional model).

    Under DDP each rank generates its share of the samples from its own noise; torchmetrics syncs the statistics,
    so every rank takes part in the computation and the value is logged once. The reference features of the
    training images are computed once and cached on disk, keyed by dataset, image size and feature extractor.
    When the feature extractor cannot be built (no Inception weights and no network), training goes on without FID.

    Args:
        every_n_steps: optimizer steps between evaluations.
        num_samples: generated images per evaluation, over all ranks (FID is biased upwards for small numbers;
            compare values only at equal num_samples, and prefer KID below a few thousand).
        num_real: real training images in the reference statistics.
        sampling: the sampler and its guidance (`diffusion_lit.sampling.settings.Sampling`); a conditional model is scored on
            balanced classes.
        batch_size: images per sampling batch on each rank.
        feature_extractor: ``inception``, ``digits`` or the import path of an ``nn.Module`` class (see
            `ImageFeatures`).
        weights_path: a local file of the Inception weights, for machines without network access.
        cache_dir: where reference features are cached.
        seed: seed of the noise (each rank adds its rank).
    """

    def __init__(
        self,
        every_n_steps: int = 10000,
        num_samples: int = 2000,
        num_real: int = 10000,
        sampling: Sampling | None = None,
        batch_size: int = 256,
        feature_extractor: str = "inception",
        weights_path: str | None = None,
        cache_dir: str = "~/.cache/diffusion_lit/fid",
        seed: int = 0,
    ) -> None:
        self.every_n_steps, self.num_samples, self.num_real = every_n_steps, num_samples, num_real
        self.sampling, self.guide = sampling or Sampling(), None
        self.batch_size, self.seed = batch_size, seed
        self.feature_extractor, self.weights_path, self.cache_dir = feature_extractor, weights_path, cache_dir
        self.features: ImageFeatures | None = None
        self.metrics = None
        self.last_num_samples = 0  # generated in the last evaluation, summed over ranks
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.features is not None:
            return
        setup_sampling(self, pl_module, "FID")
        try:
            self.features = ImageFeatures(self.feature_extractor, self.weights_path)
        except UserError:
            raise
        except Exception as err:  # no weights file and no network, most often
            self.every_n_steps = 0
            if trainer.is_global_zero:
                print(
                    f"FID is off: the {self.feature_extractor} feature extractor could not be loaded "
                    f"({reason(err)}); set the FID callback's weights_path to a local copy of "
                    "weights-inception-2015-12-05-6726825d.pth to turn it on.",
                    file=sys.stderr,
                )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _due(trainer, self.every_n_steps, self._last_step):
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        device, rank, world = pl_module.device, trainer.global_rank, trainer.world_size
        self.features.to(device)
        if self.metrics is None:
            real = self.reference_features(trainer, pl_module).to(device)
            subset = min(1000, self.num_samples, len(real))
            self.metrics = [m.to(device) for m in fid_and_kid(real.shape[1], subset)]
            for metric in self.metrics:  # each rank adds its shard; the sync in compute() makes the whole
                metric.update(real[rank::world], real=True)

        shares = [self.num_samples // world + (r < self.num_samples % world) for r in range(world)]
        generator = torch.Generator(device).manual_seed(self.seed + rank)
        made, judged = 0, torch.zeros(2, device=device)
        # A conditional model is scored on balanced classes: sample i (over all ranks) gets label i mod classes. A text
        # model is scored on its unconditional (empty prompt) samples.
        first = sum(shares[:rank])
        classes = pl_module.conditioning.num_classes
        labels = torch.arange(first, first + shares[rank]) % classes if classes else None
        with pl_module.sampling(trainer.precision) as model:
            for x in generate(model, pl_module.process, shares[rank], pl_module.shape, generator, self.batch_size,
                              labels=labels, condition=pl_module.conditioning.condition, decode=pl_module.latent.decode,
                              **sampling_kwargs(self, pl_module)):
                feats = extract(self.features, to_uint8(x), self.batch_size)
                for metric in self.metrics:
                    metric.update(feats, real=False)
                if (logits := self.features.judge(feats)) is not None:
                    judged += judge_counts(logits, None if labels is None else labels[made : made + len(x)])
                made += len(x)
        scores = compute(*self.metrics)
        self.last_num_samples = int(trainer.strategy.reduce(torch.tensor(made, device=device), reduce_op="sum"))
        values = {"val/fid": scores["fid"], "val/kid": scores["kid_mean"], "val/kid_std": scores["kid_std"],
                  "val/num_samples": self.last_num_samples}
        if self.feature_extractor == "digits":
            judged = trainer.strategy.reduce(judged, reduce_op="sum")
            judge_values = judge_shares(judged, self.last_num_samples, labels is not None)
            values |= {f"val/{name}": share for name, share in judge_values.items()}
        for metric in self.metrics:
            metric.reset()
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        rank_zero_info(
            f"step {trainer.global_step}: FID {scores['fid']:.2f}, KID {scores['kid_mean']:.4f} ± {scores['kid_std']:.4f} "
            f"({self.last_num_samples} samples)"
        )

    def reference_features(self, trainer, pl_module) -> Tensor:
        """Features of the real training images, from the cache or computed with each rank doing a shard."""
        data = trainer.datamodule
        path = reference_cache_path(self.cache_dir, self.feature_extractor, data, self.num_real)
        # Every rank must take the same branch: the computation below has a collective in it.
        if trainer.strategy.reduce_boolean_decision(path.is_file(), all=True):
            return load_features(path)
        rank, world = trainer.global_rank, trainer.world_size
        n = min(self.num_real, len(data.reference_set))
        mine = torch.utils.data.Subset(data.reference_set, range(rank, n, world))
        local = dataset_features(self.features, mine, self.batch_size).to(pl_module.device)
        # Pad every shard to one length, gather [world, m, D], and interleave back into dataset order.
        m = -(-n // world)
        local = torch.cat([local, local.new_zeros(m - len(local), local.shape[1])])
        gathered = trainer.strategy.all_gather(local) if world > 1 else local[None]
        real = gathered.transpose(0, 1).reshape(world * m, -1)[:n].cpu()
        if trainer.local_rank == 0:
            save_features(path, real)
        return real
