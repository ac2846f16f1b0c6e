"""The `sample` and `evaluate` commands: generate images from a checkpoint, and score images with FID and KID."""

import json
from pathlib import Path

import torch
from torch import Tensor

from diffusion_lit.data import DiffusionDataModule
from diffusion_lit.errors import UserError
from diffusion_lit.images import load_images, save_images, to_uint8
from diffusion_lit.metrics import (
    ImageFeatures,
    compute,
    dataset_features,
    extract,
    fid_and_kid,
    load_features,
    reference_cache_path,
    save_features,
)
from diffusion_lit.module import DiffusionModule
from diffusion_lit.sampling import Sampler, generate
from diffusion_lit.speed import Precision


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint(ckpt_path: str) -> tuple[DiffusionModule, dict]:
    """The module (on the GPU when there is one, in eval mode) and the raw checkpoint dict of a `fit` run."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: give a .ckpt file written by `fit`")
    try:
        # Tensors and plain values only: loading cannot run code from the file.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        module = DiffusionModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"{path} could not be loaded as a diffusion_lit checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    device = _device()
    module.compile_denoisers(device)
    return module.to(device).eval(), checkpoint


def generate_images(module: DiffusionModule, num_samples: int, seed: int, batch_size: int, ema: bool = True,
                    precision: Precision = "32-true", **sampler_kwargs) -> Tensor:
    """num_samples uint8 images [N, C, H, W] on the CPU, with a progress bar."""
    if num_samples < 1 or batch_size < 1:
        raise UserError(f"num_samples and batch_size must be at least 1, got {num_samples} and {batch_size}")
    hp = module.hparams
    generator = torch.Generator(module.device).manual_seed(seed)
    with module.sampling(precision, ema) as model:
        batches = generate(model, module.schedule, num_samples, (hp.channels, hp.image_size, hp.image_size),
                           generator, batch_size, progress=True, **sampler_kwargs)
        return torch.cat([to_uint8(x).cpu() for x in batches])


def parse_labels(labels: str | None, num_samples: int, num_classes: int) -> Tensor | None:
    """`3,3,7` -> those labels; `all` -> num_samples labels cycling through every class (balanced); None -> None."""
    if labels is None:
        return None
    if labels == "all":
        if not num_classes:
            raise UserError("--labels all: this model is unconditional (trained without labels); leave out --labels")
        return torch.arange(num_samples) % num_classes
    try:
        return torch.tensor([int(label) for label in labels.split(",")])
    except ValueError:
        raise UserError(f"--labels {labels!r}: give class indices separated by commas (3,3,7) or 'all'") from None


def sample(
    ckpt_path: str,
    out: str = "samples.png",
    num_samples: int = 64,
    labels: str | None = None,
    guidance_scale: float = 1.0,
    sampler: Sampler = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
    clip_x0: bool = True,
    ema: bool = True,
    precision: Precision = "32-true",
) -> None:
    """Generate images from a checkpoint.

    Args:
        ckpt_path: a checkpoint written by `fit` (e.g. runs/mnist/checkpoints/last.ckpt).
        out: a `.png` file (one grid), a `.npz` file (uint8 NHWC under `arr_0`) or a folder (one PNG per image).
        num_samples: how many images (with a list of labels: one image per label).
        labels: for a conditional model: class indices such as ``3,3,7``, or ``all`` for num_samples images cycling
            through every class; without, a conditional model samples unconditionally.
        guidance_scale: classifier-free guidance w: 1 plain conditional, 0 unconditional, above 1 stronger.
        sampler: ``ddim`` or ``ddpm`` (ancestral, all T steps).
        steps: DDIM steps.
        eta: DDIM eta: 0 deterministic, 1 as noisy as DDPM.
        seed: the same seed (and batch size) gives the same images.
        batch_size: images generated at once.
        clip_x0: clip the predicted x0 to [-1, 1] at each step.
        ema: sample with the EMA weights (the raw training weights otherwise).
        precision: ``bf16-mixed`` runs the network under bf16 autocast (faster on GPUs and on CPUs with bf16
            instructions; the images differ slightly from ``32-true``).
    """
    module, _ = load_checkpoint(ckpt_path)
    y = parse_labels(labels, num_samples, module.num_classes)
    images = generate_images(module, num_samples if y is None else len(y), seed, batch_size, ema, precision, labels=y,
                             guidance_scale=guidance_scale, sampler=sampler, steps=steps, eta=eta, clip_x0=clip_x0)
    print(f"wrote {len(images)} images to {save_images(images, out)}")


def evaluate(
    ckpt_path: str | None = None,
    samples: str | None = None,
    real: str | None = None,
    num_samples: int = 2000,
    guidance_scale: float = 1.0,
    sampler: Sampler = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
    precision: Precision = "32-true",
    num_real: int = 10000,
    feature_extractor: str = "inception",
    weights_path: str | None = None,
    cache_dir: str = "~/.cache/diffusion_lit/fid",
) -> None:
    """Print FID and KID as one JSON line, for a checkpoint's samples or for given images.

    Args:
        ckpt_path: generate `num_samples` images from this checkpoint (EMA weights); without --real, its training
            images are the reference.
        samples: score these images instead: a `.npz` file (uint8 NHWC under `arr_0`) or a folder of images.
        real: the reference images: a folder of images or a `.npz` file.
        num_samples: images to generate from the checkpoint (a conditional one: balanced over the classes).
        guidance_scale: classifier-free guidance w for a conditional checkpoint.
        sampler: ``ddim`` or ``ddpm``.
        steps: DDIM steps.
        eta: DDIM eta.
        seed: seed of the generated images.
        batch_size: images per batch, for sampling and for features.
        precision: sampling precision, ``32-true`` or ``bf16-mixed`` (bf16 autocast).
        num_real: at most this many images of the checkpoint's dataset as the reference.
        feature_extractor: ``inception`` (torch-fidelity's InceptionV3) or the import path of an nn.Module class.
        weights_path: a local file of the Inception weights, for machines without network access.
        cache_dir: where the reference features of a checkpoint's dataset are cached.
    """
    if (ckpt_path is None) == (samples is None):
        raise UserError("give exactly one of --ckpt_path (to generate images) and --samples (images to score)")
    if real is None and ckpt_path is None:
        raise UserError("give the reference images with --real DIR (or --ckpt_path, to use its training images)")
    try:
        features = ImageFeatures(feature_extractor, weights_path).to(_device())
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"the {feature_extractor} feature extractor could not be loaded ({type(err).__name__}: {err}); "
            "without network access, give --weights_path FILE"
        ) from None

    module = checkpoint = None
    if ckpt_path is not None:
        module, checkpoint = load_checkpoint(ckpt_path)
        y = parse_labels("all", num_samples, module.num_classes) if module.num_classes else None
        fake_images = generate_images(module, num_samples, seed, batch_size, precision=precision, labels=y,
                                      guidance_scale=guidance_scale, sampler=sampler, steps=steps, eta=eta)
    else:
        fake_images = load_images(samples)
    fake = extract(features, fake_images, batch_size)
    if real is not None:
        real_features = extract(features, load_images(real), batch_size)
    else:
        real_features = checkpoint_reference(features, checkpoint, num_real, batch_size, cache_dir)

    fid, kid = (m.to(fake.device) for m in fid_and_kid(fake.shape[1], min(1000, len(fake), len(real_features))))
    for metric in (fid, kid):
        metric.update(real_features.to(fake.device), real=True)
        metric.update(fake, real=False)
    print(json.dumps({**compute(fid, kid), "num_samples": len(fake)}))


def checkpoint_reference(features: ImageFeatures, checkpoint: dict, num_real: int, batch_size: int,
                         cache_dir: str) -> Tensor:
    """Features of the training images of the run that wrote the checkpoint, cached as the FID callback does."""
    data_hparams = checkpoint.get("datamodule_hyper_parameters")
    if not data_hparams:
        raise UserError("the checkpoint does not say what it was trained on: give the reference images with --real DIR")
    data = DiffusionDataModule(**{k: v for k, v in data_hparams.items() if not k.startswith("_")})  # no CLI keys
    data.setup("fit")
    path = reference_cache_path(cache_dir, features.name, data, num_real)
    if path.is_file():
        return load_features(path)
    subset = torch.utils.data.Subset(data.reference_set, range(min(num_real, len(data.reference_set))))
    real = dataset_features(features, subset, batch_size, progress=True)
    save_features(path, real)
    return real
