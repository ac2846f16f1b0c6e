"""A teacher for few-step students (`model.teacher`): a frozen model whose guided velocity a MeanFlow student learns
in place of the noisy eps - x0. Without labels, MeanFlow's target e - x averages the modes into ambiguous digits; a
teacher's velocity is the conditional expectation itself, and with its guidance (autoguidance needs no labels)
the student learns the guided teacher's flow map (Align Your Flow, arXiv 2506.14603; Decoupled MeanFlow,
arXiv 2510.24474).

This is the part's interface; `diffusion_lit.io.teacher.CheckpointTeacher` is the teacher read from a `fit`
checkpoint. A teacher is loaded when `fit` starts, never saved inside the student's checkpoint (its fingerprint is),
and a student samples without it."""

import torch
from torch import Tensor

from diffusion_lit.core.errors import UserError


class Teacher:
    """A frozen velocity field v(z, t | y) on the flow process, dz/dt along the path from data (t = 0) to noise."""

    def bind(self, module, recorded: dict | None = None) -> None:
        """Loads the teacher and checks it against the student `module` (process, shape, space, conditioning) and,
        for a resumed run, against the teacher it `recorded` (`check_record`): a UserError naming the first
        mismatch, before any long work. Called when `fit` starts."""

    def velocity(self, process, z: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The teacher's (guided) velocity at the states z [B, ...] and flow times t [B] in [0, 1]; no gradient."""
        raise NotImplementedError

    def draw(self, process, noise: Tensor, y: Tensor | None = None) -> Tensor:
        """The teacher's own sample from `noise` at t = 1, by its deterministic ODE (so a map of the noise); no
        gradient. What MeanFlow's `endpoint_share` rows regress on."""
        raise NotImplementedError(f"{type(self).__name__} draws no samples: leave MeanFlow's endpoint_share at 0")

    def endpoints(self, process, noise: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(z_1, x_0, y) for the rows that learn the whole interval: here the noise given, the teacher's sample of it
        and y; a teacher may give pairs it drew before instead (picked with `generator`, and their conditions)."""
        return noise, self.draw(process, noise, y), y

    def record(self) -> dict:
        """What the student's checkpoint records of it: at least its `fingerprint`, which a resumed run compares."""
        return {"fingerprint": None}

    def check_record(self, recorded: dict | None) -> None:
        """A UserError when a resumed run `recorded` a teacher of another fingerprint than this one's."""
        found, theirs = self.record()["fingerprint"], (recorded or {}).get("fingerprint")
        if theirs not in (None, found):
            raise UserError(f"this run learnt from a teacher of fingerprint {theirs} ({recorded.get('ckpt_path')}, "
                            f"{recorded.get('guidance')}), and model.teacher is {found}: resume with the teacher and "
                            "guidance it started with, or start a new run")
