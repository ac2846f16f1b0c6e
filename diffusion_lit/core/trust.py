"""Which classes a checkpoint may name, decided from the names alone, before anything is imported or called.

A checkpoint's hyperparameters say which network and optimizer to build (`class_path` entries). Loading them
imports and calls what they name, so a crafted file could name any callable (`os.system`, say). The rule: a
`class_path` in a checkpoint must be one of diffusion_lit's networks (for `net`), one of torch.optim's optimizers
(for `optimizer`), one of `diffusion_lit.data.sources` (for the data's `source`), or a class the user named on the command
line (`--trust_class`, or the config they gave); a trusted name must then import as a subclass of the base its place
asks for (`nn.Module`, `Optimizer`, `Source`). Anything else is refused with a UserError while it is still a string.
"""

import importlib
import importlib.util
import pickle
from collections.abc import Iterable
from pathlib import Path

import torch

from diffusion_lit.core.errors import UserError, reason, say
from diffusion_lit.core.moved import moved

NETWORKS = {"diffusion_lit.nets.unet.UNet", "diffusion_lit.UNet", "diffusion_lit.nets.dit.DiT"}
OPTIMIZERS = {
    f"torch.optim.{name}"
    for name, obj in vars(torch.optim).items()
    if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
}
# The rule knows diffusion_lit's parts by name: importing them here would put it above the parts it rules on.
SOURCES = {f"diffusion_lit.data.sources.{name}" for name in ("ShippedDigits", "MNIST", "CIFAR10", "ImageFolder")}
PLACES = {  # key -> (the class paths allowed there, the base class a trusted one must subclass)
    "net": (NETWORKS, "torch.nn.Module"), "optimizer": (OPTIMIZERS, "torch.optim.Optimizer"),
    "guide": ({"diffusion_lit.model.guidance.Guide"}, "torch.nn.Module"),
    "source": (SOURCES, "diffusion_lit.data.sources.Source"),
    "process": ({"diffusion_lit.model.process.VP", "diffusion_lit.model.process.Flow", "diffusion_lit.VP",
                 "diffusion_lit.Flow"}, "diffusion_lit.model.process.Process"),
    "objective": ({"diffusion_lit.model.objective.Objective", "diffusion_lit.model.objective.MeanFlow"},
                  "diffusion_lit.model.objective.Objective"),
    "conditioning": ({f"diffusion_lit.model.conditioning.{name}" for name in ("Unconditional", "Labels", "Prompts")},
                     "diffusion_lit.model.conditioning.Unconditional"),
    "encoder": ({"diffusion_lit.nets.text.ByteTextEncoder", "diffusion_lit.nets.text.CLIPText"}, "torch.nn.Module"),
    "latent": ({"diffusion_lit.model.latent.Pixels", "diffusion_lit.model.latent.Latent"},
               "diffusion_lit.model.latent.Pixels"),
    "ema_decay": ({"diffusion_lit.model.ema.PowerEMA"}, "diffusion_lit.model.ema.PowerEMA"),
    "teacher": ({"diffusion_lit.io.teacher.CheckpointTeacher"}, "diffusion_lit.model.teacher.Teacher"),
}
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"  # what LightningCLI writes into every checkpoint
MODULES = {"diffusion_lit.model.module.DiffusionModule", "diffusion_lit.model.autoencoder.AutoencoderModule",
           "diffusion_lit.model.stable_diffusion.StableDiffusionModule"}
DATAMODULES = {"diffusion_lit.data.datamodule.DiffusionDataModule"}


