"""A `fit` run's checkpoint read back into a model, for sample, evaluate and export: the trust rule checked before
anything is built, old hyperparameters upgraded, a moved autoencoder replaced; and a guide or a teacher checked
against it."""

import copy
from pathlib import Path

import torch
from lightning.pytorch.core.saving import _load_state
from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint
from torch import nn

from diffusion_lit.core.errors import UserError, reason, say
from diffusion_lit.model.latent import ChannelMismatch, absolute, works_on_latents
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.stable_diffusion import StableDiffusionModule
from diffusion_lit.model.old_model import upgrade_hparams
from diffusion_lit.model.snapshots import Rebuilt
from diffusion_lit.sampling.settings import Sampling
from diffusion_lit.core.trust import check_hparams, read_checkpoint


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint(ckpt_path: str, trusted: list[str] = (), autoencoder: str | None = None,
                    ema_length: float | None = None) -> tuple[DiffusionModule, dict]:
    """The module (on the GPU when there is one, in eval mode) and the raw checkpoint dict of a `fit` run.

    The classes the checkpoint names are checked against `diffusion_lit.core.trust` before any is imported. A latent
    model's `autoencoder` given here replaces the path it records (an autoencoder that moved); its weights must be
    the ones it was trained with. With `ema_length`, the EMA weights are the average of that relative width, rebuilt
    from the run's snapshots (`diffusion_lit.model.snapshots`).
    """
    checkpoint, upgraded = read_run(ckpt_path, trusted)
    module = build_module(Path(ckpt_path), upgraded, autoencoder)
    if ema_length is not None:
        say(Rebuilt(module, checkpoint, ckpt_path).apply(ema_length))
    return module, checkpoint


