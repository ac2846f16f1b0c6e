"""Checkpoints that survive a kill at any moment, a full disk, SIGTERM, Ctrl-C and a lost DDP rank, how those signals
stop a command (`Stopped`), and the one-writer lock of a run folder."""

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

from diffusion_lit.core.errors import UserError, reason, say
from diffusion_lit.core.files import write_atomic
from diffusion_lit.data.loaders import Unreadable

SIGTERM_EXIT_STATUS = 143  # 128 + SIGTERM, what shells and schedulers expect of a process ended by SIGTERM
SIGINT_EXIT_STATUS = 130  # 128 + SIGINT, for Ctrl-C
LOST_PEER_EXIT_STATUS = 1
# What gloo, NCCL and the TCP store say when the process at the other end of a collective is gone.
PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
             "communicator was aborted", "remote process exited", "socket closed")


class Stopped(BaseException):
    """SIGTERM or Ctrl-C where the command stops at once: before training starts, while sampling or scoring, or on a
    second Ctrl-C. A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way makes another
    error of it. `line` is what the CLI prints (a command that kept its work says where), `images` the images a
    sampling loop had finished."""

    def __init__(self, signum: int, line: str | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.line, self.images = signum, line, None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return SIGINT_EXIT_STATUS if self.signum == signal.SIGINT else SIGTERM_EXIT_STATUS


def stopped_in(err: BaseException) -> Stopped | None:
    """The `Stopped` that cut a write short, when `err` is what became of it: torch's zip writer, left half-way,
    fails on closing with a RuntimeError, which `files.write_atomic` reports as a failed write."""
    while err is not None and not isinstance(err, Stopped):
        err = err.__cause__ or err.__context__
    return err


def _stop(signum, frame) -> None:
    if signal.getsignal(signum) is not _stop:  # another handler took over (and calls this one after its own)
        return
    if Checkpoint.training_began:  # training is over and its own handling ended: the process is ending anyway
        return
    raise Stopped(signum)


def stop_on_signals(whole_process: bool = False) -> dict | None:
    """From here on SIGTERM and Ctrl-C raise `Stopped` wherever the main thread is, until training takes them over
    (`Checkpoint`). Returns what `restore_signals` puts back: the handlers replaced, or, for the process's own entry
    point (`whole_process`), None."""
    Checkpoint.training_began, Checkpoint.lost_line = False, None
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    return None if whole_process else previous


def restore_signals(previous: dict | None) -> None:
    """Puts back the handlers `stop_on_signals` replaced; None: the default actions, for a process that is ending
    (a signal then ends it at once, where Python's own Ctrl-C would print a traceback from its shutdown)."""
    if previous is None and threading.current_thread() is threading.main_thread():
        previous = {signal.SIGINT: signal.SIG_DFL, signal.SIGTERM: signal.SIG_DFL}
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


def lost_peers(trainer, exception: BaseException) -> str | None:
    """Which ranks of a DDP run were lost, as words ("rank 1 (process 123, killed by SIGKILL)"), when `exception`
    is a collective's failure that their end caused; None for any other exception."""
    if trainer.world_size < 2 or not isinstance(exception, RuntimeError):
        return None
    communication = isinstance(exception, torch.distributed.DistError) or any(
        words in str(exception).lower() for words in PEER_GONE)
    if not communication:  # an error of this rank's own (every rank may have it): not another rank's loss
        return None
    procs = getattr(trainer.strategy.launcher, "procs", None) or []  # the ranks this process launched
    deadline = time.monotonic() + 2  # a peer's sockets close a moment before the process is gone
    while procs and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    first = trainer.node_rank * trainer.num_devices + 1
    ended = [f"rank {first + i} (process {p.pid}, " + (f"killed by {signal.Signals(-p.returncode).name})"
             if p.returncode < 0 else f"exit status {p.returncode})")
             for i, p in enumerate(procs) if p.returncode is not None]
    return " and ".join(ended) if ended else "a peer process"


def stop_child_observer() -> None:
    """Lightning's launcher kills this process with SIGKILL within 5 s of a rank's end, which would cut the save of
    what this rank holds short: it is let go once the loss is being handled here."""
    for thread in threading.enumerate():
        if thread.name == "child-process-observer":
            thread._finished = True


def keep_stop_until_training(trainer) -> None:
    """Lightning puts its own SIGTERM handler in after restoring a checkpoint and before the sanity check; under DDP it
    broadcasts from within the handler, which can pair with another rank's collective and hang. `_stop` is put
    back, so that until `Checkpoint.on_train_start` a SIGTERM stops the command at once, as before the restore
    (Lightning's SLURM requeue signal, SIGUSR1, stays as Lightning set it)."""
    connector = trainer._signal_connector
    register = connector.register_signal_handlers

    def register_then_keep_stop() -> None:
        register()
        if threading.current_thread() is threading.main_thread() and not Checkpoint.training_began:
            signal.signal(signal.SIGTERM, _stop)

    connector.register_signal_handlers = register_then_keep_stop


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes last.ckpt when training ends between two periodic saves, or is stopped by
    SIGTERM or SIGINT (Ctrl-C), after finishing its current step.

    Lightning's own writes last.ckpt at the end only if it never saved before, so a run of 7 steps saving every 3
    would end with last.ckpt at step 6 and lose its final step. When a DDP rank is lost, rank zero saves the step
    it reached by itself (`after_lost_peer`).
    """

    stopped_by = "SIGTERM"  # or SIGINT, once Ctrl-C asked the run to stop
    training_began = False  # from here on this class handles SIGTERM and Ctrl-C (`_stop` did before)
    lost_line: str | None = None  # after a lost DDP peer: what the CLI prints ("" on a rank that says nothing)
    _previous_sigint = None
    _parent: int | None = None  # set when training starts: rank zero's process, as a launched rank sees it
    _asked = 0  # the signal that asked this rank to stop (0: none)
    _saved = False  # the stopping step is saved
    _pending = None  # under DDP: the stop requests being reduced across ranks (the work, its tensor)
    _control = None  # under DDP: the CPU process group they travel on

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if signal.getsignal(signal.SIGTERM) is _stop:  # the CLI's: SIGTERM stops at once until training starts
            keep_stop_until_training(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # The train loader's position travels in the data module's state (`DiffusionDataModule.state_dict`). Lightning's
        # own copy is left out: it restores it only sometimes (pytorch-lightning #20550), and litdata's under DDP holds
        # numpy scalars, which a checkpoint read without trusting its pickles (weights_only) refuses.
        checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).pop("combined_loader", None)

    def on_train_start(self, trainer, pl_module) -> None:
        # Ctrl-C stops as SIGTERM does (after the step it is in, saving it), not wherever Python happens to be.
        # Lightning's own SIGTERM handler broadcasts from within the handler, which under DDP pairs with whatever
        # collective another rank is in and hangs the run; this one only takes note (Lightning's comes back at the end).
        Checkpoint.stopped_by, Checkpoint.training_began, Checkpoint.lost_line = "SIGTERM", True, None
        self._parent, self._asked, self._saved = os.getppid(), 0, False  # a launched rank's parent is rank 0
        self._pending = None
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # Stop requests travel on the CPU (gloo), so that agreeing on them never waits for the accelerator.
            self._control = torch.distributed.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, partial(self.interrupt, trainer))
            signal.signal(signal.SIGTERM, partial(self.interrupt, trainer))

    def interrupt(self, trainer, signum, frame) -> None:
        """SIGTERM or Ctrl-C: stop after this step, saving it; Ctrl-C once asked to stop: stop at once, unsaved."""
        asked = self._asked or trainer.received_sigterm
        if self._saved:  # the step is saved and the run is ending
            return
        if asked and signum == signal.SIGINT:
            raise Stopped(signum, f"stopped at once by a second Ctrl-C at step {trainer.global_step}; run the same "
                                  "command with --ckpt_path last to continue from the newest complete checkpoint")
        if asked:
            return
        self._asked, Checkpoint.stopped_by = signum, signal.Signals(signum).name  # the exit status the CLI gives
        if trainer.world_size == 1:  # under DDP the ranks agree first, at the end of the step (on_train_batch_end)
            trainer._signal_connector.received_sigterm = True
        if signum == signal.SIGINT:
            say("Ctrl-C: finishing this step, then saving last.ckpt (Ctrl-C again stops at once, unsaved)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # Every rank stops after the same step when any was asked to (SIGTERM over Ctrl-C), and saves it together.
            # The ranks' requests are reduced while the next step runs and read after it: no wait in the step.
            if self._pending is not None:
                work, signum = self._pending
                work.wait()
                if signum := int(signum.item()):
                    Checkpoint.stopped_by = signal.Signals(signum).name
                    trainer._signal_connector.received_sigterm = True
            signum = torch.tensor([self._asked])
            self._pending = (torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX,
                                                          group=self._control, async_op=True), signum)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, Stopped):  # before training, or a second Ctrl-C: the ranks it launched stop too
            stop_child_observer()
            if trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(exception.signum)
            return
        if (lost := lost_peers(trainer, exception)) is not None:
            Checkpoint.lost_line = self.after_lost_peer(trainer, lost)
            return
        if isinstance(exception, Unreadable) and Checkpoint.training_began and trainer.world_size == 1:
            # A damaged image ends the run: the steps before it are kept (under DDP a save would wait for the others)
            if self._last_global_step_saved != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            exception.saved = (f"{Path(self.dirpath) / 'last.ckpt'} holds step {trainer.global_step}: once the data "
                               "is fixed, run the same command with --ckpt_path last to continue")
            return
        if not isinstance(exception, SIGTERMException):
            return
        stop_child_observer()  # a rank that saved and ended first must not get this one killed
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._saved = True
        if trainer.is_global_zero:
            print(
                f"stopped by {self.stopped_by} at step {trainer.global_step}: saved "
                f"{Path(self.dirpath) / 'last.ckpt'}; run the same command with --ckpt_path last to continue",
                file=sys.stderr,
            )

    def after_lost_peer(self, trainer, lost: str) -> str:
        """Rank zero saves last.ckpt alone (a save's barrier would wait for the lost rank), when the step it
        reached is not saved yet; the line the CLI prints. Other ranks say nothing unless rank zero is the one lost."""
        step, parent = trainer.global_step, self._parent
        if not trainer.is_global_zero:
            if parent is None or os.getppid() == parent or self._asked:  # or it is stopping too
                return ""
            return (f"rank 0 (process {parent}) was lost at step {step}; only it saves checkpoints: run the same "
                    "command with --ckpt_path last to continue from the newest complete one")
        stop_child_observer()
        said = f"{lost} was lost at step {step}"
        try:
            if not Checkpoint.training_began:  # a state still being restored is no state to save
                said += " before training started: nothing new to save"
            elif self._last_global_step_saved == step:
                said += ", which is saved"
            else:
                path = Path(self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST))
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
                self._last_global_step_saved = step
                said += f": saved {path}"
        except Exception as err:  # the state could not be written: the periodic checkpoints are what is left
            newest = newest_checkpoint(Path(self.dirpath))
            if newest is None:
                return f"{said}, and saving it failed ({reason(err)}); no complete checkpoint is left: start the run again"
            said += f", and saving it failed ({reason(err)}); the newest complete checkpoint is {newest}"
        if newest_checkpoint(Path(self.dirpath)) is None:
            return f"{said}; no checkpoint was written yet: start the run again"
        return f"{said}; run the same command with --ckpt_path last to continue"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it (named by process), syncs it to disk, then renames it
    into place.

    A process killed while saving leaves the previous checkpoint intact (a rename within one folder is atomic),
    never a truncated file under the checkpoint's name. A failed write (a full disk: an OSError, or torch's zip writer's
    RuntimeError) removes its temporary file and stops training with one message (`diffusion_lit.core.files`).
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            write_atomic(path, lambda f: torch.save(checkpoint, f), "the checkpoint",
                         "make room, then resume with --ckpt_path last (it takes the newest complete checkpoint)")
        except UserError as err:
            raise stopped_in(err) or err from None


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


def remove_own_temporaries(*folders: Path) -> None:
    """This process's temporary files in folders (`files.write_atomic` names them `.NAME.PID.tmp`): what a write
    that a second signal cut short left behind."""
    for folder in folders:
        for tmp in Path(folder).glob(f".*.{os.getpid()}.tmp"):
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