def read_checkpoint(path, mmap: bool = False, advice: str = "give a .ckpt file written by `fit`"):
    """What a checkpoint file holds, read as tensors and plain values only: reading cannot run code from the file.

    A file torch cannot read so is a UserError ending in `advice`: not a checkpoint of this project, or damaged.
    torch's own text for a file that holds other objects advises loading it with weights_only=False, which would run
    whatever code a crafted file carries: it never reaches the user.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        text = str(err)
        if refused_pickle(err):
            detail = "it holds more than tensors and plain values, or is not a checkpoint at all"
        elif "_use_new_zipfile_serialization" in text:  # mmap's advice to save it again: not the user's file to save
            detail = "it is not the zip archive that torch.save writes"
        elif isinstance(err, EOFError):
            detail = "it ends early: empty, or cut short"
        else:
            detail = reason(err)[:200]
        raise UserError(f"{path} could not be loaded: it is not a readable checkpoint of diffusion_lit, or it is "
                        f"damaged ({detail}); {advice}") from None


def refused_pickle(err: BaseException | None) -> bool:
    """Whether a `torch.load(weights_only=True)` (ours, or a library's such as transformers') refused a file for
    holding more than tensors and plain values. torch's text then advises re-running it with weights_only=False,
    which would run whatever code a crafted file carries: the caller says what is wrong in its own words instead."""
    seen = set()
    while err is not None and id(err) not in seen:  # a library may wrap torch's error in its own: raised from it
        seen.add(id(err))  # (transformers), or while handling it (diffusers' "Unable to load weights" OSError)
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def pickle_refusal(what: str, weights: Path, safe_file: str, convert: str) -> UserError:
    """The one line that refuses a pretrained folder's pickled `weights` once `refused_pickle` says a weights_only
    load refused them, with `convert`, the code that rewrites them as `safe_file` for whoever trusts the folder."""
    return UserError(f"{what}: {weights} is a pickle that holds more than tensors, which could run code when loaded: "
                     "refused. Only if you trust where the folder came from, convert it to safetensors once "
                     f"(save_pretrained writes {safe_file}, which loads without running anything): {convert}")


def pickled_weights(folder: Path, name: str) -> Path:
    """The pickled weights file of a pretrained folder: `name` when it is there, else its first .bin (a variant's or
    a shard's)."""
    return folder / name if (folder / name).is_file() else next(iter(sorted(folder.glob("*.bin"))), folder / name)


def diffusers_pickle_refusal(what: str, model: str, folder: Path) -> UserError:
    """`pickle_refusal` for a diffusers `model` (a class name, "AutoencoderKL") saved in `folder`; its conversion
    keeps the file's tensors (its other objects are no weights) and loads them strictly into the model first."""
    weights = pickled_weights(folder, "diffusion_pytorch_model.bin")
    return pickle_refusal(
        what, weights, "diffusion_pytorch_model.safetensors",
        f"import diffusers, torch; m = diffusers.{model}.from_config(diffusers.{model}.load_config({str(folder)!r})); "
        f"m.load_state_dict({{k: v for k, v in torch.load({str(weights)!r}, weights_only=False).items() "
        f"if torch.is_tensor(v)}}); m.save_pretrained({str(folder)!r})")


def from_pretrained(cls, folder: Path, what: str, failed: str):
    """`cls.from_pretrained(folder)` of a diffusers model class, from local files; a pickled weights file refused in
    `diffusers_pickle_refusal`'s line (diffusers says only "Unable to load weights", and torch's advice is never passed
    on), any other failure the UserError "`what`: `failed`", its ``{reason}`` filled in."""
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        if refused_pickle(err):
            raise diffusers_pickle_refusal(what, cls.__name__, folder) from None
        raise UserError(f"{what}: {failed.format(reason=reason(err))}") from None


def class_paths(value, key: str = "") -> Iterable[tuple[str, object]]:
    """(key, class path) of every `class_path` entry in nested hyperparameters, and of `net` / `optimizer` given as
    an import path string (which jsonargparse would also import)."""
    if isinstance(value, dict):
        if "class_path" in value:
            yield key, value["class_path"]
        for k, v in value.items():
            if k != "class_path":
                yield from class_paths(v, "" if k in ("init_args", "dict_kwargs") else k)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from class_paths(v, key)
    elif isinstance(value, str) and key in PLACES:
        yield key, value


def check_hparams(hparams: dict, trusted: Iterable[str] = (), source: str = "the checkpoint") -> None:
    """Raises UserError unless every class the hyperparameters name is allowed at its place (see the module doc)."""
    trusted = set(trusted)
    builder = hparams.get("_class_path")
    builder = moved(builder) or builder  # an old checkpoint names the module's old place
    if hparams.get("_instantiator", INSTANTIATOR) != INSTANTIATOR or builder not in (None, *MODULES):
        builder = shown(hparams.get("_instantiator") or hparams.get("_class_path"))
        raise UserError(f"{source} asks to be built by {builder}, which diffusion_lit does not use: refused (a crafted "
                        "or foreign checkpoint)")
    for key, name in class_paths({k: v for k, v in hparams.items() if not str(k).startswith("_")}):
        allowed, base = PLACES.get(key, (set(), "torch.nn.Module"))
        place = key if isinstance(key, str) and key.isidentifier() else "class"
        if shown(name) != repr(name):  # not echoed: it names nothing
            raise UserError(f"{source} gives its {place} a class_path that is not an import path: refused (a crafted "
                            "or damaged checkpoint)")
        if (moved(name) or name) in allowed:  # old checkpoints name the old places
            continue
        if name not in trusted:
            raise UserError(
                f"{source} names {name!r} as its {place}, which is not one of diffusion_lit's networks, "
                f"data sources or torch.optim's optimizers: refused before importing it. {trust_advice(name, source)}"
            )
        check_subclass(name, base, source)


def origin(name: str) -> Path | None:
    """The file (a namespace package's: folder) whose code importing the import path `name` runs first, that of its
    top-level module, found without importing or running anything; None when it cannot be imported.

    Only the top-level name is looked up: importlib.util.find_spec of a dotted name imports the parent packages.
    """
    try:
        spec = importlib.util.find_spec(name.partition(".")[0])
    except (ImportError, ValueError):  # ValueError: an empty name, or a module without a spec
        return None
    if spec is None:
        return None
    if spec.has_location and spec.origin:
        return Path(spec.origin).resolve()
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]).resolve() if locations else None  # None too for built-in modules: nothing to run


