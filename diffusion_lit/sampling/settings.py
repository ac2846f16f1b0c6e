"""How images are drawn from a model: one set of sampler settings that `sample`, `evaluate`, `SampleGrid` and `FID`
share (the commands take them as flat flags, `--steps 20`; the callbacks as `sampling: {steps: 20}`)."""

from dataclasses import asdict, dataclass

from diffusion_lit.core.errors import UserError, say
from diffusion_lit.model.guidance import GuideCondition, Interval, check_interval, check_guide_condition
from diffusion_lit.sampling.samplers import DEFAULT_STEPS, SamplerName, sampler_named
from diffusion_lit.model.grids import Spacing

MAX_GUIDANCE = 20.0  # past this the images saturate; usual scales lie between 1.5 and 8


@dataclass
class Sampling:
    """The sampler and its guidance.

    Args:
        sampler: ``ddim``, ``ddpm`` (ancestral, all T steps of a VP model), or an ODE solver: ``euler``, ``heun``
            (EDM's second order: two network evaluations per step) or ``dpmpp_2m`` (DPM-Solver++(2M)); ``meanflow``
            for a MeanFlow model (and only there: 1 or 2 steps).
        steps: DDIM steps, or the solver's levels (ddpm walks all T timesteps and takes none).
        eta: DDIM eta: 0 deterministic, 1 as noisy as DDPM (the other samplers take none).
        guidance_scale: guidance w in [0, 20]: D_weak + w (D - D_weak), where D_weak is the model at the null
            condition (classifier-free guidance) or a guide (autoguidance); 1 is the model alone, 0 D_weak alone.
        spacing: the steps' spacing: ``linspace``, ``trailing`` (DDIM) or ``karras`` (the ODE solvers).
        guidance_interval: ``[LO, HI]``: guide only at noise levels sigma / alpha in (LO, HI].
        guide_ckpt: autoguidance from this checkpoint's EMA denoiser (an earlier or smaller run of the same kind).
        guide_condition: ``same`` (the guide sees each sample's label or prompt) or ``null`` (the null one).
        stack_guidance: guide a MeanFlow model trained with guidance folded in (MeanFlow's guidance_scale) once more,
            at guidance_scale: refused without it, since its one step is guided already.
    """

    sampler: SamplerName = "ddim"
    steps: int = DEFAULT_STEPS
    eta: float = 0.0
    guidance_scale: float = 1.0
    spacing: Spacing = "linspace"
    guidance_interval: Interval | None = None
    guide_ckpt: str | None = None
    guide_condition: GuideCondition = "same"
    stack_guidance: bool = False

    def check(self, process) -> None:
        """A UserError for settings that no sampler takes on this process, or that this sampler would ignore,
        before any network call."""
        sampler = sampler_named(self.sampler)
        sampler.ignored(process, self.steps, self.eta)
        sampler.check(process, self.steps, self.eta, self.spacing)
        check_interval(self.guidance_interval)
        check_guide_condition(self.guide_condition)
        if not 0.0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise UserError(
                f"guidance_scale must lie in [0, {MAX_GUIDANCE:g}], got {self.guidance_scale:g}: 1 is the model alone, "
                "above 1 pushes toward the condition (away from the guide) more strongly, 1.5 to 8 are usual and past "
                f"{MAX_GUIDANCE:g} the images saturate; below 1 moves toward the weak side (the null condition, or the "
                "guide) and 0 is the weak side alone, so a negative scale would push away from the condition")

    def check_model(self, module, guide: bool) -> None:
        """A UserError for settings this model cannot use (`guide`: a guide checkpoint was given)."""
        sampler_named(self.sampler).check(module.process, self.steps, self.eta, self.spacing,
                                          module.objective.prediction, self.guidance_interval)  # meanflow: MeanFlow only
        folded = module.objective  # guidance folded into training: the sampler's would guide a guided model again
        if folded.guided and self.guidance_scale != 1.0 and not self.stack_guidance:
            scale = folded.guidance_scale / (1 - folded.guidance_mix)  # the effective scale of its samples
            raise UserError(f"guidance_scale {self.guidance_scale:g}: this MeanFlow model has guidance folded into it "
                            f"(trained with MeanFlow's guidance_scale {folded.guidance_scale:g}, guidance_mix "
                            f"{folded.guidance_mix:g}: its samples are guided as at scale {scale:g}); leave "
                            "guidance_scale out, or give stack_guidance true (--stack_guidance true) to guide it once "
                            "more, at twice the network evaluations")
        if self.guide_condition != "null":
            return
        if not module.conditioning.conditional:
            raise UserError("guide_condition null gives the guide the null label or empty prompt, and this model is "
                            "unconditional (it has neither): leave guide_condition out")
        if module.guide is None and not guide:
            raise UserError("guide_condition null says what a guide is given, and there is no guide (guide_ckpt, or "
                            "model.guide); without one the weak side is already the model at the null condition "
                            "(classifier-free guidance): leave guide_condition out")

    def for_model(self, module, guide: bool, who: str) -> "Sampling":
        """These settings for `module`: a guidance scale for a model with nothing to guide against (unconditional,
        no guide) is dropped, said once by `who`; a UserError for settings it cannot use (`check_model`)."""
        self.check_model(module, guide)
        if module.conditioning.conditional or module.guide is not None or guide or self.guidance_scale == 1.0:
            return self
        say(f"{who}: guidance_scale {self.guidance_scale} is ignored, since this model is unconditional "
            "(model.conditioning is left out or the data has no labels) and has no guide (model.guide, or "
            "guide_ckpt)")
        return Sampling(**{**asdict(self), "guidance_scale": 1.0})

    def kwargs(self) -> dict:
        """What `samplers.sample` and `samplers.generate` take of them (the guide checkpoint is loaded apart)."""
        return {k: v for k, v in asdict(self).items() if k not in ("guide_ckpt", "stack_guidance")}
