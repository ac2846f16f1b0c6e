"""Checkpoints that survive a kill at any moment, and that always include the last step."""

import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes last.ckpt when training ends between two periodic saves.

    Lightning's own writes last.ckpt at the end only if it never saved before, so a run of 7 steps saving every 3
    would end with last.ckpt at step 6 and lose its final step.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, syncs it to disk, then renames it into place.

    A process killed while saving leaves the previous checkpoint intact (a rename within one folder is atomic),
    never a truncated file under the checkpoint's name.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