def trust_advice(name: str, source: str) -> str:
    """What to do about a class that a checkpoint names and the user has not trusted, with where it would be imported
    from: under `python -m` the current folder is on sys.path, so a module that came with the checkpoint imports,
    and its top-level code runs before any check of the class."""
    file, top = origin(name), name.partition(".")[0]
    beside = [p for p in (Path(source).parent / f"{top}.py", Path(source).parent / top) if p.exists()]
    if beside and Path(source).is_file() and (file is None or near(file, source) is None):
        return (f"A file {beside[0].resolve()} lies beside the checkpoint: importing the class from it would run that "
                "file's code, so never trust a file that came with a checkpoint; only if you wrote it yourself, run "
                f"from its folder and name the class on the command line: --trust_class {name}")
    if file is None:
        return (f"No module {top!r} is on the path here to import it from. If it is a class of your own, make its "
                f"module importable (install it, or run from its folder) and name it on the command line: "
                f"--trust_class {name}")
    if (place := near(file, source)) is None:
        return (f"It would be imported from {file}; if it is a class of your own that you trust, name it on the "
                f"command line: --trust_class {name}")
    return (f"It would be imported from {file}, a file {place}, and importing it runs that file's code: never trust "
            f"a file that came with a checkpoint; only if you wrote {file.name} yourself, name it on the command "
            f"line: --trust_class {name}")


def near(file: Path, source: str) -> str | None:
    """Where `file` lies if it may have come with the checkpoint `source` (a path, or words naming none): beside it,
    or under the current folder, which `python -m` puts on sys.path; None elsewhere (an installed package)."""
    if Path(source).is_file() and file.is_relative_to(Path(source).resolve().parent):
        return "beside the checkpoint"
    return "under the current folder" if file.is_relative_to(Path.cwd().resolve()) else None


def shown(value) -> str:
    """A checkpoint's value as it may be shown to the user: a short printable string quoted, anything else not at
    all (a crafted file's text must not read as our own)."""
    if isinstance(value, str) and value.isprintable() and len(value) <= 200:
        return repr(value)
    return "a value that is not an import path"


def check_data_hparams(hparams: dict, trusted: Iterable[str] = (), source: str = "the checkpoint") -> None:
    """Raises UserError unless a checkpoint's data hyperparameters are a DiffusionDataModule's whose `source` is one
    of diffusion_lit's sources or a trusted subclass of `Source`."""
    builder = hparams.get("_class_path")
    builder = moved(builder) or builder
    if hparams.get("_instantiator", INSTANTIATOR) != INSTANTIATOR or builder not in (None, *DATAMODULES):
        builder = shown(hparams.get("_instantiator") or builder)
        raise UserError(f"{source} asks for its data to be built by {builder}, which diffusion_lit does not use: "
                        "refused (a crafted or foreign checkpoint)")
    check_hparams({k: v for k, v in hparams.items() if not str(k).startswith("_")}, trusted, source)


def import_named(name: str, what: str) -> object:
    """What the import path `name` names; a UserError beginning with `what` when it cannot be imported."""
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"{what}: cannot import it ({reason(err)})") from None


def check_subclass(name: str, base: str, source: str) -> None:
    """Imports a class the user trusts and checks that it is a `base` subclass (a class, not any callable); says
    first which file the import runs, since a checkpoint may have come with one beside it."""
    if (file := origin(name)) is not None:
        place = near(file, source)
        where = f"{file}, a file {place}" if place else str(file)
        say(f"{source} names {name!r}, which you trust: importing it from {where}")
    obj = import_named(name, f"--trust_class {name}")
    if not (isinstance(obj, type) and issubclass(obj, import_named(base, base))):
        raise UserError(f"{source} names {name!r}, which is not a subclass of {base}: refused")


def parse_trusted(trust_class: str | None) -> list[str]:
    """`--trust_class mypkg.nets.Net,mypkg.opt.Lion` -> the names."""
    return [name.strip() for name in (trust_class or "").split(",") if name.strip()]
