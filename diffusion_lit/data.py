"""One DataModule for MNIST, CIFAR-10 and any folder of images, all scaled to [-1, 1]."""

from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets, transforms

from diffusion_lit.errors import UserError

DatasetName = Literal["mnist", "cifar10", "folder"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TORCHVISION = {  # name -> (class, image size, channels, classes, files that must be in root)
    "mnist": (datasets.MNIST, 28, 1, 10, "MNIST/raw/train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz)"),
    "cifar10": (datasets.CIFAR10, 32, 3, 10, "cifar-10-batches-py/ (from cifar-10-python.tar.gz)"),
}


class ImageFolder(Dataset):
    """Every image below `root`, labelled by its top-level sub-folder when all images lie in one, else 0."""

    def __init__(self, root: str | Path, channels: int, transform=None) -> None:
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UserError(
                f"no images found in {self.root}: point --data.root at a folder of image files "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}), optionally in one sub-folder per class"
            )
        parts = [p.relative_to(self.root).parts for p in self.files]
        self.classes = sorted({q[0] for q in parts}) if all(len(q) > 1 for q in parts) else []
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = [index[q[0]] if self.classes else 0 for q in parts]
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as image:
            image = image.convert(self.mode)
        return (self.transform(image) if self.transform else image), self.labels[i]


def peek_folder(root: Path) -> tuple[int, int, int]:
    """(size, channels, classes) of a folder: its first image's shorter side, 1 channel for grayscale (else 3),
    and its class sub-folders (0 without)."""
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist: give an existing folder with --data.root")
    dataset = ImageFolder(root, channels=3)
    with Image.open(dataset.files[0]) as image:
        channels = 1 if image.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
        return min(image.size), channels, len(dataset.classes)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed and epoch alone) whose next epoch can start part-way through.

    A run resumed mid-epoch sets `start` to the samples it already trained on, so it sees the same batches
    in the same order as a run that was never interrupted.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self):
        indices, self.start = list(super().__iter__())[self.start :], 0
        return iter(indices)


class DiffusionDataModule(LightningDataModule):
    """Images in [-1, 1] with their labels, split into train and validation sets.

    Args:
        dataset: ``mnist`` or ``cifar10`` (torchvision, downloaded into root when possible) or ``folder``.
        root: where the dataset lives (for ``folder``: the folder of images, class sub-folders optional).
        image_size: resize (and center-crop) to this size; by default the dataset's own (a folder's first image).
        channels: 1 or 3; by default the dataset's own (a folder's first image: grayscale -> 1).
        batch_size: images per batch on each device.
        num_workers: data-loading worker processes.
        random_flip: random horizontal flips for training; by default on for cifar10 and off otherwise.
        val_fraction: share of the images held out for validation.
        download: download mnist / cifar10 into root when they are missing.
        seed: seed of the train/validation split and of the shuffling.
    """

    def __init__(
        self,
        dataset: DatasetName = "mnist",
        root: str = "data",
        image_size: int | None = None,
        channels: int | None = None,
        batch_size: int = 128,
        num_workers: int = 2,
        random_flip: bool | None = None,
        val_fraction: float = 0.05,
        download: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in ("mnist", "cifar10", "folder"):
            raise UserError(f"unknown dataset {dataset!r}: use mnist, cifar10 or folder")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if channels not in (None, 1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels}")
        # Not logged: the model logs the resolved image_size and channels, and the two sets must not disagree.
        self.save_hyperparameters(logger=False)
        if dataset == "folder":
            native_size, native_channels, self.num_classes = peek_folder(Path(root))
        else:
            native_size, native_channels, self.num_classes = TORCHVISION[dataset][1:4]
        self.image_size = image_size or native_size
        self.channels = channels or native_channels
        self.random_flip = dataset == "cifar10" if random_flip is None else random_flip
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.reference_set: Dataset | None = None

    def _load(self, train: bool) -> Dataset:
        """The whole dataset with the train (flips) or the eval transform."""
        steps = [transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size)]
        if self.channels == 1 and self.hparams.dataset == "cifar10":
            steps.append(transforms.Grayscale())
        if self.channels == 3 and self.hparams.dataset == "mnist":
            steps.append(transforms.Grayscale(3))
        if train and self.random_flip:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize(0.5, 0.5)]  # [0, 1] -> [-1, 1]
        transform = transforms.Compose(steps)
        name, root = self.hparams.dataset, self.hparams.root
        if name == "folder":
            return ImageFolder(root, self.channels, transform)
        cls, *_, files = TORCHVISION[name]
        try:
            return cls(root, train=True, transform=transform, download=False)
        except RuntimeError:
            raise UserError(
                f"{name} was not found in {Path(root).resolve()}"
                + (" and could not be downloaded" if self.hparams.download else "")
                + f". Put {files} there, or train on a folder of images: --data.dataset folder --data.root DIR"
            ) from None

    def prepare_data(self) -> None:
        name = self.hparams.dataset
        if name != "folder" and self.hparams.download:
            try:
                TORCHVISION[name][0](self.hparams.root, train=True, download=True)
            except Exception:  # offline or a broken mirror: setup() explains what to do
                pass

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_full, eval_full = self._load(train=True), self._load(train=False)
        n = len(train_full)
        n_val = int(round(n * self.hparams.val_fraction))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.seed)).tolist()
        self.train_set = Subset(train_full, order[n_val:])
        self.val_set = Subset(eval_full, order[:n_val])
        self.reference_set = Subset(eval_full, order[n_val:])  # the training images without augmentation, for FID
        if len(self.train_set) < self.hparams.batch_size:
            raise UserError(
                f"only {len(self.train_set)} training images for batch_size {self.hparams.batch_size}: "
                "lower --data.batch_size or add images"
            )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        trainer = self.trainer
        # The loader's own generator keeps data loading off the global random stream that training draws from.
        sampler = ResumableSampler(
            dataset,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=shuffle,
            seed=self.hparams.seed,
            drop_last=shuffle,
        )
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_set, shuffle=True)
        if self.trainer is not None:  # on resume, skip what this epoch already trained on
            done = self.trainer.global_step * self.trainer.accumulate_grad_batches % len(loader)
            loader.sampler.start = done * self.hparams.batch_size
        return loader

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if len(self.val_set) else []
