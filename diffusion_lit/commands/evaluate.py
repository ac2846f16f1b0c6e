"""The `evaluate` command: FID and KID (and the digit judge's shares) of a checkpoint's samples, or of image files,
against its training images or a folder."""

import json
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from diffusion_lit.training.checkpointing import Stopped
from diffusion_lit.data.datamodule import DiffusionDataModule, from_config
from diffusion_lit.data.digits import frame_stats, judge_counts, judge_shares
from diffusion_lit.core.errors import UserError, reason, say
from diffusion_lit.model.snapshots import Rebuilt
from diffusion_lit.model.guidance import Evaluations, GuideCondition, Interval
from diffusion_lit.data.images import load_images
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
from diffusion_lit.data.old_data import describe
from diffusion_lit.sampling.samplers import SamplerName
from diffusion_lit.sampling.settings import Sampling
from diffusion_lit.model.grids import Spacing
from diffusion_lit.core.precision import Precision
from diffusion_lit.training.speed import warn_bf16
from diffusion_lit.core.trust import check_data_hparams, parse_trusted
from diffusion_lit.io.loading import check_not_itself, default_device, load_checkpoint, load_guide, set_flow_shift


from diffusion_lit.commands.sample import generate_images, keep_samples, kept_when_stopped, parse_labels
from diffusion_lit.commands.ema import check_plot, sweep_table, write_plot


