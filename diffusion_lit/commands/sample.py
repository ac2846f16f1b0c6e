"""The `sample` command: images from a checkpoint, in batches that fit in memory, kept when a signal stops it
(`evaluate` draws its samples here too)."""

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_lit.training.checkpointing import Stopped, remove_own_temporaries, stopped_in
from diffusion_lit.core.errors import UserError, reason
from diffusion_lit.core.files import size_text, temporary_fallback
from diffusion_lit.model.guidance import Evaluations, GuideCondition, Interval
from diffusion_lit.data.images import check_output, check_space, needed_bytes, save_images, to_uint8
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.sampling.samplers import SamplerName, generate
from diffusion_lit.sampling.settings import Sampling
from diffusion_lit.model.grids import Spacing
from diffusion_lit.core.precision import Precision
from diffusion_lit.training.speed import warn_bf16
from diffusion_lit.core.trust import parse_trusted
from diffusion_lit.io.loading import check_not_itself, load_checkpoint, load_guide, set_flow_shift


def generate_images(module: DiffusionModule, num_samples: int, seed: int, batch_size: int, ema: bool = True,
                    precision: Precision = "32-true", labels: Tensor | list[str] | None = None, clip_x0: bool = True,
                    guide: nn.Module | None = None, counts: Evaluations | None = None, **sampler_kwargs) -> Tensor:
    """num_samples uint8 images [N, C, H, W] on the CPU, with a progress bar; `labels` are class indices or prompts.
    `guide` (a guide checkpoint's denoiser) replaces the model's own guide; `counts` adds up the network passes.
    SIGTERM or Ctrl-C (`Stopped`) ends it at once, the images of the batches finished so far on the exception."""
    if num_samples < 1 or batch_size < 1:
        raise UserError(f"num_samples and batch_size must be at least 1, got {num_samples} and {batch_size}")
    passes = 2 if sampler_kwargs.get("guidance_scale", 1.0) != 1.0 else 1  # guidance: two passes per image
    batch_size = fitting_batch(module, min(batch_size, num_samples), passes)
    generator = torch.Generator(module.device).manual_seed(seed)
    own = module.sampler_kwargs(clip_x0, ema)
    if guide is not None:
        own["guide"] = guide
    with module.sampling(precision, ema) as model:
        batches = generate(model, module.process, num_samples, module.shape, generator, batch_size, progress=True,
                           labels=labels, condition=lambda y: module.conditioning.condition(y, ema),
                           decode=module.latent.decode,
                           counts=counts, **own, **sampler_kwargs)
        done = []
        try:
            for x in batches:
                done.append(to_uint8(x).cpu())
            return torch.cat(done)
        except Stopped as stop:
            stop.images = torch.cat(done) if done else None
            raise


