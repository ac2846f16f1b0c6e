"""The `export` command: a checkpoint as a diffusers pipeline folder (`model_index.json`, `unet/` with its weights in
safetensors, `scheduler/`, a model card), which `diffusers.DiffusionPipeline.from_pretrained` loads with no network;
a Stable Diffusion fine-tune's LoRA adapters as the file `StableDiffusionPipeline.load_lora_weights` reads.
"""

import os
import shutil
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from diffusion_lit.io.loading import load_checkpoint
from diffusion_lit.io.diffusers_io import to_diffusers, unet2d_config
from diffusion_lit.model.schedulers import scheduler_for
from diffusion_lit.core.errors import UserError, reason
from diffusion_lit.core.files import space_text
from diffusion_lit.data.old_data import describe
from diffusion_lit.core.optional import need
from diffusion_lit.core.trust import parse_trusted
from diffusion_lit.nets.unet import UNet

CARD = """---
library_name: diffusers
tags: [diffusion_lit, {pipeline}]
---
# {name}

A {process} diffusion model ({prediction_words}) trained with diffusion_lit for {steps:,} steps on {data}
({channels}x{size}x{size} images), exported from `{ckpt}` ({weights} weights). {schedule_words}

Samplers that suit it: {samplers}.

```python
import torch
from diffusers import {pipeline}{extra_import}

pipe = {pipeline}.from_pretrained("{folder}")
{scheduler_line}images = pipe(batch_size=16, num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images
```
{conditional}{config}"""

CONDITIONAL = """
The UNet is class-conditional: `num_class_embeds` is {embeds}, classes 0 to {last} and the null class {null} (what
classifier-free guidance contrasts with). `DDPMPipeline` does not pass labels, so sample with the UNet directly:

```python
import torch
from diffusers import DDIMScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("{folder}", subfolder="unet")
scheduler = DDIMScheduler.from_pretrained("{folder}", subfolder="scheduler")
scheduler.set_timesteps(20)
labels, w = torch.tensor([3, 3, 7]), 1.5  # the digits asked for, and the guidance scale
x = torch.randn(len(labels), {channels}, {size}, {size}, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for t in scheduler.timesteps:
        both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, torch.full_like(labels, {null})])).sample
        cond, uncond = both.chunk(2)
        x = scheduler.step(uncond + w * (cond - uncond), t, x).prev_sample
images = (x / 2 + 0.5).clamp(0, 1)
```
"""


def export(ckpt_path: str, out: str, ema: bool = True, trust_class: str | None = None,
           autoencoder: str | None = None, ema_length: float | None = None) -> None:
    """Write a checkpoint of `fit` as diffusers reads it: a `DDPMPipeline` folder (`unet/` as a `UNet2DModel`,
    `scheduler/` with the same betas and prediction type, or `FlowMatchEulerDiscreteScheduler` for a flow model);
    for a Stable Diffusion fine-tune, its LoRA adapters as `pytorch_lora_weights.safetensors`
    (`StableDiffusionPipeline.load_lora_weights`) or, fine-tuned in full, a `StableDiffusionPipeline` folder.

    Args:
        ckpt_path: a checkpoint written by `fit`.
        out: the folder to write (new, or empty).
        ema: export the EMA weights (the trained ones with --ema false, or when the model keeps no EMA).
        trust_class: your own network classes the checkpoint may name (see `sample`).
        autoencoder: for a Stable Diffusion fine-tune whose pretrained folder moved: its new place (see `sample`).
        ema_length: export the EMA of this relative width, rebuilt from the run's snapshots (see `sample`).
    """
    need("diffusers")
    folder = Path(out)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--out {folder} already exists and is not an empty folder: give a new one")
    if ema_length is not None and not ema:
        raise UserError("--ema_length chooses the EMA's length and --ema false exports the trained weights: give "
                        "one of them")
    module, checkpoint = load_checkpoint(ckpt_path, parse_trusted(trust_class), autoencoder, ema_length)
    writer = getattr(module, "diffusers_writer", None) or partial(ddpm_writer, module)  # a model's own, or DDPM's
    write, what = writer(checkpoint, Path(ckpt_path), folder, ema)
    write_folder(folder, write, Path(ckpt_path))
    if module.guide is not None:
        print("the checkpoint's guide (model.guide) is not exported: diffusers has no autoguidance", file=sys.stderr)
    print(f"exported {module.weights_name(ema)} weights to {folder} ({what})")