def read_run(ckpt_path: str, trusted: list[str] = ()) -> tuple[dict, dict]:
    """The raw checkpoint dict of a `fit` run, and a copy with its hyperparameters upgraded to the parts' layout,
    whose classes are checked against `diffusion_lit.core.trust`; nothing is built yet."""
    path = Path(ckpt_path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.ckpt"))
        hint = f", such as {path / found[-1]}" if found else ""
        raise UserError(f"--ckpt_path {path} is a folder: give a checkpoint file in it{hint}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: give a .ckpt file written by `fit`")
    checkpoint = read_checkpoint(path)  # tensors and plain values only: reading cannot run code from the file
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise UserError(f"{path} is not a checkpoint written by diffusion_lit's `fit` (no hyperparameters in it)")
    # Older checkpoints' flat hyperparameters in the parts' layout (the checkpoint returned keeps what it holds).
    upgraded = {**checkpoint, "state_dict": dict(checkpoint.get("state_dict") or {}),
                "hyper_parameters": upgrade_hparams(copy.deepcopy(checkpoint["hyper_parameters"]))}
    check_hparams(upgraded["hyper_parameters"], trusted, str(path))
    if "block_out_channels" in upgraded["hyper_parameters"]:  # AutoencoderModule's, not DiffusionModule's
        raise UserError(f"{path} is an autoencoder's checkpoint, not a diffusion model's: name it as model.latent's "
                        "autoencoder in a latent config (such as configs/digits_latent_cpu.yaml) and give sample / evaluate that "
                        "run's checkpoint")
    return checkpoint, upgraded


def build_module(path: Path, upgraded: dict, autoencoder: str | None = None) -> DiffusionModule:
    """The module that `read_run`'s upgraded checkpoint holds, its weights loaded (see `load_checkpoint`)."""
    try:
        cls = module_class(upgraded["hyper_parameters"])
        if autoencoder:
            point_at_autoencoder(upgraded["hyper_parameters"], absolute(autoencoder))
        # What `load_from_checkpoint` does once it has read the file: built from the (upgraded) hyperparameters,
        # the hooks and the state dict loaded.
        _pl_migrate_checkpoint(upgraded, path)  # what load_from_checkpoint does for older Lightning versions' files
        # Building draws initial weights and loading restores the random state the checkpoint saved: neither may move
        # this process's (a run that reads a guide or a teacher would not resume exactly).
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            module = _load_state(cls, upgraded, strict=True)
    except Exception as err:
        refusal = err if isinstance(err, UserError) else err.__cause__  # a part's own, wrapped by jsonargparse
        if isinstance(refusal, ChannelMismatch):  # the data is the model's, not the user's to choose here
            raise UserError(f"the autoencoder {refusal.path} takes {refusal.takes}-channel images and {path} was "
                            f"trained on {refusal.channels}-channel ones: give --autoencoder the autoencoder it was "
                            "trained with") from None
        if isinstance(refusal, UserError):  # its autoencoder or text encoder, named in it, is missing or unreadable
            raise refusal from None
        raise UserError(f"{path} could not be loaded as a diffusion_lit checkpoint ({reason(err)})") from None
    return module.to(default_device()).eval()


def point_at_autoencoder(hparams: dict, path: str) -> None:
    """Points a checkpoint's hyperparameters at the new place of its autoencoder (a Stable Diffusion fine-tune: of
    its pretrained folder), in place."""
    if "pretrained" in hparams:
        hparams["pretrained"] = path
    elif works_on_latents(hparams):
        hparams["latent"]["init_args"]["autoencoder"] = path
    else:
        raise UserError("--autoencoder is for a latent model whose autoencoder moved; this model works on pixels")


def module_class(hparams: dict) -> type[DiffusionModule]:
    """The class a checkpoint's hyperparameters build: a Stable Diffusion fine-tune, or a DiffusionModule."""
    return StableDiffusionModule if "pretrained" in hparams else DiffusionModule


def model_kind(m: DiffusionModule) -> dict:
    """What a guide or a starting checkpoint must share with the model: process, prediction, shape, conditioning
    and space."""
    return {"process": m.process.spec(), "prediction": m.objective.prediction, "shape": m.shape,
            **m.conditioning.spec(), **m.latent.spec()}


def start_from_checkpoint(module: DiffusionModule, ckpt: str, trusted: list[str] = ()) -> None:
    """Loads the EMA denoiser of a `fit` checkpoint into `module`'s network and its EMA copy, so that a new run
    tunes it, possibly with another objective. They must share the process, image shape, conditioning and space
    (pixels, or the same autoencoder's latents), and the prediction, except that a flow model (v) may start a
    MeanFlow model (u): the checkpoint lacks its interval layer, whose output is zeroed so that u(z, r, t) starts as
    the flow's v(z, t) for every r."""
    if not Path(ckpt).is_file():
        raise UserError(f"InitFrom {ckpt}: no such checkpoint; train the model to start from first (the config's "
                        "header names its command), or give InitFrom's path another run's checkpoint")
    _, upgraded = read_run(ckpt, trusted)
    space = {True: "a latent model", False: "a pixel model"}
    if works_on_latents(upgraded["hyper_parameters"]) != (not module.latent.pixels):
        raise UserError(f"InitFrom {ckpt}: it is {space[works_on_latents(upgraded['hyper_parameters'])]} and this "
                        f"model {space[not module.latent.pixels]}; start from a checkpoint trained in the same space")
    source = build_module(Path(ckpt), upgraded, getattr(module.latent, "path", None))
    ours, theirs = model_kind(module), model_kind(source)
    if (theirs["prediction"], ours["prediction"]) == ("v", "u"):
        ours["prediction"] = "v"  # a flow model's velocity is MeanFlow's u(z, t, t)
    for key in ours:
        if ours[key] != theirs[key]:
            raise UserError(f"InitFrom {ckpt}: its {key} is {theirs[key]!r} and this model's {ours[key]!r}; start "
                            "from a model of the same process, image shape and conditioning (a flow model can start "
                            "a MeanFlow one)")
    try:
        missing, unexpected = module.net.load_state_dict(source.denoiser().state_dict(), strict=False)
    except RuntimeError as err:
        raise UserError(f"InitFrom {ckpt}: its network has other shapes than this model's ({reason(err)}); give "
                        "model.net the checkpoint's settings") from None
    added = [k for k in missing if not k.startswith("interval_mlp.")]
    if added or unexpected:
        raise UserError(f"InitFrom {ckpt}: its network is not this model's (missing {added[:3]}, unexpected "
                        f"{unexpected[:3]}); give model.net the checkpoint's class and settings")
    if missing:  # the interval layer, new: silent at first
        last = module.net.interval_mlp[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
    if module.ema is not None:
        module.ema.module.load_state_dict(module.net.state_dict())
    say(f"InitFrom: the network starts from the EMA weights of {ckpt} (step {upgraded.get('global_step', '?')})")


def load_guide(guide_ckpt: str | None, module: DiffusionModule, trusted: list[str] = ()) -> nn.Module | None:
    """The EMA denoiser of a guide checkpoint for autoguidance (None without one), checked to be a model of the same
    process, prediction, image shape and conditioning as `module`'s, in the same space (pixels or an autoencoder's
    latents) and of images of as many channels: a UserError naming the first difference."""
    if guide_ckpt is None:
        return None
    guide = load_kin(guide_ckpt, module, f"--guide_ckpt {guide_ckpt}", "the guide", "a guide is a weaker model of the "
                     "same data (an earlier or smaller run)", trusted)
    if module.conditioning.captions:
        raise UserError("--guide_ckpt: a text model's guide would need its own text encoder; train one beside it "
                        "instead (model.guide)")
    return guide.ema.module.eval()


def load_kin(ckpt: str, module: DiffusionModule, what: str, role: str, advice: str, trusted: list[str] = (),
             ignore: tuple[str, ...] = ()) -> DiffusionModule:
    """The model of a checkpoint that works beside `module` (a guide, a teacher), checked to share its process,
    prediction, image shape, conditioning, space and image channels (but what `ignore` names of `model_kind`'s keys):
    a UserError that starts with `what`, names the first difference and ends with `advice`."""
    _, upgraded = read_run(ckpt, trusted)
    hparams, space = upgraded["hyper_parameters"], {True: "a latent model", False: "a pixel model"}
    if works_on_latents(hparams) != (not module.latent.pixels):  # before building it with the model's autoencoder
        raise UserError(f"{what}: {role} is {space[works_on_latents(hparams)]} and this model "
                        f"{space[not module.latent.pixels]}; {advice}")
    if (channels := hparams.get("channels")) != module.hparams.channels:
        theirs = f"{channels}-channel images" if isinstance(channels, int) else "images of unknown channels"
        raise UserError(f"{what}: {role} was trained on {theirs} and this model on {module.hparams.channels}-channel "
                        f"ones; {advice}")
    recorded, ours = upgraded.get("autoencoder_fingerprint"), module.latent.fingerprint()
    if recorded and ours not in (None, recorded):
        raise UserError(f"{what}: {role} was trained on the latents of another autoencoder (its fingerprint "
                        f"{recorded}, this model's {ours}); {advice}")
    # A latent model decodes through this model's autoencoder (checked by its fingerprint), wherever it was recorded.
    kin = build_module(Path(ckpt), upgraded, getattr(module.latent, "path", None))
    ours, theirs = model_kind(module), model_kind(kin)
    for key in ours:
        if key not in ignore and ours[key] != theirs[key]:
            raise UserError(f"{what}: its {key} is {theirs[key]!r} and this model's {ours[key]!r}; {advice}")
    return kin


def check_not_itself(guide: nn.Module | None, module: DiffusionModule, settings: Sampling, ema: bool = True) -> None:
    """A UserError for a guide checkpoint that holds the weights the model samples with (the same file, or a copy):
    D + w (D - D) = D, twice the passes for nothing. At the null condition it is classifier-free guidance: said."""
    ours, theirs = module.denoiser(ema).state_dict(), None if guide is None else guide.state_dict()
    if theirs is None or ours.keys() != theirs.keys() or not all(
            ours[k].shape == theirs[k].shape and torch.equal(ours[k].cpu(), theirs[k].cpu()) for k in ours):
        return
    if settings.guide_condition == "null":
        say(f"--guide_ckpt {settings.guide_ckpt} holds this model's own weights: at the null condition that is "
            "classifier-free guidance, which the model does without a guide (leave --guide_ckpt out)")
        return
    raise UserError(f"--guide_ckpt {settings.guide_ckpt} holds this model's own weights: a model guided by itself "
                    "is the model alone (D + w (D - D) = D) at twice the cost; give an earlier or smaller run of the "
                    "same data, or leave --guide_ckpt out")


def set_flow_shift(module: DiffusionModule, shift: float | None) -> None:
    """Sample a flow model with another shift than its own (None: keep it); a UserError for a VP model."""
    if shift is None:
        return
    if module.objective.prediction == "u":  # MeanFlow's sampler walks equal intervals of t, with no grid to shift
        raise UserError("--flow_shift shifts the solvers' levels; sampler meanflow walks equal intervals of t: leave "
                        "--flow_shift out")
    if not hasattr(module.process, "shift"):
        raise UserError(f"--flow_shift is for flow models (model.process Flow); this one is a "
                        f"{type(module.process).__name__} model")
    module.process = type(module.process)(shift).to(module.device)  # which checks it
