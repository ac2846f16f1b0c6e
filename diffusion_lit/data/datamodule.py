"""One DataModule for any source of images (`diffusion_lit.data.sources`: the shipped digits, MNIST, CIFAR-10, a folder;
`hf_data`: a Hugging Face dataset; `streaming`: litdata's chunks), all scaled to [-1, 1], split, batched, and
resumable mid-epoch: the train loader's position travels in the checkpoint."""

import weakref
from collections.abc import Callable

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm.auto import tqdm  # Lightning's own progress-bar library

from diffusion_lit.data import hf_data, streaming  # noqa: F401  (their sources, by name in a config)
from diffusion_lit.core.errors import UserError, say
from diffusion_lit.core.moved import upgrade_paths
from diffusion_lit.data.loaders import leave_signals_to_main, plain
from diffusion_lit.data.old_data import upgrade
from diffusion_lit.data.sources import MNIST, Source, build


class CachedSet(Dataset):
    """Precomputed tensors (encoded images) with their labels or captions."""

    def __init__(self, tensors: Tensor, others: list) -> None:
        self.tensors, self.others = tensors, others

    def __len__(self) -> int:
        return len(self.others)

    def __getitem__(self, i: int):
        return self.tensors[i], self.others[i]


class DiffusionDataModule(LightningDataModule):
    """Images in [-1, 1] with their labels, split into train and validation sets.

    Args:
        source: where the images come from (`diffusion_lit.data.sources`): ``ShippedDigits`` (the 10,000 MNIST test
            digits shipped with the package), ``MNIST(root, download)`` (falls back to the shipped digits, saying
            so), ``CIFAR10(root, download)`` or ``ImageFolder(root, skip_unreadable)`` (class sub-folders
            optional); by default ``MNIST()``.
        image_size: resize (and center-crop) to this size; by default the source's own (a folder's first image).
        channels: 1 or 3; by default the source's own (a folder's first image: grayscale -> 1).
        batch_size: images per batch on each device.
        num_workers: data-loading worker processes.
        random_flip: random horizontal flips for training; by default on for CIFAR10 and off otherwise.
        val_fraction: share of the images held out for validation.
        seed: seed of the train/validation split and of the shuffling.
        captions: serve a caption with each image instead of its label, for text-conditioned models. A folder's come
            from a `metadata.jsonl` (`file_name`, `text`) or a `.txt` file beside each image (an image without one
            gets the empty prompt, said once); the digits' are made from their labels in several phrasings ("7",
            "seven", "the digit 7", "a handwritten seven", ...); CIFAR10's from the class names.
    """

    def __init__(
        self,
        source: Source | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        batch_size: int = 128,
        num_workers: int = 2,
        random_flip: bool | None = None,
        val_fraction: float = 0.05,
        seed: int = 0,
        captions: bool = False,
    ) -> None:
        super().__init__()
        if source is not None and not isinstance(source, Source):
            raise UserError(f"source must be one of diffusion_lit.data.sources (ShippedDigits(), MNIST(root), "
                            f"CIFAR10(root), ImageFolder(root)), got {source!r}")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if num_workers < 0:
            raise UserError(f"num_workers must be 0 (load in the main process) or more, got {num_workers}")
        if channels not in (None, 1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels}")
        # Not logged: the model logs the resolved image_size and channels, and the two sets must not disagree.
        self.save_hyperparameters(ignore="source", logger=False)
        self.source = source if source is not None else MNIST()
        self.hparams["source"] = self.source.config()  # as a config names it: what a checkpoint stores
        self.num_classes = self.source.num_classes
        self.image_size = image_size or self.source.image_size
        self.channels = channels or self.source.channels
        self.random_flip = self.source.flip if random_flip is None else random_flip
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.reference_set: Dataset | None = None
        self.train_loader: weakref.ref | None = None  # the train loader while it lives
        self.loader_state: dict | None = None  # from a checkpoint, for the next train loader
        self.captions = captions
        if captions:
            self.source.read_captions()

    def example_prompts(self, count: int) -> list[str]:
        """Up to `count` distinct captions among the first 1,000 training images (for sample grids)."""
        prompts = []
        for i in range(min(len(self.reference_set), 1000) if self.captions else 0):
            if (text := self.reference_set[i][1]) not in prompts:
                prompts.append(text)
            if len(prompts) == count:
                break
        return prompts or [""]

    def transform(self, train: bool) -> Callable:
        """PIL image -> tensor in [-1, 1] at image_size and channels, with random flips for training if asked."""
        steps = [transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size)]
        steps += self.source.colour(self.channels)
        if train and self.random_flip:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize(0.5, 0.5)]  # [0, 1] -> [-1, 1]
        return transforms.Compose(steps)

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set, self.val_set, self.reference_set = self.source.datasets(
            self.transform, self.channels, self.captions, self.hparams.val_fraction, self.hparams.seed)
        for line in self.source.notes(self.image_size, self.channels):
            say(line)
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
                                worker_init_fn=leave_signals_to_main, generator=torch.Generator().manual_seed(0))
            encoded, others = [], []
            for images, y in tqdm(loader, f"encoding the {name.split('_')[0]} images once", leave=False):
                encoded.append(encode(images).cpu())
                others.extend(y)
            setattr(self, name, CachedSet(torch.cat(encoded) if encoded else torch.empty(0), others))

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        trainer = self.trainer
        return self.source.loader(dataset, self.hparams.batch_size, shuffle, self.hparams.seed,
                                  self.hparams.num_workers, trainer.world_size if trainer else 1,
                                  trainer.global_rank if trainer else 0)

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_set, shuffle=True)
        state, self.loader_state = self.loader_state, None
        if self.trainer is not None:  # this module's copy of the position is the one restored (`state_dict`)
            self.trainer.fit_loop._combined_loader_states_to_load = []
        workers, saved_workers = self.hparams.num_workers, state and state["workers"]
        other_workers = (f"the checkpoint was saved with --data.num_workers {saved_workers} and this run has {workers}: "
                         "{what} (resume with " f"{saved_workers} to go on exactly)")
        if state is not None and (why := self.other_data(state, loader)):
            say(f"the checkpoint's loader position belongs to other data ({why}): its epoch starts again from its "
                "first batch (resume on the data and batch size it was saved with to go on exactly)")
        elif state is not None and saved_workers != workers and not self.source.elastic:
            say(other_workers.format(what="its epoch starts again from its first batch"))
        elif state is not None:  # a resumed run goes on where the checkpoint's epoch stopped
            if saved_workers != workers:  # litdata deals the rest of the epoch to the new workers
                say(other_workers.format(what="the stream goes on from its position, but a stream's order depends on "
                                              "its workers, so its batches differ from an uninterrupted run's"))
            if "epoch" in state:  # before the position: the skipped indices are that epoch's
                loader.sampler.resume(state["epoch"])
            loader.load_state_dict(state["position"])
        elif self.trainer is not None and self.trainer.global_step and len(loader) and (
                self.trainer.global_step * self.trainer.accumulate_grad_batches % len(loader)):
            say("this checkpoint predates saved loader positions: its epoch starts again from its first batch")
        # Not held here: a data module collected with its loader as garbage (outside a Trainer) would stop the loader's
        # workers in an order that makes each wait 5 s (torch's shutdown timeout) before it ends.
        self.train_loader = weakref.ref(loader)
        return loader

    def data_key(self) -> dict:
        """What a saved loader position belongs to: the source as configured (less its settings that leave the images
        as they are), the training images' count, the batch size, and the seed and held-out share that split and
        shuffle them."""
        source = plain(self.source.config())
        source["init_args"] = {k: v for k, v in source["init_args"].items() if k not in self.source.not_data}
        return {"source": source, "images": len(self.train_set), "batch_size": self.hparams.batch_size,
                "seed": self.hparams.seed, "val_fraction": self.hparams.val_fraction}

    def other_data(self, state: dict, loader: DataLoader) -> str:
        """Why a checkpoint's loader position belongs to other data than this run's ("" when it does not)."""
        key, saved = self.data_key(), state.get("data")  # positions saved before this key was added carry none
        if saved is not None and saved["source"]["class_path"] != key["source"]["class_path"]:
            return f"--data.source {saved['source']['class_path']} -> {key['source']['class_path']}"
        map_style = hasattr(getattr(loader, "sampler", None), "resume")
        if ("epoch" in state) != map_style:  # only a map-style source's position has its epoch
            return "saved from a stream, resumed on a map-style source" if map_style else \
                "saved from a map-style source, resumed on a stream"
        if saved is None:
            return ""
        old, new = saved["source"], key["source"]
        changed = [f"--data.source.{name} {old['init_args'].get(name)} -> {new['init_args'].get(name)}"
                   for name in {**old["init_args"], **new["init_args"]}
                   if old["init_args"].get(name) != new["init_args"].get(name) and name not in self.source.not_data]
        changed += [f"--data.{name} {saved[name]} -> {key[name]}" for name in ("batch_size", "seed", "val_fraction")
                    if name in saved and saved[name] != key[name]]
        if not changed and saved["images"] != key["images"]:
            changed.append(f"{saved['images']} training images -> {key['images']}")
        return ", ".join(changed)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if len(self.val_set) else []

    def state_dict(self) -> dict:
        """The train loader's position in its epoch, saved in every checkpoint by Lightning. Kept here, not left to
        Lightning's loop, which drops it when `configure_optimizers` reads `estimated_stepping_batches`
        (pytorch-lightning #20550)."""
        loader = self.train_loader() if self.train_loader is not None else None
        if loader is None:
            return {}
        sampler = getattr(loader, "sampler", None)
        epoch = {"epoch": sampler.epoch} if hasattr(sampler, "set_epoch") else {}  # litdata's loader keeps its own
        return {"train_loader": {"position": plain(loader.state_dict()), "workers": self.hparams.num_workers,
                                 "data": self.data_key(), **epoch}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.loader_state = upgrade_paths(state_dict.get("train_loader"))  # a source saved by its old class path


def from_config(config: dict) -> DiffusionDataModule:
    """A DiffusionDataModule from a config's `data` section or a checkpoint's data hyperparameters (keys starting with
    `_` left out): older versions' `dataset` and `root` read as their source, the source built from its class_path.
    Check a checkpoint's with `diffusion_lit.core.trust.check_data_hparams` first."""
    config = upgrade({k: v for k, v in config.items() if not k.startswith("_")})
    return DiffusionDataModule(**{**config, "source": build(config.get("source"))})