def write_folder(folder: Path, write: Callable[[Path], None], ckpt_path: Path) -> None:
    """`write` fills a partial folder beside `folder` (with the run's config), which is then renamed into place:
    a failure leaves nothing there."""
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    try:
        partial.mkdir(parents=True)
        write(partial)
        run_config = ckpt_path.resolve().parent.parent / "config.yaml"
        if run_config.is_file():
            shutil.copyfile(run_config, partial / "diffusion_lit_config.yaml")
        if folder.exists():
            folder.rmdir()
        partial.rename(folder)
    except Exception as err:  # OSError, torch's and safetensors' writers' own errors on a full disk
        raise UserError(f"could not write {folder} ({reason(err)}); {space_text(folder.parent, err) or 'see above'}; "
                        "nothing was left there") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def ddpm_writer(module, checkpoint: dict, ckpt: Path, folder: Path, ema: bool) -> tuple[Callable[[Path], None], str]:
    """(what writes a pixel-space UNet model as a DDPMPipeline folder, its name), or a UserError for a model that
    has no such pipeline."""
    diffusers = need("diffusers")
    if not isinstance(module.net, UNet):
        raise UserError(f"a {type(module.net).__name__} denoiser has no diffusers counterpart that this export writes "
                        "(only the UNet, as UNet2DModel)")
    if not module.latent.pixels:
        raise UserError("a latent model decodes through its autoencoder with our latent scale, which no diffusers "
                        "pipeline for UNet2DModel applies: only pixel-space models export")
    net = module.denoiser(ema)
    config = unet2d_config(net)  # refuses a text model
    scheduler = scheduler_for(module)  # refuses what diffusers' schedulers cannot express
    unet = diffusers.UNet2DModel(**config)
    unet.load_state_dict(to_diffusers(net, net.state_dict()))
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)

    def write(partial: Path) -> None:
        pipeline.save_pretrained(str(partial), safe_serialization=True)
        (partial / "README.md").write_text(card(module, checkpoint, ckpt, folder, ema, scheduler), encoding="utf-8")

    return write, f"DDPMPipeline: {type(scheduler).__name__}"


def card(module, checkpoint: dict, ckpt: Path, folder: Path, ema: bool, scheduler) -> str:
    """The model card: what it is, how it was trained, how to sample it with diffusers (`scheduler`)."""
    hp, schedule = module.hparams, module.process
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    flow = type(scheduler).__name__.startswith("FlowMatch")
    words = {"eps": "predicts the noise (epsilon)", "v": "predicts v" if not flow else "predicts the velocity",
             "x0": "predicts the clean image"}
    num_classes = module.conditioning.num_classes
    run_config = ckpt.resolve().parent.parent / "config.yaml"
    return CARD.format(
        name=folder.name, pipeline="DDPMPipeline", process="rectified-flow" if flow else "DDPM (VP)",
        prediction_words=words[module.objective.prediction], steps=checkpoint.get("global_step", 0),
        data=describe(data),
        channels=hp.channels, size=hp.image_size, ckpt=ckpt.name, weights=module.weights_name(ema),
        schedule_words=(f"Rectified flow, shift {schedule.shift}." if flow else
                        f"{schedule.timesteps} timesteps, {schedule.kind} betas; x0 clipped to [-1, 1]."),
        samplers=("Euler (the exported FlowMatchEulerDiscreteScheduler) with 20 or more steps" if flow else
                  "DDIM (`DDIMScheduler.from_config`, trailing timesteps as exported) with 20-50 steps; with "
                  "`DDIMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)(..., eta=1.0)` DDPM-like noise, often the "
                  "clearer samples; DDPM with all steps"),
        extra_import="" if flow else ", DDIMScheduler",
        folder=folder, scheduler_line="" if flow else "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)\n",
        conditional=CONDITIONAL.format(embeds=num_classes + 1, last=num_classes - 1, null=num_classes,
                                       folder=folder, channels=hp.channels, size=hp.image_size) if num_classes else "",
        config=("\nThe run's configuration (diffusion_lit) is in `diffusion_lit_config.yaml`.\n"
                if run_config.is_file() else "\n"),
    )
