"""Where the training images come from: the `data.source` part of a config.

A source knows its images' native size and channels, its classes, the caption of each image, how to fetch itself
(`prepare`), and the name and folder the FID reference cache is keyed by. `DiffusionDataModule` resizes, splits,
batches and caches what a source serves. In a config::

    data:
      source:
        class_path: diffusion_lit.data.sources.ImageFolder
        init_args: {root: path/to/images}

or on the command line `--data.source ImageFolder --data.source.root DIR`. Leaving it out means `MNIST()`.
"""

import contextlib
import inspect
import io
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from diffusion_lit.data import digits
from diffusion_lit.core.errors import UserError, say
from diffusion_lit.core.trust import import_named
from diffusion_lit.data.folders import FolderImages, FolderIndex, read_captions
from diffusion_lit.data.loaders import Splits, map_loader, random_split

class Captioned(Dataset):
    """(image, caption) pairs: a dataset's images with captions made by `caption(index, label)`."""

    def __init__(self, dataset: Dataset, caption: Callable[[int, int], str]) -> None:
        self.dataset, self.caption = dataset, caption

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return image, self.caption(i, label)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class Source:
    """(PIL image, label) pairs with their native shape; a subclass sets the class attributes below."""

    name = ""  # what the FID reference cache is keyed by (older versions' `--data.dataset` value)
    image_size: int  # the native shape
    channels: int
    num_classes = 0  # 0: unlabelled
    flip = False  # random horizontal flips by default: for photos, not for digits
    root = "data"  # the cache's folder for a source that lives nowhere (the old default root: old caches match)
    elastic = False  # its loader resumes mid-epoch with another number of workers (else the epoch starts again)
    not_data: tuple[str, ...] = ()  # its settings that leave its images as they are (a resume may change them)

    def prepare(self) -> None:
        """Fetches what is missing (once per machine, from `prepare_data`)."""

    def images(self, transform, channels: int) -> Dataset:
        """The (image, label) pairs through `transform` (which holds `colour(channels)`)."""
        raise NotImplementedError

    def datasets(self, transform: Callable[[bool], Callable], channels: int, captions: bool, val_fraction: float,
                 seed: int) -> Splits:
        """The training, validation and reference images through `transform(train)`, with labels (or captions): by
        default a seeded random split of `images`."""
        train_full, eval_full = (self.images(transform(train), channels) for train in (True, False))
        if captions:
            train_full, eval_full = Captioned(train_full, self.caption), Captioned(eval_full, self.caption)
        return random_split(train_full, eval_full, val_fraction, seed)

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int,
               world_size: int, rank: int) -> DataLoader:
        """Batches of one of `datasets`' sets (or of its encoded copy), resumable mid-epoch through `state_dict`."""
        return map_loader(dataset, batch_size, shuffle, seed, num_workers, world_size, rank)

    def colour(self, channels: int) -> list:
        """Transforms that bring an image to `channels` (1: grayscale, 3: RGB)."""
        if channels == 3 and self.channels == 1:
            return [transforms.Grayscale(3)]
        return [transforms.Grayscale()] if channels == 1 and self.channels == 3 else []

    def read_captions(self) -> None:
        """Reads and checks the captions before training (`--data.captions true`)."""
        if type(self).caption is Source.caption:
            raise UserError(f"{type(self).__name__} has no captions: leave --data.captions false or use a source "
                            "with captions (ShippedDigits, MNIST, CIFAR10, ImageFolder, HFDataset, Streaming)")

    def caption(self, index: int, label: int) -> str:
        """The caption of image `index`."""
        raise NotImplementedError

    def notes(self, image_size: int, channels: int) -> list[str]:
        """Lines to say once the images are loaded (what was converted, what stood in)."""
        return []

    def identity(self) -> dict:
        """The dataset's name and folder, as the FID reference cache keys them."""
        return {"dataset": self.name, "root": Path(self.root).resolve()}

    def config(self) -> dict:
        """The source as a config names it (what a checkpoint stores): class_path, and init_args read from the
        attributes named as the arguments."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": {name: getattr(self, name) for name in inspect.signature(cls).parameters}}


class ShippedDigits(Source):
    """The 10,000 MNIST test digits that ship with the package: no download, 28x28 grayscale, 10 classes. Captions
    name the digit in several phrasings ("7", "seven", "the digit 7", "a handwritten seven", ...)."""

    name, image_size, channels, num_classes = "digits", 28, 1, 10

    def images(self, transform, channels: int) -> Dataset:
        return digits.ShippedDigits(transform)

    def caption(self, index: int, label: int) -> str:
        return digits.digit_caption(label, index)


class Torchvision(Source):
    """A torchvision dataset's training split in `root`, downloaded there when missing and `download` is on."""

    dataset: type | None = None  # set by MNIST and CIFAR10
    files = ""  # what must be in root, for the message when it is not
    not_data = ("download",)

    def __init__(self, root: str = "data", download: bool = True) -> None:
        if self.dataset is None:
            raise UserError("Torchvision is what MNIST and CIFAR10 share: name one of them as data.source")
        self.root, self.download = root, download

    def prepare(self) -> None:
        if self.download:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # torchvision's line per failed mirror
                    type(self).dataset(self.root, train=True, download=True)
            except Exception:  # offline or a broken mirror: images() explains what to do
                pass

    def images(self, transform, channels: int) -> Dataset:
        try:
            return type(self).dataset(self.root, train=True, transform=transform, download=False)
        except RuntimeError:
            return self.missing(transform)

    def missing(self, transform) -> Dataset:
        """What stands in when the files are not in root: nothing, by default."""
        raise UserError(
            f"{self.name} was not found in {Path(self.root).resolve()}"
            + (" and could not be downloaded" if self.download else "")
            + f". Put {self.files} there, or train on a folder of images: --data.source ImageFolder "
            "--data.source.root DIR"
        )


