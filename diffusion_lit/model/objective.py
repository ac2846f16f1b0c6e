"""The training objective, a part that a config names (`model.objective`): what the network predicts, how training
draws t, how the loss is weighted, and the loss itself. `Objective` is the diffusion loss on eps, v or x0;
`MeanFlow` learns the flow's average velocity over an interval, for one-step sampling."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion_lit.core.errors import UserError
from diffusion_lit.model.schedule import TimeSampling
from diffusion_lit.model.targets import AVERAGE_VELOCITY, PREDICTIONS, Prediction, min_snr_weight, target

Weighting = Literal["none", "min_snr"]


class Objective:
    """The diffusion objective: the MSE between the network's prediction and its target at a drawn t, weighted per
    sample by Min-SNR-gamma when asked (with eps, uniform t and no weighting: DDPM's simple loss).

    Args:
        prediction: what the network predicts: ``eps``, ``v`` (VP: alpha eps - sigma x0; flow: eps - x0) or ``x0``;
            unset, the process's own (eps for VP, v for the flow).
        loss_weighting: ``none`` (the plain MSE on the prediction) or ``min_snr`` (Min-SNR-gamma, Hang et al. 2023).
        snr_gamma: gamma of Min-SNR-gamma.
        t_sampling: how training draws t: ``uniform`` or ``logit_normal`` (SD3's, mean 0, std 1); unset, the
            process's own (uniform for VP, logit-normal for the flow).
    """

    guided = False  # whether `loss` reads what it guides with (guidance folded into training)

    def __init__(self, prediction: Prediction | None = None, loss_weighting: Weighting = "none",
                 snr_gamma: float = 5.0, t_sampling: TimeSampling | None = None) -> None:
        if prediction not in (None, *PREDICTIONS):
            raise UserError(f"unknown prediction {prediction!r}: use 'eps', 'v' or 'x0'")
        if loss_weighting not in ("none", "min_snr") or snr_gamma <= 0:
            raise UserError(f"loss_weighting must be 'none' or 'min_snr' with snr_gamma > 0, got {loss_weighting!r} "
                            f"and {snr_gamma}")
        if t_sampling not in (None, "uniform", "logit_normal"):
            raise UserError(f"unknown t_sampling {t_sampling!r}: use 'uniform' or 'logit_normal'")
        self.prediction, self.loss_weighting, self.snr_gamma, self.t_sampling = (
            prediction, loss_weighting, snr_gamma, t_sampling)

    def net_kwargs(self) -> dict:
        """What the network factory takes beside (in_channels, image_size, num_classes): nothing here."""
        return {}

    def check_parts(self, conditioning, guide, teacher=None) -> None:
        """A UserError when this objective cannot train a model with that conditioning, guide and teacher: a teacher
        teaches MeanFlow students only."""
        if teacher is not None:
            raise UserError("model.teacher teaches a few-step student, whose objective is MeanFlow: add "
                            "--model.objective MeanFlow (and --model.process Flow), or leave the teacher out")

    def bind(self, process) -> "Objective":
        """This objective on `process`: its unset choices filled in with the process's own, a prediction that
        cannot be sampled there refused."""
        self.prediction = self.prediction or process.default_prediction
        self.t_sampling = self.t_sampling or process.default_t_sampling
        if self.prediction not in process.predictions:
            raise UserError(f"prediction {self.prediction} cannot be sampled on {type(process).__name__} (x0 is lost "
                            f"where alpha is 0): use {' or '.join(process.predictions)}")
        return self

    def loss(self, net: nn.Module, process, x0: Tensor, y: Tensor | None = None,
             generator: torch.Generator | None = None, **guidance) -> Tensor:
        """The loss of `net` on the clean batch x0 (conditions y), its t and noise drawn with `generator`. A `guided`
        objective is also given what it guides with (`MeanFlow.loss`'s `null` or `weak`)."""
        t = process.draw_t(x0.shape[0], self.t_sampling, x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        alpha, sigma = process.alpha_sigma(t, x0.ndim)
        out = net(alpha * x0 + sigma * eps, process.network_time(t), y)
        goal = target(self.prediction, process, x0, eps, alpha, sigma)
        if self.loss_weighting == "none":
            return F.mse_loss(out, goal)
        weight = min_snr_weight(self.prediction, process, alpha, sigma, self.snr_gamma)
        return (weight.flatten() * (out.float() - goal).pow(2).flatten(1).mean(1)).mean()


class MeanFlow(Objective):
    """MeanFlow (Geng, Deng, Bai, Kolter & He 2025): the network learns the flow's average velocity over an interval,
    u(z_t, r, t) = 1 / (t - r) ∫_r^t v(z_s, s) ds, so that one step z_r = z_t - (t - r) u(z_t, r, t) moves along it
    (sampler ``meanflow``; one step from t = 1 to 0 draws an image). On the flow process only.

    The loss is the flow-matching loss with the target u_tgt = v - (t - r) (v · ∂_z u + ∂_t u), the bracket from one
    forward-mode `jvp` of the network with tangents (v, 0, 1) on (z, r, t), and u_tgt held fixed (stop-gradient).
    Where r = t the target is v itself: plain flow matching. Each sample's squared error ||Δ||² (its mean over the
    elements) is weighted by w = 1 / (||Δ||² + c)^p, held fixed. The value returned (`train/loss`, `val/loss`) is the
    unweighted mean of ||Δ||², comparable with a flow model's loss; its gradient is the weighted loss's.

    The network takes two times per image, (t, t - r) on the flow's 1000 t scale (`net_kwargs`: its
    `interval_input`). The jvp runs in float32 or wider, outside autocast, with attention on its math kernel (the
    fused ones have no forward-mode rule); the loss keeps its gradient path to the weights through the primal
    output, so data-parallel training averages gradients as usual.

    Args:
        flow_matching_share: the share of each batch with r = t (plain flow matching); the paper's 0.75.
        t_mean: the mean of logit(t) and logit(r): both ends are drawn logit-normal, then sorted so that r <= t
            (the paper's ImageNet setting -0.4; CIFAR-10: -2.0).
        t_std: their standard deviation (ImageNet 1.0; CIFAR-10 2.0).
        p: the adaptive weight's power; 0 is the plain squared error (the paper's best: 1; CIFAR-10: 0.75).
        c: the adaptive weight's constant, on the mean over elements (the paper's c on the sum over D elements is
            c / D here; Adam does not see the constant factor D^(1 - p) between the two).
        guidance_scale: guidance folded into training (the paper's omega; 1: none). The velocity the target is built
            from, and the jvp's tangent, is the guided one, v~ = omega v + kappa u(z, t, t | c) + (1 - omega - kappa)
            u_weak, the u from the network itself without gradient. For class and text models u_weak is
            u(z, t, t | null) (classifier-free guidance; rows whose condition was dropped keep v); for a model
            without conditions it is the velocity of the guide trained beside it (`model.guide`: autoguidance). One
            step then draws a guided sample at the effective scale omega / (1 - kappa), and the sampler needs no
            guidance of its own.
        guidance_mix: the paper's kappa, in [0, 1): the share of the network's own conditional velocity in v~.
        endpoint_share: with a `model.teacher`, the share of each batch (its last rows) set to r = 0, t = 1 whose
            target is the teacher's own sample of that noise (its ODE, `Teacher.draw`): u(eps, 0, 1) regressed on
            eps - x0_teacher, the one-step map itself (knowledge distillation, Luhman & Luhman 2021), beside the
            MeanFlow identity on the other rows. 0: none.
    """

    prediction = AVERAGE_VELOCITY

    def __init__(self, flow_matching_share: float = 0.75, t_mean: float = -0.4, t_std: float = 1.0, p: float = 1.0,
                 c: float = 1e-3, guidance_scale: float = 1.0, guidance_mix: float = 0.0,
                 endpoint_share: float = 0.0) -> None:
        # Objective's settings (prediction, weighting, t sampling) mean nothing here: its interface only.
        if not 0.0 <= flow_matching_share <= 1.0:
            raise UserError(f"flow_matching_share must lie in [0, 1] (the share of samples with r = t), got "
                            f"{flow_matching_share}")
        if t_std <= 0 or p < 0 or c <= 0:
            raise UserError(f"MeanFlow needs t_std > 0, p >= 0 and c > 0, got t_std {t_std}, p {p}, c {c}")
        if guidance_scale <= 0 or not 0.0 <= guidance_mix < 1.0:
            raise UserError(f"MeanFlow needs guidance_scale > 0 (1: no guidance) and guidance_mix in [0, 1), got "
                            f"{guidance_scale} and {guidance_mix}")
        if not 0.0 <= endpoint_share <= 1.0 - flow_matching_share:
            raise UserError(f"endpoint_share must lie in [0, 1 - flow_matching_share] (the rows left once r = t is "
                            f"drawn), got {endpoint_share} beside flow_matching_share {flow_matching_share}")
        self.flow_matching_share, self.t_mean, self.t_std, self.p, self.c = flow_matching_share, t_mean, t_std, p, c
        self.endpoint_share = endpoint_share
        self.guidance_scale, self.guidance_mix = guidance_scale, guidance_mix
        self.guided = guidance_scale != 1.0 or guidance_mix != 0.0

    def check_parts(self, conditioning, guide, teacher=None) -> None:
        """A UserError when guidance is folded into training of a model with nothing to guide from (no null
        condition and no guide), or beside a teacher, whose own guidance is the one learnt."""
        if teacher is not None and self.guided:
            raise UserError(f"MeanFlow's guidance_scale {self.guidance_scale:g} (guidance_mix {self.guidance_mix:g}) "
                            "folds the student's own guidance into training, and model.teacher's velocity is the "
                            "target: give the guidance to the teacher (its guidance_scale) and leave MeanFlow's out")
        if self.endpoint_share and teacher is None:
            raise UserError(f"MeanFlow's endpoint_share {self.endpoint_share:g} regresses on a teacher's samples, and "
                            "this model has no model.teacher: add one, or leave endpoint_share out")
        if self.guided and not conditioning.conditional and guide is None:
            raise UserError(f"MeanFlow's guidance_scale {self.guidance_scale:g} (guidance_mix {self.guidance_mix:g}) "
                            "guides from the null condition of a class or text model, or from a guide trained beside "
                            "it, and this model is unconditional with no guide: add --model.conditioning Labels or "
                            "a model.guide, or leave both settings out")

    def net_kwargs(self) -> dict:
        """The network takes a second time, the interval's length t - r."""
        return {"interval_input": True}

    def bind(self, process) -> "MeanFlow":
        """This objective on `process`: a UserError unless it is the flow."""
        if not process.straight:
            raise UserError(f"MeanFlow learns the average velocity of the flow process, and this model's process is "
                            f"{type(process).__name__}: add --model.process Flow")
        return self

    def draw(self, n: int, device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(r, t) for n samples: two logit-normal draws sorted so that r <= t; r = t on the first
        round(flow_matching_share n) samples, (0, 1) on the last round(endpoint_share n)."""
        r, t = torch.sigmoid(self.t_mean + self.t_std * torch.randn(2, n, device=device, generator=generator)).sort(0)[0]
        rows = torch.arange(n, device=device)
        plain = round(self.flow_matching_share * n)
        equal, whole = rows < plain, rows >= max(plain, n - round(self.endpoint_share * n))  # never both
        return torch.where(equal, t, torch.where(whole, 0.0, r)), torch.where(whole, 1.0, t)

    def loss(self, net: nn.Module, process, x0: Tensor, y: Tensor | None = None,
             generator: torch.Generator | None = None, null: tuple | None = None,
             weak: nn.Module | None = None, teacher=None) -> Tensor:
        """The loss of `net` on the clean batch x0 (conditions y), its (r, t) and noise drawn with `generator`.
        Guidance reads `null`, (the null condition for every row, a bool [B] of the rows that hold it), or `weak`,
        a guide network; given neither, the target is the unguided one (the guide's own loss). A `teacher`
        (`diffusion_lit.model.teacher.Teacher`) gives the velocity in place of eps - x0."""
        r, t = self.draw(x0.shape[0], x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return self.loss_at(net, process, x0, eps, r, t, y, null, weak, teacher, generator)

    def loss_at(self, net: nn.Module, process, x0: Tensor, eps: Tensor, r: Tensor, t: Tensor,
                y: Tensor | None = None, null: tuple | None = None, weak: nn.Module | None = None,
                teacher=None, generator: torch.Generator | None = None) -> Tensor:
        """The loss at given draws: noise eps [B, ...] and interval ends r <= t [B]. With a `teacher`, the velocity
        v that builds the target, and the jvp's tangent, is the teacher's at z_t: u_tgt = v_T - (t - r) du/dt along
        the teacher's (guided) flow, whose average velocity the student learns (a flow map distilled)."""
        dtype = torch.promote_types(x0.dtype, torch.float32)  # the jvp in float32 (float64 stays float64)
        x0, eps, r, t = (a.to(dtype) for a in (x0, eps, r, t))
        y = y.to(dtype) if y is not None and y.is_floating_point() else y  # text features made under autocast
        alpha, sigma = process.alpha_sigma(t, x0.ndim)
        z, v = alpha * x0 + sigma * eps, target("v", process, x0, eps, alpha, sigma)  # v = dz/dt = eps - x0
        whole = (r == 0) & (t == 1) if teacher is not None else torch.zeros_like(t, dtype=torch.bool)
        if whole.any():  # the one-step map: u(z_1, 0, 1) = z_1 - x0 of the teacher's own sample from z_1
            rows = whole.nonzero().flatten()
            z1, x1, y1 = teacher.endpoints(process, z[rows], None if y is None else y[rows], generator)
            z, ends = z.index_put((rows,), z1.to(dtype)), z1.to(dtype) - x1.to(dtype)
            y = y if y is None else y.index_put((rows,), y1.to(y.dtype))
        if teacher is not None:  # the other rows' velocity: the teacher's
            rest = (~whole).nonzero().flatten()
            if len(rest):
                taught = teacher.velocity(process, z[rest], t[rest], None if y is None else y[rest])
                v = v.index_put((rest,), taught.to(dtype))
        elif self.guided and (null is not None or weak is not None):
            v = self.guided_velocity(net, process, z, v, t, y, null, weak)
        out, du_dt = u_and_derivative(net, process, z, v, r, t, y, moving=(r < t) & ~whole)
        u_tgt = (v - (t - r).view(-1, *[1] * (x0.ndim - 1)) * du_dt).detach()
        if whole.any():
            u_tgt = u_tgt.index_put((rows,), ends)
        error = (out - u_tgt).pow(2).flatten(1).mean(1)  # ||Δ||² per sample, as a mean over its elements
        weighted = error / (error.detach() + self.c) ** self.p
        return error.detach().mean() + (weighted - weighted.detach()).mean()  # the plain value, the weighted gradient

    @torch.no_grad()
    def guided_velocity(self, net: nn.Module, process, z: Tensor, v: Tensor, t: Tensor, y: Tensor | None,
                        null: tuple | None, weak: nn.Module | None) -> Tensor:
        """v~ = omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u_weak: u_weak from `weak` (a guide network) or
        else from `net` at the null condition, v on the rows that hold it. No gradient."""
        omega, kappa = self.guidance_scale, self.guidance_mix
        times = process.network_time(torch.stack([t, torch.zeros_like(t)], 1))  # u(z, t, t) = v(z, t)
        if weak is not None:
            u_weak, plain = weak(z, times, y), None
        else:
            null_y, plain = null
            u_weak = net(z, times, null_y.to(z.dtype) if null_y.is_floating_point() else null_y)
        u_cond = net(z, times, y).to(v.dtype) if kappa else 0.0
        guided = omega * v + kappa * u_cond + (1 - omega - kappa) * u_weak.to(v.dtype)
        return guided if plain is None else torch.where(plain.view(-1, *[1] * (v.ndim - 1)), v, guided)


def u_and_derivative(net: nn.Module, process, z: Tensor, v: Tensor, r: Tensor, t: Tensor,
                     y: Tensor | None = None, moving: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The network's u(z, r, t) and its derivative along the path z moves on at speed v with r fixed,
    du/dt = v · ∂_z u + ∂_t u: one forward-mode jvp with tangents (v, 0, 1) on (z, r, t). The network sees the times
    (t, t - r) on the process's scale. u keeps its gradient path to the weights.

    With `moving` (a bool [B]), the jvp runs on those rows only; the others get a plain call and a derivative of 0,
    which is all a target that multiplies it by t - r = 0 reads (MeanFlow's rows with r = t): about a third less
    work at the paper's share of 75%."""
    if moving is not None and not moving.all():
        u, du_dt = torch.empty_like(z), torch.zeros_like(z)
        still, move = (~moving).nonzero().flatten(), moving.nonzero().flatten()
        pick = (lambda rows: None) if y is None else (lambda rows: y[rows])
        with torch.autocast(z.device.type, enabled=False):
            times = process.network_time(torch.stack([t[still], t[still] - r[still]], 1))  # the interval 0
            u = u.index_put((still,), net(z[still], times, pick(still)))
        if len(move):
            u_move, du_move = u_and_derivative(net, process, z[move], v[move], r[move], t[move], pick(move))
            u, du_dt = u.index_put((move,), u_move), du_dt.index_put((move,), du_move)
        return u, du_dt

    def u(z: Tensor, t: Tensor) -> Tensor:  # u(z, r, t) at these r
        return net(z, process.network_time(torch.stack([t, t - r], dim=1)), y)

    # bf16 autocast has no jvp on the CPU, nor the fused attention kernels a forward-mode rule.
    with torch.autocast(z.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(u, (z, t), (v, torch.ones_like(t)))
