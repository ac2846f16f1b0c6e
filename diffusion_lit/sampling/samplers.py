"""DDPM ancestral sampling, DDIM and MeanFlow's few-step sampler: plain functions over (model, process, starting
noise); `sample` for every sampler, with labels and guidance.

`model(x_t, t)` predicts eps (or v or x0, named by `prediction`); timesteps are 0-based, t = T-1 the noisiest. All
randomness comes from `generator`.
"""

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_lit.core.errors import UserError
from diffusion_lit.model.guidance import Evaluations, GuideCondition, Interval, guided  # noqa: F401 (guided: sampling's API)
from diffusion_lit.model.process import Process, VP
from diffusion_lit.model.schedule import gather
from diffusion_lit.sampling.solvers import SOLVERS, ddim_grid_sample
from diffusion_lit.model.grids import Spacing, evenly_spaced, trailing
from diffusion_lit.model.targets import AVERAGE_VELOCITY, Prediction, split

Model = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> the network's prediction
Variance = Literal["posterior", "beta"]


def predict(model: Model, process: VP, x_t: Tensor, t: Tensor, prediction: Prediction,
            clip: bool) -> tuple[Tensor, Tensor]:
    """(x0, eps) from the model's prediction at integer timesteps t, x0 optionally clipped to [-1, 1] (eps is the
    unclipped one, as in DDIM's code)."""
    alpha, sigma = process.alpha_sigma(t, x_t.ndim)
    x0, eps = split(prediction, process, model(x_t, t), x_t, alpha, sigma)
    return (x0.clamp(-1, 1) if clip else x0), eps