class MNIST(Torchvision):
    """MNIST's 60,000 training digits (28x28 grayscale, 10 classes) in `root`. When they are missing and cannot be
    downloaded, the shipped digits stand in, saying so; captions as `ShippedDigits`."""

    name, dataset, image_size, channels, num_classes = "mnist", datasets.MNIST, 28, 1, 10
    files = "MNIST/raw/train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz)"

    def __init__(self, root: str = "data", download: bool = True) -> None:
        super().__init__(root, download)
        self.stand_in = False

    def missing(self, transform) -> Dataset:
        self.stand_in = True
        return digits.ShippedDigits(transform)

    def caption(self, index: int, label: int) -> str:
        return digits.digit_caption(label, index)

    def notes(self, image_size: int, channels: int) -> list[str]:
        if not self.stand_in:
            return []
        return ["mnist: the full MNIST training split was not found and could not be downloaded, so this run trains "
                "on the 10,000 MNIST test digits that ship with diffusion_lit (--data.source ShippedDigits). For all "
                f"60,000, put {self.files} in {Path(self.root).resolve()}"]


class CIFAR10(Torchvision):
    """CIFAR-10's 50,000 training images (32x32 RGB, 10 classes, flipped at random by default) in `root`. Captions
    are the class names ("cat", "a cat", "a photo of a cat")."""

    name, dataset = "cifar10", datasets.CIFAR10
    image_size, channels, num_classes, flip = 32, 3, 10, True
    files = "cifar-10-batches-py/ (from cifar-10-python.tar.gz)"

    def caption(self, index: int, label: int) -> str:
        return ("{}", "a {}", "a photo of a {}")[index % 3].format(CIFAR10_CLASSES[label])


class ImageFolder(Source):
    """Every readable image below `root`, labelled by its top-level sub-folder when each image lies in one (else
    unlabelled); native size and channels from the first image (its shorter side; grayscale -> 1). Every file is
    decoded once before training: unreadable ones stop it, or are left out with a warning (`skip_unreadable`).
    Captions come from a `metadata.jsonl` (`file_name`, `text`) or a `.txt` file beside each image (an image without
    one gets the empty prompt, said once)."""

    name = "folder"

    def __init__(self, root: str, skip_unreadable: bool = False) -> None:
        self.root, self.skip_unreadable = root, skip_unreadable
        self.index = FolderIndex.scan(root, skip_unreadable)
        (self.image_size, self.channels), self.num_classes = self.index.native(), len(self.index.classes)
        self.captions: list[str] | None = None

    def images(self, transform, channels: int) -> Dataset:
        return FolderImages(self.index, channels, transform)

    def colour(self, channels: int) -> list:
        return []  # FolderImages converts each image's mode itself

    def read_captions(self) -> None:
        found = read_captions(self.index.root, self.index.files)
        missing = sum(text is None for text in found)
        if missing == len(found):
            raise UserError(
                f"--data.captions true: no captions in {self.index.root}. Give a metadata.jsonl with a "
                '{"file_name": ..., "text": ...} line per image, or a .txt file beside each image'
            )
        if missing:
            say(f"{missing} of {len(found)} images in {self.index.root} have no caption: they train with the empty "
                "prompt")
        self.captions = [text or "" for text in found]

    def caption(self, index: int, label: int) -> str:
        return self.captions[index]

    def notes(self, image_size: int, channels: int) -> list[str]:
        said = self.index.conversions(image_size, channels)
        return [said] if said else []


SOURCES = (ShippedDigits, MNIST, CIFAR10, ImageFolder)


def build(spec) -> Source | None:
    """A source from a config's `{class_path, init_args}` (a class of this module may go by its bare name), or the
    source itself. Call `diffusion_lit.core.trust` first on a class path read from a file."""
    if spec is None or isinstance(spec, Source):
        return spec
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise UserError(f"data.source must name a class (class_path, init_args), got {spec!r}")
    name = spec["class_path"] if "." in spec["class_path"] else f"{__name__}.{spec['class_path']}"
    cls = import_named(name, f"data.source {name}")
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise UserError(f"data.source {name} is not a diffusion_lit.data.sources.Source")
    try:
        return cls(**(spec.get("init_args") or {}))
    except TypeError as err:
        raise UserError(f"data.source {name}: {err}") from None