def evaluate(
    ckpt_path: str | None = None,
    samples: str | None = None,
    real: str | None = None,
    num_samples: int = 2000,
    guidance_scale: float | list[float] = 1.0,
    sampler: SamplerName = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
    precision: Precision = "32-true",
    num_real: int = 10000,
    feature_extractor: str = "inception",
    weights_path: str | None = None,
    cache_dir: str = "~/.cache/diffusion_lit/fid",
    trust_class: str | None = None,
    spacing: Spacing = "linspace",
    flow_shift: float | None = None,
    guide_ckpt: str | None = None,
    guidance_interval: Interval | None = None,
    guide_condition: GuideCondition = "same",
    autoencoder: str | None = None,
    stack_guidance: bool = False,
    ema_length: float | list[float] | None = None,
    plot: str | None = None,
) -> None:
    """Print FID and KID as one JSON line, for a checkpoint's samples or for given images; with the digit judge as
    the feature network (``--feature_extractor digits``) also the share of samples it classifies with confidence above
    0.9 and, for a conditional checkpoint, the share it classifies as the digit asked for.

    Args:
        ckpt_path: generate `num_samples` images from this checkpoint (EMA weights); without --real, its training
            images are the reference.
        samples: score these images instead: a `.npz` file (uint8 NHWC under `arr_0`) or a folder of images.
        real: the reference images: a folder of images or a `.npz` file.
        num_samples: images to generate from the checkpoint (a conditional one: balanced over the classes).
        guidance_scale: guidance w (classifier-free for a conditional checkpoint, autoguidance with a guide); a list
            scores each (with a list of --ema_length: each pair), a JSON line per setting and a table.
        sampler: ``ddim``, ``ddpm``, ``euler``, ``heun``, ``dpmpp_2m``, or ``meanflow`` (MeanFlow models only).
        steps: DDIM steps, or the solver's levels.
        eta: DDIM eta.
        seed: seed of the generated images.
        batch_size: images per batch, for sampling and for features.
        precision: sampling precision, ``32-true`` or ``bf16-mixed`` (bf16 autocast).
        num_real: at most this many images of the checkpoint's dataset as the reference.
        feature_extractor: ``inception`` (torch-fidelity's InceptionV3), ``digits`` (the digit judge shipped with
            the package: no download) or the import path of an nn.Module class.
        weights_path: a local file of the Inception weights, for machines without network access.
        cache_dir: where the reference features of a checkpoint's dataset are cached.
        trust_class: your own network or optimizer classes that the checkpoint may name (see `sample`).
        spacing: the ODE solvers' steps, ``linspace`` or ``karras``.
        flow_shift: for a flow model, SD3's shift of the sampling levels (default: the one it was trained with).
        guide_ckpt: autoguidance from this checkpoint (see `sample`).
        guidance_interval: ``[LO, HI]``: guide only at noise levels sigma / alpha in (LO, HI] (see `sample`).
        guide_condition: ``same`` or ``null``: what the guide is given on a class or text model (see `sample`).
        autoencoder: for a latent model whose autoencoder moved: its new place (see `sample`).
        stack_guidance: guidance_scale for a MeanFlow model with guidance folded in (see `sample`).
        ema_length: the EMA of this relative width, rebuilt from the run's snapshots (see `sample`); a list, such as
            ``[0.03, 0.05, 0.08, 0.12]``, sweeps the widths (each rebuilt once, then drawn at every guidance_scale).
        plot: a PNG file of the scores against the EMA length, one line per guidance scale (a sweep).
    """
    if (ckpt_path is None) == (samples is None):
        raise UserError("give exactly one of --ckpt_path (to generate images) and --samples (images to score)")
    if real is None and ckpt_path is None:
        raise UserError("give the reference images with --real DIR (or --ckpt_path, to use its training images)")
    # Everything that can fail is checked before the images are generated.
    real_images = load_images(real) if real is not None else None
    fake_images = load_images(samples) if samples is not None else None
    widths = ema_length if isinstance(ema_length, list) else [ema_length]
    scales = guidance_scale if isinstance(guidance_scale, list) else [guidance_scale]
    if not widths or not scales:
        raise UserError("--ema_length and --guidance_scale take one value or a list of one or more")
    if ckpt_path is None and (ema_length is not None or len(scales) > 1 or plot):
        raise UserError("--ema_length, several --guidance_scale values and --plot are for a checkpoint's samples "
                        "(--ckpt_path)")
    if plot is not None:
        check_plot(plot, widths)
    if ckpt_path is not None:
        module, checkpoint = load_checkpoint(ckpt_path, parse_trusted(trust_class), autoencoder)
        rebuilt = Rebuilt(module, checkpoint, ckpt_path) if ema_length is not None else None
        if rebuilt is not None:
            rebuilt.check(widths)
        grid = [Sampling(sampler, steps, eta, scale, spacing, guidance_interval, guide_ckpt, guide_condition,
                         stack_guidance) for scale in scales]
        for settings in grid:
            settings.check(module.process)
        guide = load_guide(guide_ckpt, module, parse_trusted(trust_class))
        for settings in grid:
            settings.check_model(module, guide is not None)
            check_not_itself(guide, module, settings)
        set_flow_shift(module, flow_shift)
        data = checkpoint_data(checkpoint, parse_trusted(trust_class)) if real is None else None
        hp = module.hparams
        fake_shape = (hp.channels, hp.image_size, hp.image_size)  # the images, after decoding latents
    else:
        fake_shape = tuple(fake_images.shape[1:])
    real_shape = tuple(real_images.shape[1:]) if real is not None else (data.channels, data.image_size, data.image_size)
    if fake_shape != real_shape:
        raise UserError(
            f"the samples are {shape_text(fake_shape)} and the real images {shape_text(real_shape)}: FID and KID "
            "compare images of one size and colour mode; bring both to one shape first"
        )

    try:
        features = ImageFeatures(feature_extractor, weights_path).to(default_device())
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"the {feature_extractor} feature extractor could not be loaded ({reason(err)}); "
            "without network access, give --weights_path FILE"
        ) from None

    y, rows = None, []
    try:
        if ckpt_path is None:
            real_features = extract(features, real_images, batch_size)
            print(json.dumps(score(features, fake_images, real_features, batch_size=batch_size)))
            return
        real_features = None  # after the first images are drawn: a signal while reading them keeps those
        classes = module.conditioning.num_classes
        y = parse_labels("all", num_samples, classes) if classes else None
        warn_bf16(precision, module.device, "--precision")
        for width in widths:
            if width is not None:
                say(rebuilt.apply(width))
            for settings in grid:
                counts, start = Evaluations(), time.perf_counter()
                fake_images = None  # a signal while drawing keeps this pair's images, not the previous pair's
                fake_images = generate_images(module, num_samples, seed, batch_size, precision=precision, labels=y,
                                              guide=guide, counts=counts, **settings.kwargs())
                model_calls, guide_calls = counts.per_image()
                ms_per_image = round(1000 * (time.perf_counter() - start) / num_samples, 2)
                if real_features is None:
                    real_features = (extract(features, real_images, batch_size) if real is not None else
                                     checkpoint_reference(features, data, num_real, batch_size, cache_dir))
                row = {**({"ema_length": width} if width is not None else {}),
                       **({"guidance_scale": settings.guidance_scale} if len(grid) > 1 or rebuilt else {}),
                       **score(features, fake_images, real_features, y, batch_size),
                       "model_evaluations": model_calls, "guide_evaluations": guide_calls,
                       "ms_per_image": ms_per_image}
                print(json.dumps(row), flush=True)
                rows.append(row)
    except Stopped as stop:  # SIGTERM or Ctrl-C: no score; the samples drawn are kept for `--samples`
        if ckpt_path is None:
            stop.line = f"stopped by {stop.name} while scoring {samples}: no score was computed"
            raise stop from None
        drawn = fake_images if fake_images is not None else stop.images
        kept = Path(tempfile.gettempdir(), "samples.npz")  # where keep_samples writes
        raise kept_when_stopped(stop, drawn, num_samples, lambda: keep_samples(drawn), kept, "samples",
                                "; no score was computed (evaluate --samples FILE scores them)") from None
    if len(rows) > 1:
        say(sweep_table(rows))
    if plot is not None:
        say(f"wrote {write_plot(rows, plot)}")


