"""The samplers, each one object of one shape in one table (`SAMPLERS`: it checks its own settings and draws), over
the loops written out as plain functions of (model, process, starting noise): DDPM's ancestral sampling, DDIM and
MeanFlow's few-step sampler here, the ODE solvers in `solvers`; `sample` for every sampler, with labels and guidance.

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
DEFAULT_STEPS = 50  # the steps sampling takes when none are given
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


class Sampler:
    """One sampler: what it checks of its settings (`check`, before any network call; `ignored`, settings a user gave
    that it would not use), how it draws (`draw`), and how many network evaluations a sample takes."""

    name = ""

    def check(self, process: Process, steps: int, eta: float, spacing: str, prediction: str | None = None,
              guidance_interval: Interval | None = None) -> None:
        """A UserError for settings it cannot draw with, or (given the model's prediction) a model it cannot read."""
        self.reads(prediction)
        process.grid(steps, spacing)  # the ODE samplers' levels: checks steps and spacing

    def reads(self, prediction: str | None) -> None:
        """A UserError for a MeanFlow model, which only the meanflow sampler reads."""
        if prediction == AVERAGE_VELOCITY:
            raise UserError(f"this is a MeanFlow model (it predicts the average velocity u), which sampler {self.name} "
                            "cannot read: sample it with sampler meanflow and 1 or 2 steps (--sampler meanflow --steps 1)")

    def ignored(self, process: Process, steps: int, eta: float) -> None:
        """A UserError for a number of steps or an eta the user gave that it would not use as asked."""
        if eta != 0.0:
            raise UserError(f"eta {eta:g}: sampler {self.name} is a deterministic ODE solver and takes no eta (only "
                            f"ddim does); leave eta out, or use sampler ddim with eta {eta:g}")

    def draw(self, model: Model, process: Process, x_T: Tensor, steps: int, eta: float, generator, clip_x0: bool,
             return_intermediates: bool, prediction: Prediction, spacing: Spacing):
        raise NotImplementedError

    def evaluations(self, steps: int, timesteps: int) -> int:
        """Network evaluations per sample, unguided."""
        return steps


class DDPM(Sampler):
    """DDPM's ancestral sampler: all T timesteps of a VP process (`ddpm_sample`)."""

    name = "ddpm"

    def check(self, process, steps, eta, spacing, prediction=None, guidance_interval=None) -> None:
        self.reads(prediction)
        if not process.discrete:
            raise UserError(f"sampler ddpm walks the T timesteps of a VP (DDPM) model; this is a "
                            f"{type(process).__name__} model: use ddim (with --eta 1 for DDPM-like noise), euler, heun "
                            "or dpmpp_2m")
        if spacing != "linspace":
            raise UserError(f"spacing {spacing!r} is for the ODE solvers ({', '.join(SOLVERS)}); ddpm takes its own")

    def ignored(self, process, steps, eta) -> None:
        timesteps = getattr(process, "timesteps", None)
        if steps < 1:
            raise UserError(f"steps must be at least 1, got {steps}; sampler ddpm walks all the timesteps of the "
                            "model whatever steps say: leave steps out")
        if process.discrete and steps not in (DEFAULT_STEPS, timesteps):  # the default means nothing to it
            raise UserError(f"steps {steps}: sampler ddpm always walks all {timesteps} timesteps of the model, so "
                            "steps mean nothing to it; leave steps out, or use sampler ddim with eta 1 (DDPM-like "
                            f"noise in {steps} steps)")
        if eta not in (0.0, 1.0):
            raise UserError(f"eta {eta:g}: sampler ddpm is as noisy as eta 1 by nature and takes no eta; use sampler "
                            f"ddim with eta {eta:g}")

    def draw(self, model, process, x_T, steps, eta, generator, clip_x0, return_intermediates, prediction, spacing):
        return ddpm_sample(model, process, x_T, generator, clip_x0=clip_x0, return_intermediates=return_intermediates,
                           prediction=prediction)

    def evaluations(self, steps, timesteps) -> int:
        return timesteps


class DDIM(Sampler):
    """DDIM: a discrete process's timesteps (`ddim_sample`, `linspace` or `trailing`), any other's grid levels."""

    name = "ddim"

    def check(self, process, steps, eta, spacing, prediction=None, guidance_interval=None) -> None:
        if not process.discrete:
            super().check(process, steps, eta, spacing, prediction)
        else:
            self.reads(prediction)
            if spacing not in ("linspace", "trailing"):
                raise UserError(f"spacing {spacing!r} is for the ODE solvers ({', '.join(SOLVERS)}); ddim takes its "
                                "own or 'trailing'")
            check_ddim(process, steps, eta, spacing)  # eta too
        if not process.discrete and not 0.0 <= eta <= 1.0:
            raise UserError(f"eta must lie in [0, 1], got {eta}")

    def ignored(self, process, steps, eta) -> None:
        pass  # it takes every steps and eta it checks

    def draw(self, model, process, x_T, steps, eta, generator, clip_x0, return_intermediates, prediction, spacing):
        if not process.discrete:
            return ddim_grid_sample(model, process.grid(steps, spacing), x_T, eta, generator, clip_x0,
                                    return_intermediates, prediction)
        return ddim_sample(model, process, x_T, steps, eta, generator, clip_x0, return_intermediates, prediction,
                           spacing)


class Solver(Sampler):
    """An ODE solver of `solvers` (euler, heun, dpmpp_2m) over the process's grid of `steps` levels."""

    def __init__(self, name: str, calls: Callable[[int], int] = lambda steps: steps) -> None:
        self.name, self.calls = name, calls

    def draw(self, model, process, x_T, steps, eta, generator, clip_x0, return_intermediates, prediction, spacing):
        return SOLVERS[self.name](model, process.grid(steps, spacing), x_T, clip_x0, return_intermediates, prediction)

    def evaluations(self, steps, timesteps) -> int:
        return self.calls(steps)


class MeanFlowSampler(Sampler):
    """MeanFlow's few-step sampler (`meanflow_sample`), for MeanFlow models and no others."""

    name = "meanflow"

    def check(self, process, steps, eta, spacing, prediction=None, guidance_interval=None) -> None:
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

    def ignored(self, process, steps, eta) -> None:
        pass  # `check` refuses what it would not use

    def draw(self, model, process, x_T, steps, eta, generator, clip_x0, return_intermediates, prediction, spacing):
        return meanflow_sample(model, process, x_T, steps, return_intermediates)


SAMPLERS = {s.name: s for s in (DDPM(), DDIM(), Solver("euler"), Solver("heun", lambda steps: 2 * steps - 1),
                                Solver("dpmpp_2m"), MeanFlowSampler())}
SamplerName = Literal["ddpm", "ddim", "euler", "heun", "dpmpp_2m", "meanflow"]


def sampler_named(name: str) -> Sampler:
    """The sampler of that name; a UserError naming them all for any other."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    model: Model,
    process: Process,
    x_T: Tensor,
    sampler: SamplerName = "ddim",
    steps: int = DEFAULT_STEPS,
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
    chosen = sampler_named(sampler)
    chosen.check(process, steps, eta, spacing, prediction, guidance_interval)
    return chosen.draw(model, process, x_T, steps, eta, generator, clip_x0, return_intermediates, prediction, spacing)


def network_evaluations(sampler: str, steps: int, timesteps: int, guidance_scale: float = 1.0,
                        guided: bool = False) -> int:
    """Network evaluations per sample planned for a sampler (one per step; Heun: two, but one onto the last level;
    DDPM: all T steps), twice that under guidance on every level (`sample` counts the ones made: `Evaluations`)."""
    calls = sampler_named(sampler).evaluations(steps, timesteps)
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