def available_memory(device: torch.device) -> int | None:
    """Bytes the process may still allocate on the device (a GPU's free memory, the system's MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    line = next((line for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
    return int(line.split()[1]) * 1024 if line else None


@torch.no_grad()
def activation_bytes(module: DiffusionModule) -> int:
    """An upper bound of the memory one image takes in a sampling step: every layer's output of one network call
    (and of decoding a latent) added up, as if none were freed."""
    total = 0

    def add(_, __, output) -> None:
        nonlocal total
        total += sum(t.numel() * t.element_size() for t in (output if isinstance(output, tuple) else (output,))
                     if isinstance(t, Tensor))

    hooks = [m.register_forward_hook(add) for m in module.modules() if not list(m.children())]
    try:
        with module.sampling() as net:
            x = torch.zeros(1, *module.shape, device=module.device)
            t = torch.zeros(1, device=module.device, dtype=torch.long if module.process.discrete else torch.float)
            rows = module.conditioning.rows([""], None)
            y = module.conditioning.condition(module.conditioning.batch(rows[:1], module.device)) if rows else None
            net(x, t, y)
            module.latent.decode(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def fitting_batch(module: DiffusionModule, batch_size: int, passes: int = 1) -> int:
    """batch_size, or the largest batch whose activations (an upper bound: `activation_bytes`) fit in the memory
    available (said in one line): the images are then those of --batch_size that batch, with the same seed."""
    available = available_memory(module.device)
    if available is None:
        return batch_size
    per_image = passes * activation_bytes(module)
    largest = max(1, int(available // max(per_image, 1)))
    if batch_size <= largest:
        return batch_size
    print(f"batch_size {batch_size} would need about {size_text(batch_size * per_image)} for sampling and "
          f"{size_text(available)} is available: sampling in batches of {largest} (the images of --batch_size "
          f"{largest})", file=sys.stderr)
    return largest


def parse_prompts(prompt: str | None, prompts: str | None, num_samples: int, text: bool) -> list[str] | None:
    """num_samples copies of each prompt, from --prompt or from the lines of the --prompts file (not both); None for
    neither."""
    if prompt is None and prompts is None:
        return None
    if prompt is not None and prompts is not None:
        raise UserError("--prompt and --prompts: give one of the two (one prompt, or a file of them: put the prompt "
                        "into the file as one more line)")
    if not text:
        raise UserError("--prompt / --prompts: this model was not trained on text (model.conditioning is not Prompts); "
                        "leave them out, or give a class model --labels")
    given = [] if prompt is None else [prompt]
    if prompts is not None:
        try:
            given += [line.strip() for line in Path(prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--prompts {prompts}: cannot read it as UTF-8 text ({reason(err)}); give a text file, "
                            "a prompt per line") from None
        if not given:
            raise UserError(f"--prompts {prompts} holds no prompts: write one per line")
    return [text for text in given for _ in range(num_samples)]


def parse_labels(labels: str | None, num_samples: int, num_classes: int) -> Tensor | None:
    """`3,3,7` -> those labels; `all` -> num_samples labels cycling through every class (balanced); None -> None."""
    if labels is None:
        return None
    if labels == "all":
        if not num_classes:
            raise UserError("--labels all: this model is unconditional (trained without labels); leave out --labels")
        return torch.arange(num_samples) % num_classes
    try:
        return torch.tensor([int(label) for label in labels.split(",")])
    except ValueError:
        raise UserError(f"--labels {labels!r}: give class indices separated by commas (3,3,7) or 'all'") from None


def sample(
    ckpt_path: str,
    out: str = "samples.png",
    num_samples: int = 64,
    labels: str | None = None,
    guidance_scale: float = 1.0,
    sampler: SamplerName = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
    clip_x0: bool = True,
    ema: bool = True,
    precision: Precision = "32-true",
    trust_class: str | None = None,
    spacing: Spacing = "linspace",
    flow_shift: float | None = None,
    prompt: str | None = None,
    prompts: str | None = None,
    guide_ckpt: str | None = None,
    guidance_interval: Interval | None = None,
    guide_condition: GuideCondition = "same",
    autoencoder: str | None = None,
    ema_length: float | None = None,
    stack_guidance: bool = False,
) -> None:
    """Generate images from a checkpoint.

    Args:
        ckpt_path: a checkpoint written by `fit` (e.g. runs/mnist/checkpoints/last.ckpt).
        out: a `.png` file (one grid), a `.npz` file (uint8 NHWC under `arr_0`) or a folder (one PNG per image).
        num_samples: how many images (with a list of labels: one image per label).
        labels: for a conditional model: class indices such as ``3,3,7``, or ``all`` for num_samples images cycling
            through every class; without, a conditional model samples unconditionally.
        guidance_scale: guidance w: D_weak + w (D - D_weak), where D_weak is the model at the null condition
            (classifier-free guidance) or, for a model trained with a guide (model.guide) or given --guide_ckpt, the
            guide (autoguidance, for any model); 1 is the model alone, 0 the weak one alone, above 1 stronger (at
            most 20; 1.5 to 8 are usual).
        sampler: ``ddim``, ``ddpm`` (ancestral, all T steps), or an ODE solver: ``euler``, ``heun`` (EDM's second
            order: two network evaluations per step) or ``dpmpp_2m`` (DPM-Solver++(2M)). For a flow model, ddim
            walks the flow's levels (eta 0: Euler's step) and ddpm is refused. ``meanflow`` (1 or 2 steps) for a
            MeanFlow model, and only for one.
        steps: DDIM steps, or the solver's levels (ddpm walks all T timesteps and takes none).
        eta: DDIM eta: 0 deterministic, 1 as noisy as DDPM (the other samplers take none).
        seed: the same seed (and batch size) gives the same images; the starting noise is drawn on the CPU, so on
            a GPU too for the samplers that add no noise of their own (to float rounding).
        batch_size: images generated at once.
        clip_x0: clip the predicted x0 to [-1, 1] at each step.
        ema: sample with the EMA weights (the raw training weights otherwise).
        precision: ``bf16-mixed`` runs the network under bf16 autocast (faster on GPUs and on CPUs with bf16
            instructions; the images differ slightly from ``32-true``).
        trust_class: your own network or optimizer classes that the checkpoint may name (import paths, separated
            by commas); without, only diffusion_lit's networks and torch.optim's optimizers are built.
        spacing: the ODE solvers' steps: ``linspace`` (evenly spaced timesteps) or ``karras`` (EDM's sigmas).
        flow_shift: for a flow model, SD3's shift of the sampling levels (default: the one it was trained with).
        prompt: for a text model: num_samples images of this prompt (guided by guidance_scale against the empty
            prompt); without, it samples from the empty prompt.
        prompts: for a text model: a text file with a prompt per line; num_samples images of each, a row per prompt
            (instead of --prompt).
        guide_ckpt: autoguidance from this checkpoint's EMA denoiser: an earlier or smaller model of the same
            process, prediction, image shape and conditioning (it replaces a guide trained beside the model).
        guidance_interval: ``[LO, HI]``: guide only at noise levels sigma / alpha in (LO, HI] (the same scale on VP
            and flow models; x_t / alpha = x0 + (sigma / alpha) eps), one pass of the model elsewhere.
        guide_condition: what the guide is given on a class or text model: ``same`` (each sample's label or prompt:
            autoguidance) or ``null`` (the null label or empty prompt: autoguidance and classifier-free guidance in
            one weak model).
        autoencoder: for a latent model whose autoencoder moved: its new place (its weights are checked); for a
            Stable Diffusion fine-tune, the new place of its pretrained folder.
        stack_guidance: give guidance_scale to a MeanFlow model trained with guidance folded in (its
            model.objective's guidance_scale), guiding its guided samples once more at twice the evaluations.
    """
    check_output(out)  # before the work, not after it
    trusted = parse_trusted(trust_class)
    if ema_length is not None and not ema:
        raise UserError("--ema_length chooses the EMA's length and --ema false samples with the trained weights: give "
                        "one of them")
    module, _ = load_checkpoint(ckpt_path, trusted, autoencoder, ema_length)
    settings = Sampling(sampler, steps, eta, guidance_scale, spacing, guidance_interval, guide_ckpt, guide_condition,
                        stack_guidance)
    settings.check(module.process)
    guide = load_guide(guide_ckpt, module, trusted)
    settings.check_model(module, guide is not None)
    check_not_itself(guide, module, settings, ema)
    set_flow_shift(module, flow_shift)
    text = parse_prompts(prompt, prompts, num_samples, module.conditioning.captions)
    if module.conditioning.captions and labels is not None:
        raise UserError("this model reads prompts, not labels: give --prompt TEXT or --prompts FILE instead of "
                        "--labels")
    y = text if text is not None else parse_labels(labels, num_samples, module.conditioning.num_classes)
    count = num_samples if y is None else len(y)
    check_space(out, count, (module.hparams.channels, module.hparams.image_size, module.hparams.image_size))
    warn_bf16(precision, module.device, "--precision")
    counts, start = Evaluations(), time.perf_counter()
    per_row = num_samples if text is not None and len(text) > num_samples else None  # a row per prompt
    images = None
    try:
        images = generate_images(module, count, seed, batch_size, ema, precision, labels=y, clip_x0=clip_x0,
                                 guide=guide, counts=counts, **settings.kwargs())
        seconds = time.perf_counter() - start
        path = save_kept(images, out, per_row)
    except Stopped as stop:  # SIGTERM or Ctrl-C: what was drawn goes to --out
        drawn = images if images is not None else stop.images
        raise kept_when_stopped(stop, drawn, count, lambda: save_kept(drawn, out, per_row), Path(out)) from None
    print(f"wrote {len(images)} images to {path} ({evaluations_text(counts)}; "
          f"{1000 * seconds / len(images):.1f} ms per image)")


def keep_samples(images: Tensor) -> Path:
    """The samples of an evaluation that was stopped, in an .npz file in the system's temporary folder."""
    fallback = temporary_fallback("samples.npz", needed_bytes(len(images), tuple(images.shape[1:])))
    if fallback is None:
        raise UserError("there is no room for them in the temporary folder: they are lost")
    return save_images(images, fallback)


def kept_when_stopped(stop: Stopped, drawn: Tensor | None, wanted: int, write: Callable[[], Path], out: Path,
                      noun: str = "images", after: str = "") -> Stopped:
    """After SIGTERM or Ctrl-C: the images drawn so far written by `write` (to `out`: a file, or a folder of them),
    and the one line that says so (ending with `after`) on the exception to raise. A second signal while writing
    stops at once: the file being written is not left half-written."""
    n = 0 if drawn is None else len(drawn)
    said = (f"stopped by {stop.name} after {n} of {wanted} {noun}" if n < wanted
            else f"stopped by {stop.name} with all {n} {noun} drawn")
    if n == 0:
        stop.line = f"{said} (a batch in progress is not kept): nothing to write{after}"
        return stop
    try:
        stop.line = f"{said}: wrote them to {write()}{after}"
    except UserError as err:  # a full disk: where they went instead, or that they are lost
        stop.line = f"{said}; {err}{after}"
    except Stopped as again:
        remove_own_temporaries(out if not out.suffix else out.parent, tempfile.gettempdir())
        kept = f"{out} holds some of them" if not out.suffix else "not kept"  # a folder: whole files, one by one
        again.line = f"stopped at once by a second {again.name} while writing the {n} {noun} drawn: {kept}{after}"
        return again
    return stop


def save_kept(images: Tensor, out: str, per_row: int | None) -> Path:
    """save_images, and when that fails (a full disk, say) the images written to the system's temporary folder
    instead, named in the error, so that the work is not lost."""
    try:
        return save_images(images, out, per_row)
    except UserError as err:
        if (stop := stopped_in(err)) is not None:  # SIGTERM or Ctrl-C cut the write short: no disk to blame
            raise stop from None
        failed = err
    fallback = temporary_fallback("samples.npz", needed_bytes(len(images), tuple(images.shape[1:])))
    if fallback is None:
        raise UserError(f"{failed}. There is no room for the images in the temporary folder either: they are lost")
    try:
        save_images(images, fallback)
    except UserError:
        raise UserError(f"{failed}. Writing them to {fallback} failed too: they are lost") from None
    raise UserError(f"{failed}. The {len(images)} images are kept in {fallback} (uint8 NHWC under arr_0): move the "
                    "file where you want it")


def evaluations_text(counts: Evaluations) -> str:
    """'20 network evaluations per image (10 of the model, 10 of the guide)'."""
    model, guide = counts.per_image()
    total = f"{model + guide:g} network evaluation{'' if model + guide == 1 else 's'} per image"
    return f"{total} ({model:g} of the model, {guide:g} of the guide)" if guide else total
