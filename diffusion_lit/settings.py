"""How images are drawn from a model: one set of sampler settings that `sample`, `evaluate`, `SampleGrid` and `FID`
share (the commands take them as flat flags, `--steps 20`; the callbacks as `sampling: {steps: 20}`)."""

from dataclasses import asdict, dataclass

from diffusion_lit.errors import say
from diffusion_lit.guidance import GuideCondition, Interval, check_interval, check_guide_condition
from diffusion_lit.sampling import Sampler, check_sampler
from diffusion_lit.solvers import Spacing


@dataclass
class Sampling:
    """The sampler and its guidance.

    Args:
        sampler: ``ddim``, ``ddpm`` (ancestral, all T steps of a VP model), or an ODE solver: ``euler``, ``heun``
            (EDM's second order: two network evaluations per step) or ``dpmpp_2m`` (DPM-Solver++(2M)).
        steps: DDIM steps, or the solver's levels.
        eta: DDIM eta: 0 deterministic, 1 as noisy as DDPM.
        guidance_scale: guidance w: D_weak + w (D - D_weak), where D_weak is the model at the null condition
            (classifier-free guidance) or a guide (autoguidance); 1 is the model alone.
        spacing: the steps' spacing: ``linspace``, ``trailing`` (DDIM) or ``karras`` (the ODE solvers).
        guidance_interval: ``[LO, HI]``: guide only at noise levels sigma / alpha in (LO, HI].
        guide_ckpt: autoguidance from this checkpoint's EMA denoiser (an earlier or smaller run of the same kind).
        guide_condition: ``same`` (the guide sees each sample's label or prompt) or ``null`` (the null one).
    """

    sampler: Sampler = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    spacing: Spacing = "linspace"
    guidance_interval: Interval | None = None
    guide_ckpt: str | None = None
    guide_condition: GuideCondition = "same"

    def check(self, process) -> None:
        """A UserError for settings that no sampler takes on this process, before any network call."""
        check_sampler(self.sampler, process, self.steps, self.eta, self.spacing)
        check_interval(self.guidance_interval)
        check_guide_condition(self.guide_condition)

    def for_model(self, module, guide: bool, who: str) -> "Sampling":
        """These settings for `module`: a guidance scale for a model with nothing to guide against (unconditional,
        no guide) is dropped, said once by `who`."""
        if module.conditioning.conditional or module.guide is not None or guide or self.guidance_scale == 1.0:
            return self
        say(f"{who}: guidance_scale {self.guidance_scale} is ignored, since this model is unconditional "
            "(model.conditioning is left out or the data has no labels) and has no guide (model.guide, or "
            "guide_ckpt)")
        return Sampling(**{**asdict(self), "guidance_scale": 1.0})

    def kwargs(self) -> dict:
        """What `sampling.sample` and `sampling.generate` take of them (the guide checkpoint is loaded apart)."""
        return {k: v for k, v in asdict(self).items() if k != "guide_ckpt"}
