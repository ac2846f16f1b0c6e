"""Batches from a dataset that can stop mid-epoch and go on: torchdata's `StatefulDataLoader` over a map-style dataset,
with the train / validation split that a source's images get by default."""

import os
import signal
import threading
import warnings
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, DistributedSampler, Subset

from diffusion_lit.core.errors import UserError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torchdata's import-time notices say nothing a user can act on
    from torchdata.stateful_dataloader import StatefulDataLoader

# torchdata calls a torch function that torch has deprecated, once per loader.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def leave_signals_to_main(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C, and SIGTERM unless their own main process sends it: `timeout`, SLURM and
    `kill -- -PGID` signal every process of the job, and the main process decides (it finishes its step and saves,
    `Checkpoint`), then shuts the workers down itself. A worker that died of the signal instead would stop the main
    process with a traceback; one that ignored its main process's SIGTERM too would never end when Python exits
    with the loader alive (multiprocessing terminates its workers with SIGTERM, then waits for them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: who sent a signal cannot be told
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    main = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # held for the thread below (threads inherit it)

    def obey_main() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main:
            pass
        os._exit(0)  # a quiet end: the main process is shutting its workers down

    threading.Thread(target=obey_main, daemon=True, name="sigterm-from-main").start()


class Unreadable(UserError):
    """An image met while training that cannot be decoded (a damaged chunk or row). torch re-raises a DataLoader
    worker's as a new one whose text carries the worker's traceback: its str() is the original line, and what the
    `Checkpoint` callback saved before the run ended (`saved`)."""

    saved = ""

    def __init__(self, message: str, what: str = "", why: str = "") -> None:
        super().__init__(message)
        self.what, self.why = what, why  # the image named, and the decoder's one line

    def __str__(self) -> str:
        text = super().__str__()
        if "Original Traceback" in text:  # "...\ndiffusion_lit.data.loaders.Unreadable: <the line>"
            text = text.strip().splitlines()[-1].split(": ", 1)[-1]
        return f"{text}; {self.saved}" if self.saved else text


def plain(state):
    """A loader's state in the types a checkpoint loads without trusting its pickles (`weights_only`): numpy's
    scalars and arrays (litdata's state holds some under DDP) as Python numbers and lists."""
    if isinstance(state, dict):
        return {key: plain(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(plain(value) for value in state)
    return state.tolist() if hasattr(state, "tolist") and not isinstance(state, torch.Tensor) else state


class Splits(NamedTuple):
    """What a source serves: the training images, the held-out validation images, and the training images without
    augmentation (FID's reference)."""

    train: Dataset
    val: Dataset
    reference: Dataset


def random_split(train_full: Dataset, eval_full: Dataset, val_fraction: float, seed: int) -> Splits:
    """A seeded split of one set of images, seen through the train transform (`train_full`) and the eval one."""
    n = len(train_full)
    n_val = int(round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Splits(Subset(train_full, order[n_val:]), Subset(eval_full, order[:n_val]), Subset(eval_full, order[n_val:]))


class EpochSampler(DistributedSampler):
    """DistributedSampler whose epochs count on from a resumed checkpoint's (`resume`). Lightning counts an epoch that
    `max_steps` cut short as done, so after a run stopped that way its count runs one ahead of the epochs the data
    went through; the first epoch Lightning sets after a resume fixes the difference for the rest of the run."""

    shift = 0  # the data's epoch less Lightning's
    resumed: int | None = None  # the epoch a resume restarted in, until Lightning next sets one

    def resume(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.resumed = epoch

    def set_epoch(self, epoch: int) -> None:
        if self.resumed is not None:
            self.shift, self.resumed = self.resumed - epoch, None
        super().set_epoch(epoch + self.shift)


def map_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int, world_size: int,
               rank: int) -> StatefulDataLoader:
    """Batches of a map-style dataset, shuffled by seed and epoch (Lightning sets the epoch), each DDP rank its own
    share; `state_dict()` is the position in the epoch, which `load_state_dict` goes on from (the sampler's indices
    are skipped, no image is read twice)."""
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=shuffle)
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=leave_signals_to_main,
        pin_memory=torch.cuda.is_available(),
        # The loader's own generator keeps data loading off the global random stream that training draws from.
        generator=torch.Generator().manual_seed(seed),
    )
