"""Checkpoints that survive a kill at any moment, a full disk and SIGTERM, and the one-writer lock of a run folder."""

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion_lit.errors import UserError, reason
from diffusion_lit.files import write_atomic

SIGTERM_EXIT_STATUS = 143  # 128 + SIGTERM, what shells and schedulers expect of a process ended by SIGTERM
SIGINT_EXIT_STATUS = 130  # 128 + SIGINT, for Ctrl-C


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes last.ckpt when training ends between two periodic saves, or is stopped by
    SIGTERM or SIGINT (Ctrl-C), after finishing its current step.

    Lightning's own writes last.ckpt at the end only if it never saved before, so a run of 7 steps saving every 3
    would end with last.ckpt at step 6 and lose its final step.
    """

    stopped_by = "SIGTERM"  # or SIGINT, once Ctrl-C asked the run to stop
    _previous_sigint = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Ctrl-C stops as SIGTERM does (after the step it is in, saving it), not wherever Python happens to be
        Checkpoint.stopped_by = "SIGTERM"
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, partial(self.interrupt, trainer._signal_connector))

    def interrupt(self, connector, signum, frame) -> None:
        if connector.received_sigterm:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        connector.received_sigterm = True
        Checkpoint.stopped_by = "SIGINT"  # for the exit status the CLI gives
        print("Ctrl-C: finishing this step, then saving last.ckpt (Ctrl-C again stops at once, unsaved)",
              file=sys.stderr)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if trainer.is_global_zero:
            print(
                f"stopped by {self.stopped_by} at step {trainer.global_step}: saved "
                f"{Path(self.dirpath) / 'last.ckpt'}; run the same command with --ckpt_path last to continue",
                file=sys.stderr,
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it (named by process), syncs it to disk, then renames it
    into place.

    A process killed while saving leaves the previous checkpoint intact (a rename within one folder is atomic),
    never a truncated file under the checkpoint's name. A failed write (a full disk: an OSError, or torch's zip writer's
    RuntimeError) removes its temporary file and stops training with one message (`diffusion_lit.files`).
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomic(path, lambda f: torch.save(checkpoint, f), "the checkpoint",
                     "make room, then resume with --ckpt_path last (it takes the newest complete checkpoint)")


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The readable checkpoint of the highest step in a folder (last.ckpt on a tie), or None."""
    best, best_key = None, None
    for path in ckpt_dir.glob("*.ckpt"):
        try:
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        except Exception:  # truncated or foreign: not a candidate
            continue
        key = (step, path.name == "last.ckpt")
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def remove_stale_temporaries(ckpt_dir: Path) -> None:
    """Temporary files of saves that never finished (a killed process); call only while holding the run's lock."""
    for tmp in ckpt_dir.glob(".*.ckpt.*tmp"):
        tmp.unlink(missing_ok=True)


@contextmanager
def run_lock(log_dir: Path) -> Iterator[None]:
    """Holds `<run>.lock` beside the run folder while the block runs (the operating system also lets go of it when
    the process ends, however it ends), or stops at once when another process holds it. Only rank zero locks."""
    if rank_zero_only.rank != 0 or int(os.environ.get("NODE_RANK", 0)) != 0:
        yield
        return
    lock_path = log_dir.with_name(f"{log_dir.name}.lock")
    lock = FileLock(lock_path, timeout=0)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        holder = ""
        for _ in range(40):  # the holder writes its process id just after taking the lock: wait up to 2 s for it
            try:
                holder = f" (process {int(lock_path.read_text())})"
                break
            except (OSError, ValueError):
                time.sleep(0.05)
        raise UserError(
            f"{log_dir} is in use by another fit{holder}: one run folder takes one writer. Wait for it to end, or "
            "train under another name with --trainer.logger.init_args.name NAME"
        ) from None
    except OSError as err:
        raise UserError(
            f"cannot create the run folder {log_dir} ({reason(err)}): give a writable place with "
            "--trainer.logger.init_args.save_dir DIR"
        ) from None
    try:
        lock_path.write_text(str(os.getpid()))  # filelock opens without truncating, so a contender cannot erase this
        yield
    finally:
        lock.release()
