"""Stable Diffusion fine-tuning: a pretrained diffusers pipeline folder (SD 1.x / 2.x: `unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/`) as a DiffusionModule, trained in full or through LoRA adapters (`peft`, as diffusers'
own training scripts add them), and written back the way diffusers reads it (`export`: a pipeline folder, or
`pytorch_lora_weights.safetensors` for `StableDiffusionPipeline.load_lora_weights`).

    python -m diffusion_lit fit --config configs/sd_lora.yaml --model.pretrained SD_FOLDER \
        --data.source ImageFolder --data.source.root IMAGES
"""

import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_lit.core.files import read_json
from diffusion_lit.model.schedulers import vp_of
from diffusion_lit.core.errors import UserError
from diffusion_lit.model.conditioning import Prompts
from diffusion_lit.model.latent import Latent, absolute, fingerprint
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.objective import Objective, Weighting
from diffusion_lit.data.old_data import describe
from diffusion_lit.core.optional import need
from diffusion_lit.nets.text import CLIPText
from diffusion_lit.core.trust import from_pretrained

SD_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections: diffusers' LoRA scripts' default
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FrozenDtype = Literal["float32", "bfloat16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_pipeline(folder: str) -> tuple[Path, dict]:
    """(the folder, its scheduler config) of a local SD pipeline folder whose UNet is a UNet2DConditionModel; a
    UserError naming what is missing otherwise."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"pretrained {folder}: no such folder; give a local Stable Diffusion pipeline folder (what "
                        "save_pretrained writes: unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    missing = [part + "/" for part in PARTS if not (root / part).is_dir()]
    missing += [] if (root / "model_index.json").is_file() else ["model_index.json"]
    if missing:
        raise UserError(f"pretrained {folder} is not a Stable Diffusion pipeline folder: it has no "
                        f"{', '.join(missing)}; give the folder holding model_index.json and "
                        f"{', '.join(p + '/' for p in PARTS)}")
    unet = read_json(root / "unet" / "config.json")
    kind = unet.get("_class_name")
    if kind != "UNet2DConditionModel":
        raise UserError(f"pretrained {folder}: its unet is a {kind or 'model of unknown kind'}, not the "
                        "UNet2DConditionModel of Stable Diffusion 1.x / 2.x, the one kind fine-tuned here")
    if unet.get("addition_embed_type") or unet.get("class_embed_type"):
        raise UserError(f"pretrained {folder}: its unet also takes {unet.get('addition_embed_type') or 'class'} "
                        "conditioning (SDXL's pooled text and image sizes, or a class embedding), which this "
                        "fine-tuning does not give it: SD 1.x / 2.x only")
    return root, read_json(root / "scheduler" / "scheduler_config.json")


def add_lora(unet: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> None:
    """Freezes the UNet and adds LoRA adapters (peft) of this rank and alpha to the modules named `targets` (a name
    or the end of a dotted one, as peft matches them): the adapters are then its only trained weights."""
    if rank < 1:
        raise UserError(f"lora_rank must be at least 1, got {rank}; leave it unset (null) to fine-tune every weight")
    if alpha <= 0:
        raise UserError(f"lora_alpha must be positive, got {alpha}")
    names = [name for name, _ in unet.named_modules()]
    absent = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if absent or not targets:
        raise UserError(f"lora_targets {list(absent or targets)} name no module of the UNet: give module names such "
                        f"as SD's attention projections {list(SD_TARGETS)} (or proj_in, proj_out, ff.net.2)")
    peft = need("peft")
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                     target_modules=list(targets)))


def adapters_only(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook of a LoRA UNet: the adapters only; the frozen weights are read from the pretrained folder."""
    for key in [k for k in state_dict if k.startswith(prefix) and ".lora_" not in k]:
        del state_dict[key]


def keep_base(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of a LoRA UNet: a state dict of adapters keeps the frozen weights already loaded (a
    missing adapter is still an error)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if ".lora_" not in name:
            state_dict.setdefault(prefix + name, tensor.detach())


class PretrainedUNet(nn.Module):
    """diffusers' `UNet2DConditionModel` read from a pipeline folder's `unet/`, behind our contract
    `net(x_t, t, cond)` with cond the prompts' text features [B, L, D].

    Args:
        folder: the pipeline folder.
        lora_rank: add LoRA adapters of this rank (then the only trained weights, and all its state dict holds).
        lora_alpha: LoRA's alpha (the adapters' output is scaled by alpha / rank); unset, the rank.
        lora_targets: the modules that get adapters.
        gradient_checkpointing: recompute the UNet's activations in the backward pass instead of keeping them.
        frozen_dtype: the precision of the frozen weights (with LoRA); the adapters stay in float32.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int = 0, context_dim: int | None = None, *,
                 folder: str, lora_rank: int | None = None, lora_alpha: float | None = None,
                 lora_targets: Sequence[str] = SD_TARGETS, gradient_checkpointing: bool = False,
                 frozen_dtype: FrozenDtype = "float32") -> None:
        super().__init__()
        diffusers = need("diffusers")
        root, _ = read_pipeline(folder)
        config = read_json(root / "unet" / "config.json")  # checked before the weights are read
        channels, width = config.get("in_channels", 4), config.get("cross_attention_dim", 1280)
        if channels != in_channels or width != context_dim:
            raise UserError(f"pretrained {folder}: its unet takes {channels} latent channels and text features of "
                            f"width {width}; its vae and text encoder give {in_channels} and {context_dim}: the "
                            "folder mixes parts of different models")
        self.unet = from_pretrained(diffusers.UNet2DConditionModel, root / "unet", f"pretrained {folder}",
                                    "its unet could not be loaded ({reason})")
        self.lora = lora_rank is not None
        # The frozen base weights are read from the folder, not saved with the adapters: their fingerprint is.
        self.base_fingerprint = fingerprint(self.unet) if self.lora else None  # of float32 weights, before any cast
        if self.lora:
            add_lora(self.unet, lora_rank, lora_rank if lora_alpha is None else lora_alpha, lora_targets)
            for p in self.unet.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(DTYPES[frozen_dtype])
            self.register_state_dict_post_hook(adapters_only)
            self.register_load_state_dict_pre_hook(keep_base)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        dtype = self.unet.conv_in.weight.dtype  # the frozen weights' (LoRA in bf16) or the trained ones'
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=y.to(dtype)).sample.float()


class StableDiffusionModule(DiffusionModule):
    """A pretrained Stable Diffusion (1.x / 2.x) fine-tuned on captioned images: its UNet (`PretrainedUNet`), VAE
    (latent diffusion with its scaling factor) and CLIP text encoder (frozen) read from one pipeline folder, and the
    process and prediction (epsilon or v_prediction; scaled-linear betas) from its scheduler config.

    Args:
        pretrained: the local pipeline folder (save_pretrained's: unet/, vae/, text_encoder/, tokenizer/,
            scheduler/). Read again whenever the model is loaded: its checkpoints do not hold the frozen weights.
        lora_rank: train LoRA adapters of this rank on `lora_targets` instead of every UNet weight; unset: full
            fine-tuning.
        lora_alpha: LoRA's alpha (the adapters are scaled by alpha / rank); unset, the rank.
        lora_targets: the UNet modules that get adapters (names, or the ends of dotted names).
        ema: keep an EMA of the trained weights (of the adapters alone with LoRA; its decay: `ema_decay`); unset: on
            for full fine-tuning, off with LoRA.
        p_uncond: the probability that a caption is dropped to the empty prompt (for classifier-free guidance).
        loss_weighting: ``none`` or ``min_snr``.
        snr_gamma: gamma of Min-SNR-gamma.
        gradient_checkpointing: recompute the UNet's activations in the backward pass (far less activation memory,
            one more forward pass of compute).
        frozen_dtype: ``bfloat16`` keeps the frozen weights (VAE, text encoder and, with LoRA, the UNet's) in bf16:
            half their memory; the trained weights stay in float32.
        cache_latents: encode the training images once when fit starts.
        cache_text: encode each distinct caption once (the text encoder is frozen) and keep its features in host
            memory (236 kB a caption for SD 1.x); it saves the text encoder's work from the second epoch on.
        kwargs: DiffusionModule's own settings (image_size, channels, ema_decay, optimizer, warmup_steps, ...).
    """

    cpu_recipe = "fine-tuning Stable Diffusion wants a GPU"  # CpuCost's line

    def __init__(
        self,
        pretrained: str,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = SD_TARGETS,
        ema: bool | None = None,
        p_uncond: float = 0.1,
        loss_weighting: Weighting = "none",
        snr_gamma: float = 5.0,
        gradient_checkpointing: bool = False,
        frozen_dtype: FrozenDtype = "float32",
        cache_latents: bool = False,
        cache_text: bool = False,
        **kwargs,
    ) -> None:
        if frozen_dtype not in DTYPES:
            raise UserError(f"frozen_dtype must be one of {', '.join(DTYPES)}, got {frozen_dtype!r}")
        pretrained = absolute(pretrained)
        _, scheduler = read_pipeline(pretrained)
        process, prediction = vp_of(scheduler, f"pretrained {pretrained}")
        if not (lora_rank is None if ema is None else ema):
            kwargs["ema_decay"] = None
        kwargs.setdefault("optimizer", torch.optim.AdamW)  # built in Python; a config names its own (sd_lora.yaml)
        kwargs.setdefault("image_size", 512)  # SD 1.x's; the CLI links it from the data
        net = partial(PretrainedUNet, folder=pretrained, lora_rank=lora_rank, lora_alpha=lora_alpha,
                      lora_targets=tuple(lora_targets), gradient_checkpointing=gradient_checkpointing,
                      frozen_dtype=frozen_dtype)
        super().__init__(
            net=net, process=process, objective=Objective(prediction, loss_weighting, snr_gamma),
            conditioning=Prompts(CLIPText(pretrained), p_uncond, cache=cache_text),
            latent=Latent(pretrained, cache=cache_latents), **kwargs,
        )
        for key in ("net", "process", "objective", "conditioning", "latent"):  # built here from this class's settings
            self.hparams.pop(key, None)  # (a module built in Python would otherwise save them again, weights and all)
        self.latent.fit_option, self.latent.warn_eps = "--model.init_args.pretrained PATH", False
        self.latent.fingerprint()  # taken of the float32 weights, before any cast
        # The frozen parts the checkpoints do not hold, beside the VAE (module.py records that one).
        self.base_fingerprints = {"text_encoder": fingerprint(self.conditioning.frozen["encoder"])}
        if self.net.base_fingerprint is not None:  # LoRA: the UNet's weights under the adapters
            self.base_fingerprints["unet"] = self.net.base_fingerprint
        self.latent.frozen.to(DTYPES[frozen_dtype])
        self.conditioning.frozen.to(DTYPES[frozen_dtype])

    @property
    def lora(self) -> bool:
        """Trained through LoRA adapters."""
        return self.net.lora

    def diffusers_writer(self, checkpoint: dict, ckpt: Path, folder: Path, ema: bool):
        """What `export` writes of this model (see `sd_writer`): a LoRA file or a pipeline folder, not a DDPM one."""
        return sd_writer(self, checkpoint, ckpt, folder, ema)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["base_fingerprints"] = dict(self.base_fingerprints)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuses a pretrained folder whose frozen parts (a LoRA's UNet, the text encoder, the VAE) are not the
        ones the checkpoint was trained on, naming each that differs; older checkpoints record only the VAE."""
        recorded = dict(checkpoint.get("base_fingerprints") or {})
        ours = dict(self.base_fingerprints)
        if checkpoint.get("autoencoder_fingerprint"):
            recorded["vae"], ours["vae"] = checkpoint["autoencoder_fingerprint"], self.latent.fingerprint()
        differ = [f"{part} (fingerprint {ours[part]}, the checkpoint records {recorded[part]})"
                  for part in ("unet", "text_encoder", "vae") if part in recorded and ours.get(part) != recorded[part]]
        if differ:
            raise UserError(f"the pretrained folder {self.hparams.pretrained} is not the base this model was trained "
                            f"on: its {' and its '.join(differ)} differ{'s' if len(differ) == 1 else ''}. Point at "
                            "that base with --autoencoder PATH (sample, evaluate, export) or "
                            "--model.init_args.pretrained PATH (fit)")
        super().on_load_checkpoint(checkpoint)


LORA_CARD = """---
library_name: diffusers
base_model: {pretrained}
tags: [diffusion_lit, lora, stable-diffusion]
---
# {name}

LoRA adapters (rank {rank}, alpha {alpha}, on {targets}) for the Stable Diffusion in `{pretrained}`, trained with
diffusion_lit for {steps:,} steps on {data} ({weights} weights).

```python
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{pretrained}")
pipe.load_lora_weights("{folder}")
{sampler}image = pipe("{prompt}", num_inference_steps=25, guidance_scale=7.5).images[0]
```
"""

PIPELINE_CARD = """---
library_name: diffusers
base_model: {pretrained}
tags: [diffusion_lit, stable-diffusion]
---
# {name}

The Stable Diffusion in `{pretrained}` with its UNet fine-tuned in full by diffusion_lit for {steps:,} steps on
{data} ({weights} weights); its VAE, text encoder, tokenizer and scheduler are the original ones.

```python
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{folder}")
{sampler}image = pipe("{prompt}", num_inference_steps=25, guidance_scale=7.5).images[0]
```
"""

# diffusion_lit's `sample --sampler ddim --spacing trailing` in diffusers' terms
SAME_SAMPLER = ('pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", '
                'set_alpha_to_one=True, clip_sample=False)  # diffusion_lit\'s `sample --spacing trailing`\n')


def sd_writer(module: StableDiffusionModule, checkpoint: dict, ckpt: Path, folder: Path, ema: bool):
    """(what writes a Stable Diffusion fine-tune as diffusers reads it, its name): the LoRA adapters in diffusers'
    format (`pytorch_lora_weights.safetensors`, as its training scripts save them), or a pipeline folder (the
    pretrained one with the fine-tuned unet/)."""
    diffusers = need("diffusers")
    unet, hp = module.denoiser(ema).unet, module.hparams
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    words = {"name": folder.name, "pretrained": hp.pretrained, "steps": checkpoint.get("global_step", 0),
             "data": describe(data), "folder": folder,
             "weights": module.weights_name(ema), "sampler": SAME_SAMPLER,
             "prompt": "a photo of ..."}
    if module.lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        config = unet.peft_config["default"]

        def write(partial: Path) -> None:
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            # The metadata carries alpha (and the targets): without it diffusers would scale the adapters by 1.
            diffusers.StableDiffusionPipeline.save_lora_weights(
                str(partial), unet_lora_layers=layers, safe_serialization=True,
                unet_lora_adapter_metadata={"r": config.r, "lora_alpha": config.lora_alpha,
                                            "target_modules": sorted(config.target_modules)})
            text = LORA_CARD.format(**words, rank=config.r, alpha=config.lora_alpha,
                                    targets=", ".join(sorted(config.target_modules)))
            (partial / "README.md").write_text(text, encoding="utf-8")

        return write, "LoRA adapters: pytorch_lora_weights.safetensors"
    root = Path(hp.pretrained)

    parts = [name for name, value in read_json(root / "model_index.json").items()
             if isinstance(value, list) and value[0] is not None]

    def write(partial: Path) -> None:  # what model_index.json lists, the fine-tuned unet in place of the original
        shutil.copyfile(root / "model_index.json", partial / "model_index.json")
        for part in (p for p in parts if p != "unet"):
            shutil.copytree(root / part, partial / part)
        unet.save_pretrained(str(partial / "unet"), safe_serialization=True)
        (partial / "README.md").write_text(PIPELINE_CARD.format(**words), encoding="utf-8")

    return write, "StableDiffusionPipeline with the fine-tuned unet"
