"""Checkpoints and configs written before the model was built from parts (process, objective, conditioning, latent):
their flat hyperparameters and state-dict names, upgraded to the parts' layout wherever a checkpoint is read, and
their spellings on the command line refused with the new one. (The data's old settings: `diffusion_lit.data.old_data`.)"""

from diffusion_lit.core.errors import UserError
from diffusion_lit.core.moved import upgrade_paths

MODEL_KEYS = ("conditional", "p_uncond", "schedule", "timesteps", "flow_shift", "prediction", "loss_weighting",
              "snr_gamma", "t_sampling", "channels_last", "compile", "inference_mode", "text_encoder", "text_width",
              "text_depth", "max_prompt_length", "autoencoder", "latent_scale", "cache_latents", "init_from")
RENAMED = {"text_encoder.": "conditioning.encoder.", "text_ema.": "conditioning.ema.", "latent_scale": "latent.scale"}
# The old flags and what replaced them, for the one line that refuses them.
NEW_SPELLING = {
    "process": "--model.process VP (--model.process.schedule cosine) or --model.process Flow "
               "(--model.process.shift 3)",
    "schedule": "--model.process VP --model.process.schedule KIND", "timesteps": "--model.process.timesteps T",
    "flow_shift": "--model.process Flow --model.process.shift S",
    "prediction": "--model.objective.prediction v", "loss_weighting": "--model.objective.loss_weighting min_snr",
    "snr_gamma": "--model.objective.snr_gamma G", "t_sampling": "--model.objective.t_sampling logit_normal",
    "conditional": "--model.conditioning Labels", "p_uncond": "--model.conditioning.p_uncond P",
    "text_encoder": "--model.conditioning Prompts --model.conditioning.encoder ByteTextEncoder (or CLIPText with "
                    "--model.conditioning.encoder.folder DIR)",
    "text_width": "--model.conditioning.encoder.width W", "text_depth": "--model.conditioning.encoder.depth D",
    "max_prompt_length": "--model.conditioning.encoder.max_length N",
    "autoencoder": "--model.latent Latent --model.latent.autoencoder PATH", "latent_scale": "--model.latent.scale S",
    "cache_latents": "--model.latent.cache true",
    "channels_last": "the callback diffusion_lit.training.speed.Accelerate with channels_last: true",
    "compile": "the callback diffusion_lit.training.speed.Accelerate with compile: true",
    "init_from": "the callback diffusion_lit.training.init_from.InitFrom with path: DIR",
    "inference_mode": "nothing (sampling always runs under torch.inference_mode)",
}


def part(class_path: str, **init_args) -> dict:
    """A part as LightningCLI writes it into hyperparameters."""
    return {"class_path": class_path, "init_args": init_args}


def is_old(hparams: dict) -> bool:
    """Hyperparameters of a DiffusionModule written before the parts: a process named by a string, or none at all."""
    return "net" in hparams and ("process" not in hparams or isinstance(hparams["process"], str))