@torch.no_grad()
def ddpm_sample(
    model: Model,
    process: VP,
    x_T: Tensor,
    generator: torch.Generator | None = None,
    variance: Variance = "posterior",
    clip_x0: bool = True,
    return_intermediates: bool = False,
    prediction: Prediction = "eps",
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Ancestral sampling, DDPM Algorithm 2, through all T steps.

    Args:
        model: the network (its prediction named by `prediction`: eps, v or x0).
        process: the noise process the model was trained with.
        x_T: starting noise, [B, C, H, W].
        generator: source of the noise added at each step.
        variance: sigma_t² = posterior variance beta-tilde_t (``posterior``) or beta_t (``beta``).
        clip_x0: clip the predicted x0 to [-1, 1] before forming the mean.
        return_intermediates: also return the list of states x_T, ..., x_0.
        prediction: what the model predicts.

    Returns:
        x_0, or (x_0, states) with return_intermediates.
    """
    variances = process.posterior_variance if variance == "posterior" else process.betas
    x = x_T
    states = [x]
    for step in reversed(range(process.timesteps)):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        # The mean of q(x_{t-1} | x_t, x0) at the predicted x0 (DDPM Eq. 7); unclipped, it equals Algorithm 2's
        # 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ᾱ_t) eps).
        x0, _ = predict(model, process, x, t, prediction, clip_x0)
        mean = gather(process.posterior_mean_coef1, t, x.ndim) * x0 + gather(process.posterior_mean_coef2, t, x.ndim) * x
        if step > 0:  # Algorithm 2, line 3: z = 0 at the last step
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + gather(variances, t, x.ndim).sqrt() * z
        else:
            x = mean
        if return_intermediates:
            states.append(x)
    return (x, states) if return_intermediates else x


def ddim_timesteps(timesteps: int, steps: int, spacing: Spacing = "linspace") -> list[int]:
    """`steps` timesteps, ascending: evenly spaced over [0, T-1], both ends included (``linspace``), or T - 1 and
    every T/N below it (``trailing``, diffusers' DDIM with timestep_spacing="trailing")."""
    if not 1 <= steps <= timesteps:
        raise UserError(f"DDIM steps must lie in [1, {timesteps}], got {steps}")
    if spacing not in ("linspace", "trailing"):
        raise UserError(f"DDIM takes spacing 'linspace' or 'trailing', got {spacing!r}")
    return (evenly_spaced if spacing == "linspace" else trailing)(timesteps, steps).tolist()


def check_ddim(process: VP, steps: int, eta: float, spacing: Spacing = "linspace") -> list[int]:
    """DDIM's timesteps, after checking its settings (a UserError when they are out of range)."""
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"eta must lie in [0, 1], got {eta}")
    return ddim_timesteps(process.timesteps, steps, spacing)


@torch.no_grad()
def ddim_sample(
    model: Model,
    process: VP,
    x_T: Tensor,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
    return_intermediates: bool = False,
    prediction: Prediction = "eps",
    spacing: Spacing = "linspace",
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """DDIM (Song et al. 2021, Eq. 12) over `steps` timesteps spaced by `spacing` (``linspace`` or ``trailing``).

    Args:
        model: the network (its prediction named by `prediction`: eps, v or x0).
        process: the noise process the model was trained with.
        x_T: starting noise, [B, C, H, W].
        steps: number of denoising steps (at most T).
        eta: 0 is deterministic DDIM; 1 gives DDPM's posterior variance.
        generator: source of the noise added at each step when eta > 0.
        clip_x0: clip the predicted x0 to [-1, 1].
        return_intermediates: also return the list of states x_T, ..., x_0.
        prediction: what the model predicts.

    Returns:
        x_0, or (x_0, states) with return_intermediates.
    """
    ts = check_ddim(process, steps, eta, spacing)
    x = x_T
    states = [x]
    for i in reversed(range(len(ts))):
        t = torch.full((x.shape[0],), ts[i], device=x.device, dtype=torch.long)
        alpha_bar = process.alphas_cumprod[ts[i]]
        # ᾱ of the next (less noisy) timestep; 1 after the last step, which lands on x_0 (and makes sigma 0).
        alpha_bar_prev = process.alphas_cumprod[ts[i - 1]] if i > 0 else torch.ones_like(alpha_bar)
        x0, eps = predict(model, process, x, t, prediction, clip_x0)
        # Eq. 16: sigma = eta sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        # Eq. 12: x_prev = sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev - sigma²) eps + sigma z
        x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if i > 0 and eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if return_intermediates:
            states.append(x)
    return (x, states) if return_intermediates else x


@torch.no_grad()
def meanflow_sample(model: Model, process: Process, x_T: Tensor, steps: int = 1,
                    return_intermediates: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
    """MeanFlow's sampler (Geng et al. 2025): z_r = z_t - (t - r) u(z_t, r, t) over `steps` equal intervals from
    t = 1 to 0, one network call each (one step: x0 = z_1 - u(z_1, 0, 1)). The model is a MeanFlow model's: it takes
    the times (t, t - r) [B, 2] on the process's scale and predicts the average velocity u."""
    ends = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = x_T
    states = [x]
    for i in range(steps):
        t, r = ends[i], ends[i + 1]
        times = process.network_time(torch.stack([t, t - r])).float().to(x.device).expand(x.shape[0], 2)
        x = x - float(t - r) * model(x, times)
        states.append(x)
    return (x, states) if return_intermediates else x


Sampler = Literal["ddpm", "ddim", "euler", "heun", "dpmpp_2m", "meanflow"]


def sample(
    model: Model,
    process: Process,
    x_T: Tensor,
    sampler: Sampler = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
    return_intermediates: bool = False,
    labels: Tensor | None = None,
    guidance_scale: float = 1.0,
    spacing: Spacing = "linspace",
    prediction: Prediction = "eps",
    null: Tensor | None = None,
    guide: nn.Module | None = None,
    guidance_interval: Interval | None = None,
    counts: Evaluations | None = None,
    guide_condition: GuideCondition = "same",
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """`ddpm_sample` (which always takes all T steps), `ddim_sample` with `steps` and `eta`, or one of the ODE
    solvers (`euler`, `heun`, `dpmpp_2m`) over `steps` levels spaced by `spacing` (``linspace`` or ``karras``), for a
    model that predicts `prediction` under `process` (DDPM: a discrete one, VP; DDIM walks a discrete
    process's timesteps and any other's grid levels); `meanflow_sample` in `steps` equal intervals for a MeanFlow
    model (prediction ``u``), and for no other.

    With `labels` ([B] class indices), a conditional model is guided towards them with `guidance_scale`; without,
    a conditional model samples unconditionally (its "null" class). A text model takes its prompts' features as
    `labels` ([B, L, D]) and the empty prompt's as `null` ([1, L, D]; without `labels`, it samples from that).
    With a `guide` (a weaker denoiser of the same data), `guidance_scale` guides away from it instead of from the
    null condition (autoguidance), on any model; `guidance_interval` (lo, hi] limits guidance to those noise levels
    sigma / alpha. `guide_condition` ``null`` gives the guide the null condition (label or empty prompt) instead of
    each sample's: autoguidance and classifier-free guidance at once. `counts` adds up the network passes made, the
    model's and the guide's.
    """
    if null is not None and labels is None:  # a text model's empty prompt
        labels = null.expand(len(x_T), *null.shape[1:])
        if guide is None:  # guiding the empty prompt against itself would change nothing
            guidance_scale = 1.0
    if null is None and (labels is not None or (guidance_scale != 1.0 and guide is None)):
        num_classes = getattr(model, "num_classes", 0)
        if not num_classes:
            raise UserError(
                "this model is unconditional (trained without labels): leave out labels and guidance_scale, "
                "or train a conditional one (--model.conditioning Labels on labelled data), or guide it with a weaker "
                "model of the same data (autoguidance: model.guide, or --guide_ckpt)"
            )
        if labels is None:
            raise UserError("guidance_scale needs labels to guide towards: give them with --labels (or --labels all)")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"labels must lie in [0, {num_classes - 1}] for this model, got {labels.unique().tolist()}")
    if counts is not None:
        counts.images += len(x_T)
    model = guided(model, labels, guidance_scale, null, guide, guidance_interval, process, counts, guide_condition)
    check_sampler(sampler, process, steps, eta, spacing, prediction, guidance_interval)
    if sampler == "meanflow":
        return meanflow_sample(model, process, x_T, steps, return_intermediates)
    if not process.discrete and sampler == "ddim":
        grid = process.grid(steps, spacing)
        return ddim_grid_sample(model, grid, x_T, eta, generator, clip_x0, return_intermediates, prediction)
    if sampler == "ddpm":
        return ddpm_sample(model, process, x_T, generator, clip_x0=clip_x0, return_intermediates=return_intermediates,
                           prediction=prediction)
    if sampler == "ddim":
        return ddim_sample(model, process, x_T, steps, eta, generator, clip_x0, return_intermediates, prediction,
                           spacing)
    grid = process.grid(steps, spacing)
    return SOLVERS[sampler](model, grid, x_T, clip_x0, return_intermediates, prediction)


def check_sampler(sampler: str, process: Process, steps: int, eta: float, spacing: str,
                  prediction: str | None = None, guidance_interval: Interval | None = None) -> None:
    """A UserError for settings no sampler takes, before any network call; given the model's `prediction`, for a
    sampler of another kind of model (meanflow samples MeanFlow models, and they nothing else)."""
    if sampler not in ("ddpm", "ddim", *SOLVERS, "meanflow"):
        raise UserError(f"unknown sampler {sampler!r}: use one of ddpm, ddim, {', '.join(SOLVERS)}, meanflow")
    if prediction == AVERAGE_VELOCITY and sampler != "meanflow":
        raise UserError(f"this is a MeanFlow model (it predicts the average velocity u), which sampler {sampler} "
                        "cannot read: sample it with sampler meanflow and 1 or 2 steps (--sampler meanflow --steps 1)")
    if sampler == "meanflow":
        check_meanflow(steps, eta, spacing, prediction, guidance_interval)
        return
    if not process.discrete and sampler == "ddpm":
        raise UserError(f"sampler ddpm walks the T timesteps of a VP (DDPM) model; this is a {type(process).__name__} "
                        "model: use ddim (with --eta 1 for DDPM-like noise), euler, heun or dpmpp_2m")
    if sampler in SOLVERS or not process.discrete:
        process.grid(steps, spacing)  # checks steps and spacing
    elif spacing != "linspace" and not (sampler == "ddim" and spacing == "trailing"):
        raise UserError(f"spacing {spacing!r} is for the ODE solvers ({', '.join(SOLVERS)}); {sampler} takes its own"
                        + (" or 'trailing'" if sampler == "ddim" else ""))
    if sampler == "ddim" and process.discrete:
        check_ddim(process, steps, eta, spacing)
    elif sampler == "ddim" and not 0.0 <= eta <= 1.0:
        raise UserError(f"eta must lie in [0, 1], got {eta}")


def check_meanflow(steps: int, eta: float, spacing: str, prediction: str | None,
                   guidance_interval: Interval | None) -> None:
    """A UserError for settings the meanflow sampler does not take, or (given its prediction) a model it cannot
    sample."""
    if prediction not in (None, AVERAGE_VELOCITY):
        raise UserError(f"sampler meanflow samples MeanFlow models (model.objective MeanFlow on the flow process), "
                        f"and this model predicts {prediction}: use ddim, euler, heun or dpmpp_2m")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps} (meanflow: 1 or 2 are usual)")
    if eta != 0.0:
        raise UserError(f"eta {eta:g}: sampler meanflow is deterministic and takes no eta; leave it out")
    if spacing != "linspace":
        raise UserError(f"spacing {spacing!r}: sampler meanflow walks equal intervals of t; leave spacing out")
    if guidance_interval is not None:
        raise UserError("sampler meanflow guides every step it takes: leave out guidance_interval")


def network_evaluations(sampler: str, steps: int, timesteps: int, guidance_scale: float = 1.0,
                        guided: bool = False) -> int:
    """Network evaluations per sample planned for a sampler: one per step (meanflow too; Heun: two, but one onto the
    last level; DDPM: all T steps), twice that under guidance on every level (`sample` counts the ones made:
    `Evaluations`)."""
    calls = {"ddpm": timesteps, "heun": 2 * steps - 1}.get(sampler, steps)
    return calls * (2 if guided and guidance_scale not in (0.0, 1.0) else 1)


def generate(
    model: Model,
    process: Process,
    num_samples: int,
    shape: tuple[int, int, int],
    generator: torch.Generator,
    batch_size: int = 256,
    progress: bool = False,
    labels: Tensor | Sequence[str] | None = None,
    condition: Callable | None = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    **sampler_kwargs,
):
    """Yields batches of images in [-1, 1] until `num_samples` are made; the noise comes from `generator` in order.

    The same generator state and batch size give the same images. On a GPU the starting noise comes from a CPU
    generator of `generator`'s seed, so that a seed starts from the same noise on every device (the samplers that add
    no noise of their own then draw the same images, to float rounding); the noise a stochastic sampler adds at each
    step comes from `generator`. `labels` ([num_samples] class indices, or prompts), made into the network's y by
    `condition` batch by batch, and `sampler_kwargs` go to `sample`; `decode` turns what the sampler made (latents)
    into images.
    """
    from tqdm.auto import tqdm  # Lightning's own progress-bar library

    device = generator.device
    start_noise = generator if device.type == "cpu" else torch.Generator().manual_seed(generator.initial_seed())
    with tqdm(total=num_samples, desc="sampling", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            x_T = torch.randn((n, *shape), generator=start_noise).to(device)
            y = None if labels is None else labels[start : start + n]
            y = condition(y) if condition is not None and y is not None else y
            x = sample(model, process, x_T, generator=generator, labels=None if y is None else y.to(device),
                       **sampler_kwargs)
            yield decode(x) if decode is not None else x
            bar.update(n)
