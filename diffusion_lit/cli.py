"""The command line: `python -m diffusion_lit fit --config configs/mnist.yaml` (LightningCLI)."""

import os
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import auto_cli
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from diffusion_lit.checkpointing import Checkpoint
from diffusion_lit.commands import evaluate, sample
from diffusion_lit.data import DiffusionDataModule
from diffusion_lit.errors import UserError
from diffusion_lit.module import DiffusionModule

# Runs live in runs/<name>/ (no version_N folders), checkpoints in runs/<name>/checkpoints/,
# so `--ckpt_path last` finds the run's latest checkpoint and TensorBoard curves continue in place.
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default", "version": ""},
    },
    "plugins": [{"class_path": "diffusion_lit.checkpointing.AtomicCheckpointIO"}],  # a kill never corrupts one
}
# last.ckpt plus one checkpoint every N steps, all kept; configurable as --checkpoint.every_n_train_steps N.
CHECKPOINT_DEFAULTS = {
    "checkpoint.filename": "step{step:08d}",
    "checkpoint.auto_insert_metric_name": False,
    "checkpoint.every_n_train_steps": 5000,
    "checkpoint.save_top_k": -1,
    "checkpoint.save_last": True,
    "checkpoint.enable_version_counter": False,
}


class DiffusionCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--fresh_run", type=bool, default=False,
            help="Start a new run where an earlier one left checkpoints; the earlier run's folder is kept, renamed.",
        )
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of a --ckpt_path file here, before any hook: check the file first.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint(Path(ckpt_path))
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        """Refuse to resume from nothing, and to start a fresh run on top of an earlier run's checkpoints."""
        ckpt_path = self.config.fit.ckpt_path
        ckpt_dir = Path(self.trainer.checkpoint_callback.dirpath or Path(self.trainer.log_dir) / "checkpoints")
        found = sorted(ckpt_dir.glob("*.ckpt"))
        if ckpt_path is None and found:
            if not self.config.fit.fresh_run:
                raise UserError(
                    f"{ckpt_dir} already holds checkpoints of an earlier run ({found[-1].name}, ...). "
                    "Resume it with --ckpt_path last, start a new run under another name with "
                    "--trainer.logger.init_args.name NAME, or pass --fresh_run true to set the earlier run aside"
                )
            self.set_aside(ckpt_dir)
        if ckpt_path == "last" and not any(p.name.startswith("last") for p in found):
            raise UserError(
                f"--ckpt_path last: no last.ckpt in {ckpt_dir}, so there is nothing to resume. "
                "Check the run's name (--trainer.logger.init_args.name), give a checkpoint file with --ckpt_path, "
                "or leave --ckpt_path out to start a new run"
            )
        if ckpt_path not in (None, "last", "best", "hpc", "registry") and not Path(ckpt_path).is_file():
            raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        if ckpt_path == "last":
            check_checkpoint(ckpt_dir / "last.ckpt")


    def set_aside(self, ckpt_dir: Path) -> None:
        """Renames the earlier run's folder (or its checkpoint folder, when that lies elsewhere) to NAME.1, NAME.2, ..."""
        log_dir = Path(self.trainer.log_dir)
        old = log_dir if log_dir in ckpt_dir.parents else ckpt_dir
        number = 1
        while old.with_name(f"{old.name}.{number}").exists():
            number += 1
        kept = old.rename(old.with_name(f"{old.name}.{number}"))
        print(f"--fresh_run: the earlier run is kept in {kept}", file=sys.stderr)


def check_checkpoint(path: Path) -> None:
    """Opens a checkpoint without reading its tensors (memory-mapped), so a truncated or foreign file is a UserError."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        reason = str(err).split(". ")[0]
        raise UserError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {reason}). "
            "Resume from another file in its folder (--ckpt_path FILE) or start a new run"
        ) from None
    if "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise UserError(f"{path} is not a training checkpoint of diffusion_lit (no state_dict or global_step)")


COMMANDS = {"sample": sample, "evaluate": evaluate}  # beside LightningCLI's fit, validate, ...


def main(args: list[str] | None = None) -> None:
    """Entry point; a user's mistake ends with one message and exit status 2 (DIFFUSION_LIT_DEBUG=1 shows the traceback)."""
    words = sys.argv[1:] if args is None else args
    # ResumableSampler restarts an epoch where the checkpoint left it, which Lightning cannot see.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    try:
        if words and words[0] in COMMANDS:
            auto_cli(COMMANDS[words[0]], args=words[1:], as_positional=False)
            return
        DiffusionCLI(
            DiffusionModule,
            DiffusionDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except (UserError, MisconfigurationException) as err:  # Lightning's: a bad Trainer setting
        if os.environ.get("DIFFUSION_LIT_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
