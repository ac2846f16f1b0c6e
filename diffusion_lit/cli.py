"""The command line: `python -m diffusion_lit fit --config configs/mnist.yaml` (LightningCLI). A config names the
LightningModule it trains under `model.class_path` (LightningCLI's subclass mode), as
`configs/digits_autoencoder.yaml` names latent diffusion's autoencoder; without one it is a `DiffusionModule`.
`python -m diffusion_lit autoencoder fit ...` is a synonym that trains the autoencoder."""

import os
import sys
import warnings
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, auto_cli
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar as ProgressBarBase
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion_lit.model.autoencoder import AutoencoderModule
from diffusion_lit.training.callbacks import ProgressBar
from diffusion_lit.nets.dit import DiT  # noqa: F401  (configs name these two by their short names too)
from diffusion_lit.training.init_from import InitFrom  # noqa: F401
from diffusion_lit.training.checkpointing import (
    LOST_PEER_EXIT_STATUS,
    SIGINT_EXIT_STATUS,
    SIGTERM_EXIT_STATUS,
    Checkpoint,
    Stopped,
    run_lock,
    newest_checkpoint,
    remove_stale_temporaries,
    restore_signals,
    stop_on_signals,
)
from diffusion_lit.commands.sample import sample
from diffusion_lit.commands.evaluate import evaluate
from diffusion_lit.commands.ema import ema
from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.config_errors import part_mistake
from diffusion_lit.core.moved import moved
from diffusion_lit.core.errors import UserError, say
from diffusion_lit.commands.export import export
from diffusion_lit.model.old_model import refuse_flat_sampler_settings, refuse_old_model_spelling, upgrade_hparams
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.data.old_data import refuse_old_configs, upgrade_words
from diffusion_lit.training.speed import CpuCost
from diffusion_lit.commands.optimize import optimize
from diffusion_lit.model.stable_diffusion import StableDiffusionModule
from diffusion_lit.core.trust import check_hparams, class_paths, parse_trusted, read_checkpoint

# Runs live in runs/<name>/ (no version_N folders), checkpoints in runs/<name>/checkpoints/,
# so `--ckpt_path last` finds the run's latest checkpoint and TensorBoard curves continue in place.
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default", "version": ""},
    },
    "plugins": [{"class_path": "diffusion_lit.training.checkpointing.AtomicCheckpointIO"}],  # a kill never corrupts one
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


class QuietUsage:
    """Parser errors print the error line (and a tip to run --help), not the whole usage above it; a part's class
    path that names nothing, fails to import or is given an argument it does not take is said in one line."""

    def print_usage(self, file=None) -> None:
        pass

    def error(self, message: str, ex: Exception | None = None):
        if not os.environ.get("DIFFUSION_LIT_DEBUG"):  # the debugger of a part wants jsonargparse's whole report
            # the type of each option (jsonargparse keeps it on the action, with no public name for it)
            typehints = {action.dest: getattr(action, "_typehint", None) for action in self._actions}
            # jsonargparse's report of a plain value spans lines (what each type of a union expected): one line
            message = part_mistake(message, typehints) or " ".join(line.strip() for line in message.splitlines()
                                                                    if line.strip())
        super().error(message, ex)


class Parser(QuietUsage, LightningArgumentParser):
    pass


class CommandParser(QuietUsage, ArgumentParser):
    pass


class DiffusionCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--fresh_run", type=bool, default=False,
            help="Start a new run where an earlier one left checkpoints; the earlier run's folder is kept, renamed.",
        )
        parser.add_argument(
            "--trust_class", type=str | None, default=None,
            help="Your own network or optimizer classes that a --ckpt_path file may name (import paths, separated by "
            "commas); the classes your config names are trusted too.",
        )
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        model = "model.init_args" if self.subclass_mode_model else "model"
        parser.link_arguments("data.image_size", f"{model}.image_size", apply_on="instantiate")
        parser.link_arguments("data.channels", f"{model}.channels", apply_on="instantiate")
        if issubclass(self.model_class, DiffusionModule):
            parser.link_arguments("data.num_classes", f"{model}.num_classes", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Lightning's trainer, with our epoch-count fix of its rich progress bar where that bar would be its default,
        and `CpuCost` (one line when a CPU run would take hours, or asks for bf16 the CPU lacks)."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        wants_default_bar = config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBarBase) for c in (callbacks if isinstance(callbacks, list) else [callbacks]))
        bar = [ProgressBar()] if _RICH_AVAILABLE and wants_default_bar else []
        kwargs["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), *bar, CpuCost()]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """The model's hyperparameters from the checkpoint being resumed, over the config's (as LightningCLI does),
        after the trust check and the upgrade of an older checkpoint's; an autoencoder the config points at stays
        (one that moved: its weights are checked against the fingerprint)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        checkpoint = check_checkpoint(Path(ckpt_path), self.trusted(self.config[subcommand]))
        if subcommand == "fit" and isinstance(rebuilt := checkpoint.get("ema_rebuilt"), dict):
            raise UserError(f"{ckpt_path} holds an EMA rebuilt after training (by `ema`), which training would go on "
                            f"averaging as if it were the run's own: resume from the run's checkpoint "
                            f"({rebuilt.get('from')})")
        model = self.config[subcommand].get("model")
        latent = model.get("latent") if model is not None and not self.subclass_mode_model else None
        hparams = checkpoint.get("hyper_parameters") or {}
        hparams = {k: v for k, v in upgrade_hparams(hparams).items() if k != "_instantiator"}
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        elif latent is not None and isinstance(hparams.get("latent"), dict):
            hparams["latent"]["init_args"]["autoencoder"] = latent.init_args.autoencoder
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    @staticmethod
    def trusted(config) -> list[str]:
        """The classes a checkpoint may name beyond our own: --trust_class, and those the user's config names."""
        return [*parse_trusted(config.get("trust_class")), *(name for _, name in class_paths(config.model.as_dict()))]

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand != "fit":
            return super()._run_subcommand(subcommand)
        with run_lock(Path(self.trainer.log_dir)):  # from the checks in before_fit to the end of training
            super()._run_subcommand(subcommand)

    def before_fit(self) -> None:
        """Refuse to resume from nothing and to start a fresh run on top of an earlier run's
        checkpoints, and resume `last` from the newest complete checkpoint."""
        ckpt_path = self.config.fit.ckpt_path
        if ckpt_path is not None and self.config.fit.fresh_run:
            raise UserError("--fresh_run true starts a new run and --ckpt_path resumes one: give one of the two")
        ckpt_dir = Path(self.trainer.checkpoint_callback.dirpath or Path(self.trainer.log_dir) / "checkpoints")
        remove_stale_temporaries(ckpt_dir)
        found = sorted(ckpt_dir.glob("*.ckpt"))
        if ckpt_path is None and found and not requeued_on_slurm(self.trainer):
            if not self.config.fit.fresh_run:
                raise UserError(
                    f"{ckpt_dir} already holds checkpoints of an earlier run ({found[-1].name}, ...). "
                    "Resume it with --ckpt_path last, start a new run under another name with "
                    "--trainer.logger.init_args.name NAME, or pass --fresh_run true to set the earlier run aside"
                )
            self.set_aside(ckpt_dir)
        if ckpt_path == "last":
            newest = newest_checkpoint(ckpt_dir)
            if newest is None:
                raise UserError(
                    f"--ckpt_path last: no complete checkpoint in {ckpt_dir}, so there is nothing to resume. "
                    "Check the run's name (--trainer.logger.init_args.name), give a checkpoint file with --ckpt_path, "
                    "or leave --ckpt_path out to start a new run"
                )
            check_checkpoint(newest, self.trusted(self.config.fit))
            self.config_init.fit.ckpt_path = str(newest)  # what trainer.fit is given
        elif ckpt_path not in (None, "best", "hpc", "registry") and not Path(ckpt_path).is_file():
            what = "a folder, not a checkpoint file" if Path(ckpt_path).is_dir() else "no such checkpoint file"
            raise UserError(f"--ckpt_path {ckpt_path}: {what}")
        if self.config_init.fit.ckpt_path and Path(self.config_init.fit.ckpt_path).is_file():
            check_steps_left(Path(self.config_init.fit.ckpt_path), self.trainer.max_steps)

    def set_aside(self, ckpt_dir: Path) -> None:
        """Renames the earlier run's folder (or its checkpoint folder, when that lies elsewhere) to NAME.1, NAME.2,
        ..."""
        log_dir = Path(self.trainer.log_dir)
        old = log_dir if log_dir in ckpt_dir.parents else ckpt_dir
        number = 1
        while old.with_name(f"{old.name}.{number}").exists():
            number += 1
        kept = old.rename(old.with_name(f"{old.name}.{number}"))
        print(f"--fresh_run: the earlier run is kept in {kept}", file=sys.stderr)


def requeued_on_slurm(trainer) -> bool:
    """A SLURM job that Lightning requeued (on SIGUSR1 before its time limit): Lightning resumes it from its hpc
    checkpoint by itself, so its checkpoints are not an earlier run's."""
    return SLURMEnvironment.detect() and any(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))


def check_checkpoint(path: Path, trusted: list[str]) -> dict:
    """The checkpoint, opened without reading its tensors (memory-mapped): a truncated or foreign file, or one that
    names classes that are not trusted (`diffusion_lit.core.trust`), is a UserError."""
    checkpoint = read_checkpoint(path, mmap=True, advice="resume from another file in its folder (--ckpt_path FILE) "
                                 "or start a new run")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise UserError(f"{path} is not a training checkpoint of diffusion_lit (no state_dict or global_step)")
    check_hparams(checkpoint.get("hyper_parameters") or {}, trusted, str(path))
    return checkpoint


def check_steps_left(path: Path, max_steps: int) -> None:
    """A UserError for resuming a run that has reached max_steps already: Lightning would stop at once and exit 0."""
    step = read_checkpoint(path, mmap=True).get("global_step")
    if isinstance(step, int) and max_steps == step:  # a finished run started again (a requeue): nothing to do
        say(f"--ckpt_path {path}: the run reached --trainer.max_steps {max_steps} already; nothing to train (a larger "
            "--trainer.max_steps continues it)")
    elif isinstance(step, int) and 0 <= max_steps < step:
        raise UserError(f"--ckpt_path {path}: the run is at step {step} already, and --trainer.max_steps {max_steps} "
                        f"ends it there, so nothing would be trained; to continue it, give a larger "
                        f"--trainer.max_steps (the steps to reach in all, above {step})")


# Beside LightningCLI's fit, validate, ...; `data optimize` writes a source as litdata chunks.
COMMANDS = {"sample": sample, "evaluate": evaluate, "export": export, "ema": ema, "data": {"optimize": optimize}}
MODULE_CLASSES = {"diffusion_lit.model.module.DiffusionModule": DiffusionModule,
                  "diffusion_lit.model.autoencoder.AutoencoderModule": AutoencoderModule,
                  "diffusion_lit.model.stable_diffusion.StableDiffusionModule": StableDiffusionModule}


def config_files(words: list[str]) -> list[Path]:
    """The files given with --config FILE or --config=FILE, in order."""
    files = [after for before, after in zip(words, words[1:]) if before in ("--config", "-c")]
    files += [word.split("=", 1)[1] for word in words if word.startswith(("--config=", "-c="))]
    return [Path(f) for f in files]


def read_configs(files: list[Path]) -> list[tuple[str, dict]]:
    """(file, its contents) of the config files that read as a mapping (LightningCLI says what is wrong with the
    others)."""
    configs = []
    for path in files:
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(config, dict):
            configs.append((str(path), config))
    return configs


def refuse_moved_paths(words: list[str], configs: list[tuple[str, dict]]) -> None:
    """One line naming every class path from before the package's subpackages, in the config files (nested ones and
    an old run's own config.yaml included) and on the command line, each with its new path (`core.moved`)."""

    def strings(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    found = {}
    for where, values in [*((path, strings(config)) for path, config in configs), ("the command line", words)]:
        for value in values:
            for word in value.split("="):  # --trainer.callbacks+=diffusion_lit.callbacks.SampleGrid
                if (new := moved(word)) and word not in found:
                    found[word] = (new, where)
    if found:
        places = sorted({where for _, where in found.values()})
        raise UserError(f"class paths from before diffusion_lit's subpackages in {' and '.join(places)}: "
                        + ", ".join(f"{old} -> {new}" for old, (new, _) in found.items())
                        + ": write the new ones")


def named_module(words: list[str]) -> tuple[str, type, bool] | None:
    """(config, the LightningModule class it trains, whether it names it under model.class_path) from the last
    --config file whose model says: a class_path (LightningCLI's subclass mode, for that class), or, in a flat model
    section, the autoencoder's block_out_channels or the diffusion model's net. None when none says."""
    named = None
    for path in config_files(words):
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # LightningCLI says what is wrong with the file
        model = config.get("model") if isinstance(config, dict) else None
        if not isinstance(model, dict):
            continue
        if "class_path" in model:
            name = model["class_path"]
            if name not in MODULE_CLASSES:
                raise UserError(f"{path}: model.class_path {name!r} is not one of diffusion_lit's modules "
                                f"({', '.join(MODULE_CLASSES)})")
            named = (str(path), MODULE_CLASSES[name], True)
        elif "block_out_channels" in model:
            named = (str(path), AutoencoderModule, False)
        elif "net" in model:
            named = (str(path), DiffusionModule, False)
    return named


def main(args: list[str] | None = None) -> None:
    """Entry point; a user's mistake ends with one message and exit status 2 (DIFFUSION_LIT_DEBUG=1 shows the
    traceback)."""
    words = sys.argv[1:] if args is None else args
    # The train loader restarts an epoch where the checkpoint left it (its state travels with the data module).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # A run keeps its checkpoints in runs/<name>/checkpoints/ and resumes into it: not a surprise to warn about.
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    # Lightning's own use of a torch API it has not caught up with: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # The pretrained parts (autoencoder, CLIP text encoder) are frozen in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # A litdata StreamingDataset splits itself between DataLoader workers: its length is right.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    signals = stop_on_signals(args is None)  # SIGTERM and Ctrl-C end in one line (Stopped), until training begins
    try:
        if words and words[0] in COMMANDS:
            auto_cli(COMMANDS[words[0]], args=words[1:], as_positional=False, parser_class=CommandParser)
            return
        words = upgrade_words(words)  # --data.dataset, --data.root, ...: read for one more release
        refuse_old_configs(config_files(words))
        configs = read_configs(config_files(words))
        refuse_moved_paths(words, configs)
        refuse_flat_sampler_settings(words, configs)
        model_class, subclass_mode, args = DiffusionModule, False, list(words)
        named = named_module(words)
        models = [(p, c["model"]) for p, c in configs if isinstance(c.get("model"), dict)]
        if named is None or named[1] is DiffusionModule:
            refuse_old_model_spelling(words, models)
        elif named[1] is StableDiffusionModule:  # its other settings are its own
            refuse_old_model_spelling(words, models, ("compile", "inference_mode"))
        if words and words[0] == "autoencoder":  # the synonym: the same CLI around the autoencoder's module
            args = words[1:]
            if named and named[1] is not AutoencoderModule:
                raise UserError(f"{named[0]} is a diffusion config: run `python -m diffusion_lit {' '.join(args)}`; "
                                "`autoencoder fit` trains an autoencoder")
            model_class = AutoencoderModule
        if named:
            model_class, subclass_mode = named[1], named[2]
        # The in-process CLI is given argv's words itself (less `autoencoder`); LightningCLI warns whenever they
        # differ from sys.argv, which says nothing to a user.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        DiffusionCLI(
            model_class,
            DiffusionDataModule,
            subclass_mode_model=subclass_mode,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            parser_class=Parser,
            args=args,
        )
    except SIGTERMException:  # the Checkpoint callback saved last.ckpt and said how to resume
        sys.exit(SIGINT_EXIT_STATUS if Checkpoint.stopped_by == "SIGINT" else SIGTERM_EXIT_STATUS)
    except Stopped as stop:  # before training, a second Ctrl-C, or sample / evaluate (which say what they kept)
        if rank_zero_only.rank == 0:  # the other ranks of a DDP run have nothing else to say
            before = (f"stopped by {stop.name} before training started: nothing new to save" if "fit" in words[:1]
                      else f"stopped by {stop.name}: nothing was written")
            print(stop.line or before, file=sys.stderr)
        sys.exit(stop.exit_status)
    except (UserError, MisconfigurationException, ValueError) as err:  # Lightning's: a bad Trainer setting
        mistake = err if not isinstance(err, ValueError) else users_mistake(err)
        if os.environ.get("DIFFUSION_LIT_DEBUG") or mistake is None:
            raise
        line = str(mistake)
        if words[:1] == ["data"]:  # a source's own messages name its options as fit spells them
            line = line.replace("--data.source", "--source")
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if Checkpoint.lost_line is None or os.environ.get("DIFFUSION_LIT_DEBUG"):
            raise
        if Checkpoint.lost_line:  # a DDP rank was lost: what rank zero saved, or where to resume from
            print(Checkpoint.lost_line, file=sys.stderr)
        sys.exit(LOST_PEER_EXIT_STATUS)
    finally:
        restore_signals(signals)


def users_mistake(err: BaseException) -> UserError | None:
    """The UserError behind an exception: itself, or the one jsonargparse caught while building a config's
    `class_path` module (it reports a union of subtypes that did not validate, the UserError as its context)."""
    while err is not None and not isinstance(err, UserError):
        err = err.__cause__ or err.__context__
    return err
