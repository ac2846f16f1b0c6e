"""One DataModule for MNIST, CIFAR-10, any folder of images and the shipped digits, all scaled to [-1, 1]."""

import contextlib
import io
import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets, transforms
from tqdm.auto import tqdm  # Lightning's own progress-bar library

from diffusion_lit.digits import ShippedDigits, digit_caption
from diffusion_lit.errors import UserError, reason, say

DatasetName = Literal["mnist", "cifar10", "folder", "digits"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TORCHVISION = {  # name -> (class, image size, channels, classes, files that must be in root)
    "mnist": (datasets.MNIST, 28, 1, 10, "MNIST/raw/train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz)"),
    "cifar10": (datasets.CIFAR10, 32, 3, 10, "cifar-10-batches-py/ (from cifar-10-python.tar.gz)"),
}


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which finishes its step and saves (Checkpoint)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def walk(root: Path) -> Iterator[Path]:
    """Every file below root, without recursion (a folder nested thousands deep cannot exhaust Python's stack);
    symbolic links to folders are followed once each."""
    stack, seen = [Path(root)], set()
    while stack:
        folder = stack.pop()
        try:
            real = folder.resolve()
            if real in seen:
                continue
            seen.add(real)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable folder holds nothing we can use
        for entry in entries:
            if entry.is_dir():
                stack.append(Path(entry.path))
            elif entry.is_file():
                yield Path(entry.path)


def image_files(root: Path) -> list[Path]:
    """The image files below root (by extension)."""
    return [p for p in walk(root) if p.suffix.lower() in IMAGE_SUFFIXES]


def to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit grayscale (Pillow's I;16 modes, and I holding 16-bit values) scaled to 8 bits; Pillow's own
    conversion would clip every value above 255 to white. Other images as they are."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64).clip(min=0)
        top = values.max(initial=0)
        if image.mode == "I" and top <= 255:  # 8-bit values in a 32-bit mode
            return Image.fromarray(values.astype(np.uint8), "L")
        top = 65535.0 if top <= 65535 else top
        return Image.fromarray(np.round(values * (255.0 / top)).astype(np.uint8), "L")
    return image


@dataclass
class FolderIndex:
    """The readable images below a folder, with their labels (the top-level sub-folder, when every image lies in
    one; else 0), sizes and colour modes, found once before training so that a bad file stops nothing mid-run."""

    root: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]
    sizes: list[tuple[int, int]]
    modes: list[str]

    @classmethod
    def scan(cls, root: str | Path, skip_unreadable: bool = False) -> "FolderIndex":
        """Decodes every image file once (a progress bar for large folders), so that a truncated one is found before
        the first step; unreadable files stop with one message listing them, or are left out with a warning when
        `skip_unreadable`."""
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist: give an existing folder with --data.root")
        candidates = sorted(image_files(root))
        files, sizes, modes, bad = [], [], [], []
        for path in tqdm(candidates, f"checking the images in {root}", disable=len(candidates) < 2000, leave=False):
            try:
                with Image.open(path) as image:
                    image.load()  # the whole file, not only its header
                    size, mode = image.size, image.mode
                sizes.append(size)
                modes.append(mode)
                files.append(path)
            except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                bad.append(f"{path} ({reason(err)})")
        if bad:
            listing = f"{len(bad)} of {len(candidates)} image files in {root} cannot be read: {', '.join(bad[:3])}"
            listing += ", ..." if len(bad) > 3 else ""
            if not skip_unreadable:
                raise UserError(f"{listing}. Remove or replace them, or pass --data.skip_unreadable true to leave them out")
            say(f"{listing}; left out (--data.skip_unreadable)")
        if not files:
            raise UserError(
                f"no images found in {root}: point --data.root at a folder of image files "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}), optionally in one sub-folder per class"
            )
        parts = [p.relative_to(root).parts for p in files]
        classes = sorted({q[0] for q in parts}) if all(len(q) > 1 for q in parts) else []
        if classes and (empty := sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                                        and d.name not in classes)):
            # Dropping them would shift the labels of the classes after them.
            classes = sorted(classes + empty)
            say(f"{root}: {len(empty)} class folder(s) hold no images ({', '.join(empty[:3])}"
                f"{', ...' if len(empty) > 3 else ''}): kept as classes without images, so labels follow the folder names")
        index = {name: i for i, name in enumerate(classes)}
        return cls(root, files, [index[q[0]] if classes else 0 for q in parts], classes, sizes, modes)

    def native(self) -> tuple[int, int]:
        """(size, channels) of the first image: its shorter side, and 1 channel for grayscale, else 3."""
        return min(self.sizes[0]), 1 if self.modes[0] in GRAYSCALE_MODES else 3

    def conversions(self, size: int, channels: int) -> str | None:
        """One line saying how many images are resized or change colour mode on the way to size x size, or None."""
        resized = sum(s != (size, size) for s in self.sizes)
        target = "L" if channels == 1 else "RGB"
        converted = sum(m != target for m in self.modes)
        deep = sum(m == "I" or m.startswith("I;16") for m in self.modes)
        said = [f"{resized} resized and center-cropped to {size}x{size}"] if resized else []
        said += [f"{deep} scaled from 16 to 8 bits"] if deep else []
        said += [f"{converted} converted from other colour modes to {target}"] if converted else []
        return f"{self.root}: of {len(self.files)} images, {' and '.join(said)}" if said else None