def upgrade_hparams(hparams: dict) -> dict:
    """The hyperparameters of an older checkpoint as this version reads them: the class paths of modules that moved
    into subpackages at their new places (`core.moved`), and flat settings in the parts' layout."""
    hparams = upgrade_paths(hparams)
    if "pretrained" in hparams:  # a Stable Diffusion fine-tune: its run-time switches are gone
        return {k: v for k, v in hparams.items() if k not in ("compile", "inference_mode")}
    if not is_old(hparams):
        return hparams
    old = dict(hparams)
    new = {k: v for k, v in old.items() if k not in (*MODEL_KEYS, "process")}
    if old.get("process", "vp") == "flow":
        new["process"] = part("diffusion_lit.model.process.Flow", shift=old.get("flow_shift", 1.0))
    else:
        new["process"] = part("diffusion_lit.model.process.VP", schedule=old.get("schedule", "linear"),
                              timesteps=old.get("timesteps", 1000))
    new["objective"] = part("diffusion_lit.model.objective.Objective", prediction=old.get("prediction"),
                            loss_weighting=old.get("loss_weighting", "none"), snr_gamma=old.get("snr_gamma", 5.0),
                            t_sampling=old.get("t_sampling"))
    p_uncond, text = old.get("p_uncond", 0.1), old.get("text_encoder")
    if text == "bytes":
        width = old.get("text_width", 128)
        encoder = part("diffusion_lit.nets.text.ByteTextEncoder", width=width, depth=old.get("text_depth", 2),
                       heads=max(1, width // 32), max_length=old.get("max_prompt_length", 32))
        new["conditioning"] = part("diffusion_lit.model.conditioning.Prompts", encoder=encoder, p_uncond=p_uncond)
    elif text:
        encoder = part("diffusion_lit.nets.text.CLIPText", folder=text)
        new["conditioning"] = part("diffusion_lit.model.conditioning.Prompts", encoder=encoder, p_uncond=p_uncond)
    elif old.get("conditional"):
        new["conditioning"] = part("diffusion_lit.model.conditioning.Labels", p_uncond=p_uncond)
    else:
        new["conditioning"] = None
    new["latent"] = (part("diffusion_lit.model.latent.Latent", autoencoder=old["autoencoder"],
                          scale=old.get("latent_scale"), cache=old.get("cache_latents", False))
                     if old.get("autoencoder") else None)
    return new


def upgrade_state_dict(state_dict: dict) -> None:
    """Renames, in place, the weights that moved into the parts (the text encoder, its EMA, the latent scale)."""
    for key in list(state_dict):
        for before, after in RENAMED.items():
            if key == before or (before.endswith(".") and key.startswith(before)):
                state_dict[after + key[len(before):]] = state_dict.pop(key)


def recorded_process(checkpoint: dict) -> tuple[dict, str] | None:
    """(the process's spec, the prediction) that a checkpoint was trained with: recorded by newer code, read from
    the hyperparameters of older code (None when it says neither)."""
    if "process_spec" in checkpoint:
        return checkpoint["process_spec"], checkpoint["prediction"]
    hparams = checkpoint.get("hyper_parameters") or {}
    if not is_old(hparams):
        return None
    flow = hparams.get("process", "vp") == "flow"
    spec = ({"process": "flow"} if flow else
            {"process": "vp", "schedule": hparams.get("schedule", "linear"), "timesteps": hparams.get("timesteps", 1000)})
    return spec, hparams.get("prediction") or ("v" if flow else "eps")


def refuse_old_model_spelling(words: list[str], configs: list[tuple[str, dict]],
                              keys: tuple[str, ...] = tuple(NEW_SPELLING)) -> None:
    """One UserError naming the new spelling for a flat model option of older code (of `keys`), on the command line
    or in a config file's `model:` section (or its `init_args`, for a module named by class_path)."""
    for i, word in enumerate(words):
        key = word[len("--model."):].split("=", 1)[0].removeprefix("init_args.") if word.startswith("--model.") else None
        value = word.split("=", 1)[1] if "=" in word else (words[i + 1] if i + 1 < len(words) else "")
        if key in keys and not (key == "process" and value not in ("vp", "flow")):
            raise UserError(f"{word.split('=', 1)[0]} is an option of older diffusion_lit: use {NEW_SPELLING[key]}")
    for path, model in configs:
        for key, value in (model.get("init_args") or {} if "class_path" in model else model).items():
            if key in keys and not (key == "process" and value not in ("vp", "flow")):
                raise UserError(f"{path}: model.{key} is a setting of older diffusion_lit: use {NEW_SPELLING[key]} "
                                "(in YAML: the part's class_path and init_args)")


SAMPLER_KEYS = ("sampler", "steps", "eta", "guidance_scale", "spacing", "guidance_interval", "guide_ckpt",
                "guide_condition")


def refuse_flat_sampler_settings(words: list[str], configs: list[tuple[str, dict]]) -> None:
    """One UserError for SampleGrid's and FID's sampler settings written flat, as older code took them (they are
    `sampling: {...}` now, `diffusion_lit.sampling.settings.Sampling`)."""
    for word in words:
        key = word.split("=", 1)[0].rpartition(".")[2]
        if word.startswith("--trainer.callbacks.") and ".sampling." not in word and key in SAMPLER_KEYS:
            raise UserError(f"{word.split('=', 1)[0]}: the callbacks' sampler settings are grouped now: use "
                            f"--trainer.callbacks.init_args.sampling.{key}")
    for path, config in configs:
        callbacks = (config.get("trainer") or {}).get("callbacks") or []
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            ours = isinstance(callback, dict) and str(callback.get("class_path")).rpartition(".")[2] in ("SampleGrid", "FID")
            args = (callback.get("init_args") or {}) if ours else {}
            flat = [key for key in SAMPLER_KEYS if key in args]
            if flat:
                raise UserError(f"{path}: {callback.get('class_path')} takes its sampler settings grouped now: write "
                                f"init_args: {{..., sampling: {{{', '.join(f'{k}: ...' for k in flat)}}}}}")
