"""`CheckpointTeacher`: a `fit` checkpoint as the frozen teacher of a few-step student, with the teacher's guidance
(classifier-free, autoguidance by its own guide or a guide checkpoint, on an interval of noise levels, or none)."""

import hashlib
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from diffusion_lit.core.errors import UserError, say
from diffusion_lit.io.couplings import Couplings
from diffusion_lit.io.loading import load_kin
from diffusion_lit.model.guidance import GuideCondition, Interval, check_guide_condition, check_interval, guided
from diffusion_lit.model.latent import absolute, fingerprint
from diffusion_lit.model.targets import split, target
from diffusion_lit.model.teacher import Teacher
from diffusion_lit.sampling.samplers import sample


class Loaded(NamedTuple):
    """A teacher once read: its EMA network, its guide (or None), what it predicts, its fingerprint, and whether its
    samples are clipped to [-1, 1] (pixels) or not (latents)."""

    net: nn.Module
    guide: nn.Module | None
    prediction: str
    fingerprint: str
    clip_x0: bool


ADVICE = "a teacher is a model of the student's process, data and space (train it with the student's autoencoder)"


class CheckpointTeacher(Teacher):
    """The EMA denoiser of a `fit` checkpoint, guided as `sample` would guide it, whose velocity a MeanFlow student
    learns (`model.teacher`; the student starts from its weights through `InitFrom`). Read and checked when `fit`
    starts: the same process, image shape, conditioning and space (the same autoencoder, by fingerprint) as the
    student. Not saved in the student's checkpoints; its fingerprint (weights, guide, guidance) is, and a resumed
    run refuses another teacher.

    Args:
        ckpt_path: the teacher's checkpoint (a flow model predicting v or x0).
        guidance_scale: the teacher's guidance w, D_weak + w (D - D_weak); 1: none.
        guide_ckpt: autoguidance's weak model, a checkpoint of the same data (such as a `GuideCheckpoint`'s
            guide.ckpt); unset, the teacher's own guide (its `model.guide`) or, for a class model, its null label.
        guidance_interval: guide only on noise levels sigma / alpha in (LO, HI] (unset: all).
        guide_condition: ``same`` (the guide sees each row's label) or ``null`` (the null label).
        steps: the teacher's DDIM steps at eta 0 (its ODE; Euler on the flow) when it draws a sample for MeanFlow's
            `endpoint_share` rows.
        couplings: draw this many (noise, sample) pairs once when `fit` starts (with a progress bar; kept, and
            reused by every student of this teacher and guidance) and give the `endpoint_share` rows pairs drawn
            from them; 0: a fresh sample of each row's noise at every step.
        couplings_dir: where the pairs are kept; unset: beside the teacher's checkpoint, in a folder named by the
            teacher's fingerprint. A folder of another teacher's pairs is refused.
    """

    def __init__(self, ckpt_path: str, guidance_scale: float = 1.0, guide_ckpt: str | None = None,
                 guidance_interval: Interval | None = None, guide_condition: GuideCondition = "same",
                 steps: int = 14, couplings: int = 0, couplings_dir: str | None = None) -> None:
        if steps < 1 or couplings < 0:
            raise UserError(f"the teacher's steps must be at least 1 and its couplings not negative, got {steps} "
                            f"and {couplings}")
        if guidance_scale < 0:
            raise UserError(f"the teacher's guidance_scale must not be negative (1: no guidance), got {guidance_scale}")
        check_guide_condition(guide_condition)
        self.ckpt_path, self.guide_ckpt = absolute(str(ckpt_path)), absolute(guide_ckpt)
        self.guidance_scale = float(guidance_scale)
        self.guidance_interval = None if guidance_interval is None else check_interval(guidance_interval)
        self.guide_condition, self.steps = guide_condition, steps
        self.couplings, self.couplings_dir = couplings, absolute(couplings_dir)
        self.loaded: Loaded | None = None  # once bound
        self.store: Couplings | None = None

    def __getstate__(self) -> dict:  # a student's hyperparameters may hold this object: never its networks
        return {**self.__dict__, "loaded": None, "store": None}

    def bind(self, module, recorded: dict | None = None) -> None:
        what = f"teacher {self.ckpt_path}"
        if not Path(self.ckpt_path).is_file():
            raise UserError(f"{what}: no such checkpoint; train the teacher first (the student's config names its "
                            "command in its header), or give model.teacher's ckpt_path the teacher's last.ckpt")
        if module.conditioning.captions:
            raise UserError(f"{what}: a text model's teacher would need its own text encoder, which is not "
                            "supported; tune a class or unconditional student")
        teacher = load_kin(self.ckpt_path, module, what, "the teacher", ADVICE, ignore=("prediction",))
        if teacher.objective.prediction == "u":  # a MeanFlow teacher: its u(z, t, t) is the velocity
            raise UserError(f"{what}: the teacher is a MeanFlow model; teach from the flow model it was tuned from")
        guide = self.weak_side(teacher, module)
        nets = [teacher.denoiser()] + ([guide] if guide is not None else [])
        for net in nets:
            net.eval().requires_grad_(False).to(module.device)
        self.loaded = Loaded(nets[0], guide, teacher.objective.prediction, self.weights_fingerprint(nets),
                             teacher.latent.clip_x0)
        self.check_record(recorded)  # before drawing anything
        say(f"teacher: {self.ckpt_path}, {self.guidance_in_words()}")
        if self.couplings:
            folder = self.couplings_dir or Path(self.ckpt_path).parent / f"couplings-{self.loaded.fingerprint}"
            self.store = Couplings(folder, self.couplings, self.loaded.fingerprint, module.shape,
                                   module.conditioning.num_classes)
            self.store.fill(lambda noise, labels: self.draw(module.process, noise, labels), module.device,
                            module._trainer)

    def weak_side(self, teacher, module) -> nn.Module | None:
        """The guide the teacher is guided by: a guide checkpoint, its own guide, or none (no guidance, or a class
        model's null label)."""
        if self.guidance_scale == 1.0:
            if self.guide_ckpt is not None:
                raise UserError(f"teacher guide_ckpt {self.guide_ckpt} is unused at guidance_scale 1: give the "
                                "teacher a guidance_scale, or leave guide_ckpt out")
            return None
        if self.guide_ckpt is not None:
            if not Path(self.guide_ckpt).is_file():
                raise UserError(f"teacher guide_ckpt {self.guide_ckpt}: no such checkpoint; give the guide the "
                                "teacher was sampled with (such as its run's guide.ckpt)")
            return load_kin(self.guide_ckpt, teacher, f"teacher guide_ckpt {self.guide_ckpt}", "the guide",
                            "give the guide the teacher is sampled with (an earlier or smaller run of its data)"
                            ).denoiser()
        if teacher.guide is not None:
            return teacher.guide.ema.module
        if not module.conditioning.conditional:
            raise UserError(f"teacher {self.ckpt_path}: guidance_scale {self.guidance_scale:g} needs a weak side, and "
                            "this unconditional teacher has no guide of its own: give the teacher's guide_ckpt "
                            "(such as its run's guide.ckpt)")
        return None  # classifier-free: the null label

    def guidance_in_words(self) -> str:
        if self.guidance_scale == 1.0:
            return "unguided"
        own = self.loaded is not None and self.loaded.guide is not None
        weak = self.guide_ckpt or ("its own guide" if own else "the null label")
        interval = f" on noise levels {self.guidance_interval}" if self.guidance_interval else ""
        return f"guided at w {self.guidance_scale:g} by {weak}{interval}"

    def weights_fingerprint(self, nets: list[nn.Module]) -> str:
        settings = f"{self.guidance_scale}|{self.guidance_interval}|{self.guide_condition}|{self.steps}"
        return hashlib.sha256("|".join([*map(fingerprint, nets), settings]).encode()).hexdigest()[:16]

    def guided_model(self, process, y: Tensor | None):
        """The guided teacher as the samplers call it, (x_t, network time) -> its prediction."""
        if self.loaded is None:
            raise UserError("a student's loss needs its teacher, which is read when `fit` starts: compute it in `fit` "
                            "(sample and evaluate need no teacher)")
        return guided(self.loaded.net, y, self.guidance_scale, guide=self.loaded.guide, interval=self.guidance_interval,
                      schedule=process, guide_condition=self.guide_condition)

    @torch.no_grad()
    def velocity(self, process, z: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.guided_model(process, y)(z, process.network_time(t)).to(z.dtype)
        prediction = self.loaded.prediction
        if prediction == "v":
            return out
        alpha, sigma = process.alpha_sigma(t, z.ndim)
        return target("v", process, *split(prediction, process, out, z, alpha, sigma), alpha, sigma)

    @torch.no_grad()
    def draw(self, process, noise: Tensor, y: Tensor | None = None) -> Tensor:
        return sample(self.guided_model(process, y), process, noise, sampler="ddim", steps=self.steps, eta=0.0,
                      prediction=self.loaded.prediction, clip_x0=self.loaded.clip_x0)

    def endpoints(self, process, noise: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.store is None:
            return super().endpoints(process, noise, y)
        return self.store.pick(len(noise), noise.device, generator)

    def record(self) -> dict:
        return {"fingerprint": None if self.loaded is None else self.loaded.fingerprint, "ckpt_path": self.ckpt_path,
                "guide_ckpt": self.guide_ckpt, "guidance": self.guidance_in_words()}
