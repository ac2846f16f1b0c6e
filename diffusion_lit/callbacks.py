"""Callbacks: side effects of training (checkpoints, and later sample grids and FID) live here."""

from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes last.ckpt when training ends between two periodic saves.

    Lightning's own writes last.ckpt at the end only if it never saved before, so a run of 7 steps saving every 3
    would end with last.ckpt at step 6 and lose its final step.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
