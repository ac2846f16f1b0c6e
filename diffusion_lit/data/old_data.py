"""Older versions' data settings (`dataset`, `root`, `download`, `skip_unreadable`), read as a `data.source` now.

Checkpoints keep them in their data hyperparameters: `evaluate` and `export` read those as the source they name.
On the command line they are read for one more release, with one line that gives the new spelling; in a config file
they stop with one `error:` line that gives the file's new `data` section.
"""

import inspect
from pathlib import Path

import yaml

from diffusion_lit.core.errors import UserError, say
from diffusion_lit.core.moved import upgrade_paths
from diffusion_lit.data.sources import CIFAR10, MNIST, SOURCES, ImageFolder, ShippedDigits

OLD_NAMES = {"digits": ShippedDigits, "mnist": MNIST, "cifar10": CIFAR10, "folder": ImageFolder}  # --data.dataset
OLD_KEYS = ("dataset", "root", "download", "skip_unreadable")
OLD_OPTIONS = {f"--data.{key}": "--data.source" if key == "dataset" else f"--data.source.{key}" for key in OLD_KEYS}


def source_name(dataset: str) -> str:
    """`folder` -> `ImageFolder`; a UserError for a name older versions did not have either."""
    if dataset not in OLD_NAMES:
        raise UserError(f"unknown dataset {dataset!r}: data.dataset is data.source now, one of "
                        f"{', '.join(cls.__name__ for cls in SOURCES)} (--data.source NAME)")
    return OLD_NAMES[dataset].__name__


def upgrade(hparams: dict) -> dict:
    """Data settings with older versions' keys replaced by the `source` they name, and a source's class path from
    before the package's subpackages at its new place (`core.moved`); newer ones as they are."""
    hparams = upgrade_paths(hparams)
    if not any(key in hparams for key in OLD_KEYS):
        return hparams
    hparams = dict(hparams)
    old = {key: hparams.pop(key) for key in OLD_KEYS if key in hparams}
    dataset = old.pop("dataset", "mnist")
    source_name(dataset)  # a UserError for an unknown one
    cls = OLD_NAMES[dataset]
    init_args = {key: value for key, value in old.items() if key in inspect.signature(cls).parameters}
    if cls is ImageFolder:
        init_args.setdefault("root", "data")
    return {**hparams, "source": {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": init_args}}


def upgrade_words(words: list[str]) -> list[str]:
    """The command line with older data options in the new spelling (`--data.dataset folder --data.root DIR` ->
    `--data.source ImageFolder --data.source.root DIR`), said in one line. The source's class comes before its
    arguments, wherever it was given."""
    out, old, new, first, i = [], [], [], None, 0
    while i < len(words):
        key, equals, value = str(words[i]).partition("=")
        if key not in OLD_OPTIONS or (not equals and i + 1 == len(words)):
            out.append(words[i])
            i += 1
            continue
        if not equals:
            value = words[i + 1]
        i += 1 if equals else 2
        pair = [OLD_OPTIONS[key], source_name(value) if key == "--data.dataset" else value]
        old.append(f"{key} {value}")
        first = len(out) if first is None else first
        if key == "--data.dataset":  # the class first: jsonargparse reads its arguments against it
            out[first:first] = pair
            new.insert(0, " ".join(map(str, pair)))
        else:
            out += pair
            new.append(" ".join(map(str, pair)))
    if old:
        say(f"note: {' '.join(old)} is spelled {' '.join(new)} now; the old spelling goes in the next release")
    return out


def refuse_old_configs(files: list[Path]) -> None:
    """A UserError naming the new `data` section of the first config file whose data section has older keys."""
    for path in files:
        try:
            config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # LightningCLI says what is wrong with the file
        data = config.get("data") if isinstance(config, dict) else None
        if isinstance(data, dict) and (keys := [key for key in OLD_KEYS if key in data]):
            source = upgrade({key: data[key] for key in keys})["source"]
            if not source["init_args"]:
                del source["init_args"]
            flow = yaml.safe_dump({"source": source}, default_flow_style=True, sort_keys=False, width=1000).strip()
            spelling = "is an older spelling" if len(keys) == 1 else "are older spellings"
            raise UserError(f"{path}: data.{', data.'.join(keys)} {spelling}; name the data source instead, under "
                            f"data: {flow}")


def describe(hparams: dict) -> str:
    """What a checkpoint's data settings name, in words (`the cifar10 dataset in data`, `the images in DIR`), without
    reading the images."""
    try:
        source = upgrade(hparams).get("source")
    except UserError:
        source = None
    source = source if isinstance(source, dict) else {}
    name = str(source.get("class_path", "MNIST")).rpartition(".")[2]
    root = (source.get("init_args") or {}).get("root")
    if name == ImageFolder.__name__:
        return f"the images in {root}"
    known = {cls.__name__: cls.name for cls in SOURCES}
    return f"the {known.get(name, name)} dataset" + (f" in {root}" if root else "")
