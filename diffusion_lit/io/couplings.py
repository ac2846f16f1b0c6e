"""Couplings: (noise, sample) pairs a teacher draws once by its ODE, kept in a folder of chunk files and reused by
every student of that teacher and guidance, so that a student's steps regress on them without running the teacher's
ODE each step. Each chunk is written atomically and draws its noise from its own seed, so a run stopped half-way
(SIGTERM, Ctrl-C) goes on from the first missing chunk, with no pair drawn twice; a folder of another teacher's
pairs is refused."""

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm  # Lightning's own progress-bar library

from diffusion_lit.core.errors import UserError
from diffusion_lit.core.files import write_atomic
from diffusion_lit.core.trust import read_checkpoint

CHUNK = 256  # pairs per file


class Couplings:
    """`count` pairs of the teacher of `fingerprint`, for images of `shape` and (a class teacher) `num_classes`
    labels cycling through the classes, in `folder`.

    Args:
        folder: where the chunk files live (made when missing).
        count: how many pairs (drawn in whole chunks of 256; the first `count` are used).
        fingerprint: the teacher's (weights, guide, guidance, steps): chunks of another are refused.
        shape: one image's (latent's) shape.
        num_classes: a class teacher's classes (0: unconditional).
    """

    def __init__(self, folder: str | Path, count: int, fingerprint: str, shape: tuple, num_classes: int = 0) -> None:
        self.folder, self.count, self.fingerprint = Path(folder), count, fingerprint
        self.shape, self.num_classes = tuple(shape), num_classes
        self.chunks = -(-count // CHUNK)
        self.pairs: tuple[Tensor, Tensor, Tensor | None] | None = None

    def path(self, i: int) -> Path:
        return self.folder / f"chunk_{i:06d}.pt"

    def chunk_inputs(self, i: int) -> tuple[Tensor, Tensor | None]:
        """Chunk i's noise (from seed i) and labels (cycling through the classes)."""
        noise = torch.randn(CHUNK, *self.shape, generator=torch.Generator().manual_seed(i))
        labels = (torch.arange(CHUNK) + i * CHUNK) % self.num_classes if self.num_classes else None
        return noise, labels

    def read(self, i: int) -> dict:
        chunk = read_checkpoint(self.path(i), advice="remove it: it is drawn again")
        if chunk.get("fingerprint") != self.fingerprint:
            raise UserError(f"couplings {self.folder}: they were drawn by another teacher (fingerprint "
                            f"{chunk.get('fingerprint')}, this teacher's {self.fingerprint}): give the teacher another "
                            "couplings_dir, or remove that folder")
        return chunk

    def fill(self, draw: Callable[[Tensor, Tensor | None], Tensor], device: torch.device, trainer=None) -> None:
        """Draws the chunks that are missing with `draw(noise, labels) -> samples` (on `device`), with a progress
        bar, then holds every pair in memory. Under DDP (a `trainer` of several ranks) rank 0 draws, the others wait
        and read."""
        several = trainer is not None and trainer.world_size > 1
        missing = [i for i in range(self.chunks) if not self.path(i).is_file()]
        if several and not trainer.is_global_zero:
            missing = []
        for i in tqdm(missing, desc="teacher couplings", unit="chunk", disable=not missing):
            noise, labels = self.chunk_inputs(i)
            sample = draw(noise.to(device), None if labels is None else labels.to(device)).float().cpu()
            chunk = {"fingerprint": self.fingerprint, "noise": noise, "sample": sample, "labels": labels}
            write_atomic(self.path(i), lambda f: torch.save(chunk, f), "teacher couplings",
                         "free some space or give the teacher another couplings_dir")
        if several:
            trainer.strategy.barrier("teacher couplings")
        chunks = [self.read(i) for i in range(self.chunks)]
        labels = None if not self.num_classes else torch.cat([c["labels"] for c in chunks])[: self.count]
        self.pairs = (torch.cat([c["noise"] for c in chunks])[: self.count],
                      torch.cat([c["sample"] for c in chunks])[: self.count], labels)

    def pick(self, n: int, device: torch.device, generator: torch.Generator | None = None
             ) -> tuple[Tensor, Tensor, Tensor | None]:
        """n pairs drawn at random with `generator` (None: the global one, which a resumed run restores), and their
        labels."""
        rows = torch.randint(self.count, (n,), generator=generator,
                             device=generator.device if generator is not None else "cpu").cpu()
        noise, sample, labels = self.pairs
        return noise[rows].to(device), sample[rows].to(device), None if labels is None else labels[rows].to(device)
