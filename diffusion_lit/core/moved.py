"""The one table of modules that moved when the package was split into subpackages (`diffusion_lit.unet` is now
`diffusion_lit.nets.unet`, ...), shared by the checkpoint upgrade (old checkpoints name their parts by the old class
paths, and load as they did) and the config reader (an old class path in a config or on the command line stops with
one line giving the new one). No module is left at an old place."""

import importlib

MOVED = {  # old module under diffusion_lit -> its new place under diffusion_lit
    "errors": "core.errors", "files": "core.files", "trust": "core.trust", "unet": "nets.unet", "dit": "nets.dit",
    "text": "nets.text", "frozen": "nets.frozen", "data": "data.datamodule", "sources": "data.sources",
    "folders": "data.folders", "hf_data": "data.hf_data", "streaming": "data.streaming", "loaders": "data.loaders",
    "digits": "data.digits", "images": "data.images", "old_data": "data.old_data", "process": "model.process",
    "schedule": "model.schedule", "targets": "model.targets", "objective": "model.objective",
    "conditioning": "model.conditioning", "latent": "model.latent", "guidance": "model.guidance",
    "module": "model.module", "stable_diffusion": "model.stable_diffusion", "autoencoder": "model.autoencoder",
    "old_model": "model.old_model", "solvers": "sampling.solvers", "sampling": "sampling.samplers",
    "settings": "sampling.settings", "loading": "io.loading", "diffusers_io": "io.diffusers_io",
    "callbacks": "training.callbacks", "checkpointing": "training.checkpointing", "speed": "training.speed",
    "metrics": "training.metrics", "commands": "commands.sample", "evaluation": "commands.evaluate",
    "export": "commands.export", "optimize": "commands.optimize",
}
CLASSES = {  # classes that moved to another module than the rest of theirs
    "diffusion_lit.diffusers_io.InitFrom": "diffusion_lit.training.init_from.InitFrom",
}


def moved(path: str) -> str | None:
    """The new import path of an old one (`diffusion_lit.process.Flow` -> `diffusion_lit.model.process.Flow`); None
    for a path that did not move, or names nothing at the new place either. Old paths are three names long."""
    parts = path.split(".") if isinstance(path, str) else []
    if path in CLASSES:
        return CLASSES[path]
    if len(parts) != 3 or parts[0] != "diffusion_lit" or parts[1] not in MOVED:
        return None
    new = f"diffusion_lit.{MOVED[parts[1]]}.{parts[2]}"
    try:  # `diffusion_lit.data.X` is both an old module and a new package: only a class found there moved there
        found = hasattr(importlib.import_module(new.rsplit(".", 1)[0]), parts[2])
    except ImportError:
        found = False
    return new if found else None


PATH_KEYS = {"class_path", "_class_path", "net", "optimizer"}  # where hyperparameters hold import paths


def upgrade_paths(value, key: str = ""):
    """Hyperparameters (nested dicts and lists) with every old class path in them replaced by its new one; the same
    object when none is old."""
    if isinstance(value, dict):
        new = {k: upgrade_paths(v, k) for k, v in value.items()}
        return value if all(new[k] is value[k] for k in value) else new
    if isinstance(value, list):
        new = [upgrade_paths(v, key) for v in value]
        return value if all(a is b for a, b in zip(new, value)) else new
    return (moved(value) or value) if key in PATH_KEYS else value