def read_captions(root: Path, files: list[Path]) -> list[str | None]:
    """Each image's caption: from a `metadata.jsonl` (Hugging Face's imagefolder layout: one JSON object per line
    with `file_name`, relative to that file's folder, and `text`) anywhere below root, else from a `.txt` file of the
    same name beside the image; None where there is neither."""
    captions = {}
    for meta in sorted(p for p in walk(root) if p.name == "metadata.jsonl"):
        for number, line in enumerate(read_text(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row["text"], str):
                    raise TypeError
                captions[(meta.parent / row["file_name"]).resolve()] = row["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{meta}, line {number}: each line must be a JSON object with \"file_name\" and "
                                f"\"text\" (a string), got {line[:80]!r}") from None
    found = []
    for path in files:
        text = captions.get(path.resolve())
        if text is None and (beside := path.with_suffix(".txt")).is_file():
            text = read_text(beside).strip()
        found.append(text)
    return found


def read_text(path: Path) -> str:
    """A caption file's text (UTF-8); a UserError when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"caption file {path} cannot be read as UTF-8 text ({reason(err)}): fix or remove it") from None


class Captioned(Dataset):
    """(image, caption) pairs: a dataset's images with captions made by `caption(index, label)`."""

    def __init__(self, dataset: Dataset, caption: Callable[[int, int], str]) -> None:
        self.dataset, self.caption = dataset, caption

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return image, self.caption(i, label)


class CachedSet(Dataset):
    """Precomputed tensors (encoded images) with their labels or captions."""

    def __init__(self, tensors: Tensor, others: list) -> None:
        self.tensors, self.others = tensors, others

    def __len__(self) -> int:
        return len(self.others)

    def __getitem__(self, i: int):
        return self.tensors[i], self.others[i]


class ImageFolder(Dataset):
    """The images of a FolderIndex, converted to grayscale (1 channel) or RGB, with their labels."""

    def __init__(self, index: FolderIndex, channels: int, transform=None) -> None:
        self.index = index
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index.files)

    def __getitem__(self, i: int):
        with Image.open(self.index.files[i]) as image:
            image = to_8_bits(image).convert(self.mode)
        return (self.transform(image) if self.transform else image), self.index.labels[i]


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
        dataset: ``mnist`` or ``cifar10`` (torchvision, downloaded into root when possible; mnist falls back to the
            shipped digits, saying so), ``folder``, or ``digits`` (the 10,000 MNIST test digits shipped with the
            package).
        root: where the dataset lives (for ``folder``: the folder of images, class sub-folders optional).
        image_size: resize (and center-crop) to this size; by default the dataset's own (a folder's first image).
        channels: 1 or 3; by default the dataset's own (a folder's first image: grayscale -> 1).
        batch_size: images per batch on each device.
        num_workers: data-loading worker processes.
        random_flip: random horizontal flips for training; by default on for cifar10 and off otherwise.
        val_fraction: share of the images held out for validation.
        download: download mnist / cifar10 into root when they are missing.
        seed: seed of the train/validation split and of the shuffling.
        skip_unreadable: for ``folder``: leave out image files that cannot be read (with a warning) instead of
            stopping.
        captions: serve a caption with each image instead of its label, for text-conditioned models. A folder's come
            from a `metadata.jsonl` (`file_name`, `text`) or a `.txt` file beside each image (an image without one
            gets the empty prompt, said once); the digits' are made from their labels in several phrasings ("7",
            "seven", "the digit 7", "a handwritten seven", ...); cifar10's from the class names.
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
        skip_unreadable: bool = False,
        captions: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in ("mnist", "cifar10", "folder", "digits"):
            raise UserError(f"unknown dataset {dataset!r}: use mnist, cifar10, folder or digits")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if num_workers < 0:
            raise UserError(f"num_workers must be 0 (load in the main process) or more, got {num_workers}")
        if channels not in (None, 1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels}")
        # Not logged: the model logs the resolved image_size and channels, and the two sets must not disagree.
        self.save_hyperparameters(logger=False)
        if dataset == "folder":
            self.folder = FolderIndex.scan(root, skip_unreadable)
            (native_size, native_channels), self.num_classes = self.folder.native(), len(self.folder.classes)
        else:  # mnist and the shipped digits share their shape
            native_size, native_channels, self.num_classes = TORCHVISION.get(dataset, TORCHVISION["mnist"])[1:4]
        self.image_size = image_size or native_size
        self.channels = channels or native_channels
        self.random_flip = dataset == "cifar10" if random_flip is None else random_flip
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.reference_set: Dataset | None = None
        self.mnist_missing: str | None = None  # what to do when mnist fell back to the shipped digits
        self.captions = captions
        if captions and dataset == "folder":
            self.folder_captions = self.read_folder_captions()

    def read_folder_captions(self) -> list[str]:
        found = read_captions(self.folder.root, self.folder.files)
        missing = sum(text is None for text in found)
        if missing == len(found):
            raise UserError(
                f"--data.captions true: no captions in {self.folder.root}. Give a metadata.jsonl with a "
                '{"file_name": ..., "text": ...} line per image, or a .txt file beside each image'
            )
        if missing:
            say(f"{missing} of {len(found)} images in {self.folder.root} have no caption: they train with the empty "
                "prompt")
        return [text or "" for text in found]

    def caption_of(self, index: int, label: int) -> str:
        name = self.hparams.dataset
        if name == "folder":
            return self.folder_captions[index]
        if name == "cifar10":
            return ("{}", "a {}", "a photo of a {}")[index % 3].format(CIFAR10_CLASSES[label])
        return digit_caption(label, index)

    def example_prompts(self, count: int) -> list[str]:
        """Up to `count` distinct captions among the first 1,000 training images (for sample grids)."""
        prompts = []
        for i in range(min(len(self.train_set), 1000) if self.captions else 0):
            if (text := self.train_set[i][1]) not in prompts:
                prompts.append(text)
            if len(prompts) == count:
                break
        return prompts or [""]

    def _load(self, train: bool) -> Dataset:
        """The whole dataset with the train (flips) or the eval transform."""
        steps = [transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size)]
        if self.channels == 1 and self.hparams.dataset == "cifar10":
            steps.append(transforms.Grayscale())
        if self.channels == 3 and self.hparams.dataset in ("mnist", "digits"):
            steps.append(transforms.Grayscale(3))
        if train and self.random_flip:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize(0.5, 0.5)]  # [0, 1] -> [-1, 1]
        transform = transforms.Compose(steps)
        dataset = self._images(transform)
        return Captioned(dataset, self.caption_of) if self.captions else dataset

    def _images(self, transform) -> Dataset:
        name, root = self.hparams.dataset, self.hparams.root
        if name == "folder":
            return ImageFolder(self.folder, self.channels, transform)
        if name == "digits":
            return ShippedDigits(transform)
        cls, *_, files = TORCHVISION[name]
        try:
            return cls(root, train=True, transform=transform, download=False)
        except RuntimeError:
            if name == "mnist":  # the shipped digits stand in, and setup() says so
                self.mnist_missing = f"put {files} in {Path(root).resolve()}"
                return ShippedDigits(transform)
            raise UserError(
                f"{name} was not found in {Path(root).resolve()}"
                + (" and could not be downloaded" if self.hparams.download else "")
                + f". Put {files} there, or train on a folder of images: --data.dataset folder --data.root DIR"
            ) from None

    def prepare_data(self) -> None:
        name = self.hparams.dataset
        if name in TORCHVISION and self.hparams.download:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # torchvision's line per failed mirror
                    TORCHVISION[name][0](self.hparams.root, train=True, download=True)
            except Exception:  # offline or a broken mirror: setup() explains what to do
                pass

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_full, eval_full = self._load(train=True), self._load(train=False)
        if self.hparams.dataset == "folder" and (conversions := self.folder.conversions(self.image_size, self.channels)):
            say(conversions)
        if self.mnist_missing:
            say("mnist: the full MNIST training split was not found and could not be downloaded, so this run trains on "
                "the 10,000 MNIST test digits that ship with diffusion_lit (--data.dataset digits). For all 60,000, "
                f"{self.mnist_missing}")
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

    @torch.no_grad()
    def cache(self, encode: Callable[[Tensor], Tensor]) -> None:
        """Replace the training and validation images by what `encode` makes of them (their latent distributions),
        computed once with a progress bar; their labels or captions stay. Random flips are then fixed."""
        for name in ("train_set", "val_set"):
            dataset = getattr(self, name)
            # Its own generator: a loader draws a seed, which must not come from the stream training draws from.
            loader = DataLoader(dataset, batch_size=256, num_workers=self.hparams.num_workers,
                                generator=torch.Generator().manual_seed(0))
            encoded, others = [], []
            for images, y in tqdm(loader, f"encoding the {name.split('_')[0]} images once", leave=False):
                encoded.append(encode(images).cpu())
                others.extend(y)
            setattr(self, name, CachedSet(torch.cat(encoded) if encoded else torch.empty(0), others))

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
            worker_init_fn=ignore_sigint,
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