def score(features: ImageFeatures, fake_images: Tensor, real_features: Tensor, labels: Tensor | None = None,
          batch_size: int = 256) -> dict:
    """FID and KID of uint8 images against reference features; with the digit judge also the share of confident
    digits (and, given the labels asked for, of digits classified as asked), and their frames' grey (`frame_stats`)."""
    fake = extract(features, fake_images, batch_size)
    fid, kid = (m.to(fake.device) for m in fid_and_kid(fake.shape[1], min(1000, len(fake), len(real_features))))
    for metric in (fid, kid):
        metric.update(real_features.to(fake.device), real=True)
        metric.update(fake, real=False)
    scores = {**compute(fid, kid), "num_samples": len(fake)}
    if (logits := features.judge(fake)) is not None:  # the digit judge also says how clear the digits are
        scores |= judge_shares(judge_counts(logits, labels), len(fake), labels is not None)
        scores |= frame_stats(fake_images)
    return scores


def shape_text(shape: tuple[int, int, int]) -> str:
    """(1, 28, 28) -> '28x28 with 1 channel'."""
    channels, height, width = shape
    return f"{height}x{width} with {channels} channel{'s' if channels > 1 else ''}"


def checkpoint_data(checkpoint: dict, trusted: list[str] = ()) -> DiffusionDataModule:
    """The training images of the run that wrote the checkpoint, set up; a UserError when they are not found. Its
    data source is checked against `diffusion_lit.core.trust` before it is built; older checkpoints' `dataset` and `root`
    are read as their source."""
    data_hparams = checkpoint.get("datamodule_hyper_parameters")
    if not data_hparams:
        raise UserError("the checkpoint does not say what it was trained on: give the reference images with --real DIR")
    crafted = ("the checkpoint's data settings {}: a crafted or damaged checkpoint; give the reference images with "
               "--real DIR")
    if not isinstance(data_hparams, dict):
        raise UserError(crafted.format("are not a mapping of settings"))
    check_data_hparams(data_hparams, trusted)
    root = recorded_root(data_hparams)
    if root is None:  # not echoed: its text is the file's, not ours
        raise UserError(crafted.format("name a data folder that is not a plain path"))
    try:
        data = from_config(data_hparams)
        data.setup("fit")
    except UserError:  # describe() shows only checked class names and the plain path
        raise UserError(
            f"the checkpoint was trained on {describe(data_hparams)}, which from here is {root.resolve()} and holds "
            "no such images: run evaluate from the folder `fit` ran in, or give the reference images with --real DIR"
        ) from None
    except (TypeError, KeyError, AttributeError) as err:  # a value of the wrong type where the data wants another
        raise UserError(crafted.format(f"cannot be built ({type(err).__name__})")) from None
    except Exception as err:  # reading the images failed (their text is not echoed: it may hold the file's values)
        raise UserError(f"the checkpoint's training images could not be read ({type(err).__name__}); give the "
                        "reference images with --real DIR") from None
    return data


def recorded_root(data_hparams: dict) -> Path | None:
    """The folder a checkpoint's data source read (`data` when it does not say), or None for a value that is not a
    plain path: a string of printable characters."""
    source = data_hparams.get("source")
    init_args = source.get("init_args") if isinstance(source, dict) else data_hparams
    root = init_args.get("root") if isinstance(init_args, dict) else None
    root = "data" if root is None and (init_args is None or isinstance(init_args, dict)) else root
    plain = isinstance(root, str) and root.isprintable() and len(root) <= 1000
    return Path(root) if plain else None


def checkpoint_reference(features: ImageFeatures, data: DiffusionDataModule, num_real: int, batch_size: int,
                         cache_dir: str) -> Tensor:
    """Features of the first num_real training images of a checkpoint's data, cached as the FID callback does."""
    path = reference_cache_path(cache_dir, features.name, data, num_real)
    if path.is_file():
        return load_features(path)
    subset = torch.utils.data.Subset(data.reference_set, range(min(num_real, len(data.reference_set))))
    real = dataset_features(features, subset, batch_size, progress=True)
    save_features(path, real)
    return real
