"""FID and KID plumbing: the feature extractor, reference features cached on disk, and torchmetrics' metrics.

Features are computed once per image by `ImageFeatures` and handed to torchmetrics' FrechetInceptionDistance and
KernelInceptionDistance through a pass-through "feature network", so the two metrics share one forward pass and
torchmetrics does the statistics (and their sync across DDP ranks).
"""

import hashlib
import importlib
import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm  # Lightning's own progress-bar library

from diffusion_lit.data.digits import DigitJudge
from diffusion_lit.core.errors import UserError
from diffusion_lit.core.files import write_atomic
from diffusion_lit.data.images import to_uint8


class ImageFeatures(nn.Module):
    """uint8 images [N, C, H, W], shaped as the dataset gives them, to features [N, D].

    Args:
        name: ``inception`` for torch-fidelity's 2048-d InceptionV3 (grayscale repeated to 3 channels), ``digits``
            for the digit judge that ships with the package (64-d; no download; for MNIST-like digits), or the
            import path of an ``nn.Module`` class, built without arguments, that maps float images in [0, 1] to
            [N, D] features.
        weights_path: a local file of the Inception weights, for machines without network access.
    """

    def __init__(self, name: str = "inception", weights_path: str | None = None) -> None:
        super().__init__()
        self.name = name
        if name == "inception":
            # Downloads the weights on first use unless weights_path is given; raises when it cannot. antialias off:
            # torchmetrics resizes with antialiasing by default, unlike torch-fidelity and the original TensorFlow
            # code, whose FID values the papers report (tests/test_inception.py checks the match).
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path,
                antialias=False,
            )
        elif name == "digits":
            self.net = DigitJudge()
        else:
            module, _, cls = name.rpartition(".")
            try:
                self.net = getattr(importlib.import_module(module), cls)()
            except (ImportError, AttributeError, ValueError) as err:
                raise UserError(
                    f"feature extractor {name!r} could not be imported ({err}): use 'inception' or the import "
                    "path of an nn.Module class, such as mypackage.features.SmallNet"
                ) from None
        self.net.eval().requires_grad_(False)
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # its device, even for a net without weights

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if self.name == "inception":
            return self.net(images.expand(-1, 3, -1, -1)).float()
        return self.net(images.float() / 255).flatten(1).float()

    def judge(self, features: Tensor) -> Tensor | None:
        """The digit judge's logits for its own features; None for other feature networks."""
        return self.net.head(features) if self.name == "digits" else None

    def train(self, mode: bool = True) -> "ImageFeatures":
        return super().train(False)  # always an evaluator


class Passthrough(nn.Module):
    """The metrics' feature network when the features were computed already."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def fid_and_kid(num_features: int, kid_subset_size: int) -> tuple[FrechetInceptionDistance, KernelInceptionDistance]:
    """torchmetrics' FID and KID over precomputed features; their real-image statistics survive `reset()`."""
    fid = FrechetInceptionDistance(feature=Passthrough(num_features), reset_real_features=False)
    kid = KernelInceptionDistance(
        feature=Passthrough(num_features), reset_real_features=False, subset_size=kid_subset_size
    )
    return fid, kid


def compute(fid: FrechetInceptionDistance, kid: KernelInceptionDistance) -> dict[str, float]:
    """FID and KID (mean, std over subsets) of what the metrics hold; a collective under DDP.

    KID's random subsets come from a fixed seed in a forked random state: the same features give the same
    value, and training's random stream is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        kid_mean, kid_std = kid.compute()
    # Both are distances, zero for one distribution. FID from sample covariances (a matrix square root in floating
    # point) and KID's unbiased estimate can land a hair below zero for alike sets: reported as 0.
    return {"fid": max(fid.compute().item(), 0.0), "kid_mean": max(kid_mean.item(), 0.0), "kid_std": kid_std.item()}


def extract(features: ImageFeatures, images: Tensor, batch_size: int = 256) -> Tensor:
    """Features of uint8 images [N, C, H, W], computed in batches on the extractor's device."""
    device = features.anchor.device
    return torch.cat([features(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)])


def dataset_features(features: ImageFeatures, dataset: Dataset, batch_size: int = 256, progress: bool = False) -> Tensor:
    """Features of a dataset of ([-1, 1] image, label) pairs, on the CPU."""
    loader = DataLoader(dataset, batch_size=batch_size)
    batches = tqdm(loader, "reference features", disable=not progress, dynamic_ncols=True)
    return torch.cat([extract(features, to_uint8(x), batch_size).cpu() for x, _ in batches])


def reference_cache_path(cache_dir: str | Path, extractor: str, data, num_real: int) -> Path:
    """Where the features of the first num_real training images of a set-up DiffusionDataModule are cached.

    The key is the dataset (name, folder, image count), the image size and channels, and the feature extractor.
    """
    identity = {
        **data.source.identity(),  # dataset and root: the keys of older versions, so their caches keep matching
        "images": len(data.reference_set),
        "image_size": data.image_size,
        "channels": data.channels,
        "num_real": min(num_real, len(data.reference_set)),
        "extractor": extractor,
    }
    digest = hashlib.sha1(repr(sorted(identity.items())).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"{identity['dataset']}-{extractor.rsplit('.', 1)[-1]}-{digest}.pt"


def load_features(path: Path) -> Tensor:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_features(path: Path, features: Tensor) -> None:
    """Writes the cache atomically (`diffusion_lit.core.files`), so a reader never sees half a file; a cache that cannot
    be written (a full disk, say) is said in one line, not fatal."""
    try:
        write_atomic(path, lambda f: torch.save(features, f), "the reference features", "going on without the cache")
    except UserError as err:
        print(err, file=sys.stderr)
