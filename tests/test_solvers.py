"""The ODE solvers: against diffusers' schedulers step for step, against the exact answer on Gaussian data, and
the identities between them (Euler's step is DDIM's)."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
)

from diffusion_lit.sampling.samplers import ddim_sample, network_evaluations, sample
from diffusion_lit.model.process import Flow, VP
from diffusion_lit.model.grids import Grid, edm_sigmas, vp_grid
from diffusion_lit.sampling.solvers import ddim_grid_sample, dpmpp_2m_sample, euler_sample, heun_sample
from diffusion_lit.model.targets import split, target

SCHEDULE = VP("linear", 1000)


def smooth_model(x_t, t):
    """A fixed, nonlinear eps predictor of x_t and (possibly fractional) t."""
    return 0.8 * torch.tanh(x_t) + 0.1 * torch.sin(t.float() / 100).view(-1, 1, 1, 1)


def grid_of(timesteps, sigmas) -> Grid:
    """Our grid from a diffusers scheduler's timesteps and EDM sigmas (the last 0)."""
    return Grid.vp(torch.as_tensor(timesteps).float(), torch.as_tensor(sigmas, dtype=torch.float64), VP())


def run_diffusers(scheduler, x: torch.Tensor, scale_input: bool) -> torch.Tensor:
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if scale_input else x
        x = scheduler.step(smooth_model(model_input, t.expand(len(x))), t, x).prev_sample
    return x


# float32 on both sides, coefficients rounded differently (diffusers keeps its schedule in float32, we compute the
# grid in float64). The fixed model is no denoiser, so the states grow to hundreds at high noise: agreement to 1e-5
# of their size says the same steps were taken; a wrong coefficient, a skipped correction or an off-by-one level
# moves the result by percents.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}


def test_first_order_is_ddim_on_diffusers_trailing_steps():
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                              timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    theirs = run_diffusers(scheduler, x_T, scale_input=False)
    sigmas = edm_sigmas(SCHEDULE)[scheduler.timesteps.long()]
    ours = euler_sample(smooth_model, grid_of(scheduler.timesteps, torch.cat([sigmas, torch.zeros(1)])), x_T)
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpmpp_2m_matches_diffusers(kind):
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear" if kind == "linear" else "squaredcos_cap_v2",
                                            algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(12)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    theirs = run_diffusers(scheduler, x_T, scale_input=False)
    sigmas = edm_sigmas(VP(kind, 1000))[scheduler.timesteps.long()]
    ours = dpmpp_2m_sample(smooth_model, grid_of(scheduler.timesteps, torch.cat([sigmas, torch.zeros(1)])), x_T)
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


@pytest.mark.parametrize("solver,scheduler_class", [(euler_sample, EulerDiscreteScheduler),
                                                    (heun_sample, HeunDiscreteScheduler)], ids=["euler", "heun"])
def test_euler_and_heun_on_karras_sigmas_match_diffusers(solver, scheduler_class):
    # DDPM's betas, named: HeunDiscreteScheduler's defaults are Stable Diffusion's
    scheduler = scheduler_class(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, use_karras_sigmas=True)
    scheduler.set_timesteps(8)
    grid = vp_grid(SCHEDULE, 8, "karras")  # our own Karras grid: the same levels and timesteps as theirs
    reference = EulerDiscreteScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, use_karras_sigmas=True)
    reference.set_timesteps(8)
    torch.testing.assert_close(grid.level.float(), reference.sigmas, rtol=1e-5, atol=0)
    torch.testing.assert_close(grid.t, reference.timesteps.float(), rtol=0, atol=1e-3)

    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    theirs = run_diffusers(scheduler, noise * scheduler.init_noise_sigma, scale_input=True)
    ours = solver(smooth_model, grid, noise * scheduler.init_noise_sigma * float(grid.alpha[0]))  # their x~ as x_t
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


def test_euler_on_ddims_steps_is_ddim():
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for steps in (1, 7, 50):
        ddim = ddim_sample(smooth_model, SCHEDULE, x_T, steps=steps, clip_x0=False)
        euler = euler_sample(smooth_model, vp_grid(SCHEDULE, steps), x_T)
        torch.testing.assert_close(euler, ddim, **TOLERANCE)
    # and DPM-Solver++'s first step is the same first-order step
    one = vp_grid(SCHEDULE, 1)
    torch.testing.assert_close(dpmpp_2m_sample(smooth_model, one, x_T), euler_sample(smooth_model, one, x_T))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_diffusers(shift):
    """Our Euler on a flow grid is FlowMatchEulerDiscreteScheduler's step, shift included (SD3's sampler)."""
    steps = 10
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1, 1 / steps, steps))  # the unshifted levels our grid uses
    grid = Flow(shift).grid(steps)
    torch.testing.assert_close(grid.sigma.float(), scheduler.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(grid.t, scheduler.timesteps, rtol=0, atol=1e-3)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    theirs = run_diffusers(scheduler, x_T, scale_input=False)
    ours = euler_sample(smooth_model, grid, x_T, prediction="v")
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


def test_flow_heun_matches_diffusers():
    """Our Heun on the flow's own levels is FlowMatchHeunDiscreteScheduler's (Euler alone onto t = 0 on both sides)."""
    scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)  # their levels: 1 to 1/1000, shifted; ours are taken from them
    levels = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2], scheduler.sigmas[-1:]]).double()
    grid = Grid(1000 * levels[:-1].float(), 1 - levels, levels, torch.ones_like(levels), Flow())
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    theirs = run_diffusers(scheduler, x_T, scale_input=False)
    ours = heun_sample(smooth_model, grid, x_T, prediction="v")
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


def test_euler_on_the_flow_is_ddim():
    """DDIM's update x' = alpha' x0 + sigma' eps (eta 0), written out on the flow's levels, is Euler's step."""
    grid = Flow(2.0).grid(12)
    x = x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for i in range(len(grid.t)):
        alpha, sigma = float(grid.alpha[i]), float(grid.sigma[i])
        x0, eps = split("v", Flow(), smooth_model(x, grid.t[i].expand(2)), x, alpha, sigma)
        x = float(grid.alpha[i + 1]) * x0 + float(grid.sigma[i + 1]) * eps
    torch.testing.assert_close(euler_sample(smooth_model, grid, x_T, prediction="v"), x, **TOLERANCE)
    # and the samplers take `ddim` on a flow model as that same step
    torch.testing.assert_close(sample(smooth_model, Flow(2.0), x_T, "ddim", 12, prediction="v",
                                      clip_x0=False), x, **TOLERANCE)


def test_ddim_on_a_grid_is_ddim_with_noise_too():
    """The grid form of DDIM (any process) takes VP's Eq. 12 and 16 step for step at eta 1, noise included."""
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ddim = ddim_sample(smooth_model, SCHEDULE, x_T, steps=9, eta=1.0, generator=torch.Generator().manual_seed(2),
                       clip_x0=False)
    grid = ddim_grid_sample(smooth_model, vp_grid(SCHEDULE, 9), x_T, eta=1.0,
                            generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(grid, ddim, **TOLERANCE)


def gaussian_model(schedule, prediction: str, mean: float, std: float):
    """The exact model for data x0 ~ N(mean, std²): E[x0 | x_t] in closed form at the level's alpha and sigma, given
    as the target `prediction` (a fractional VP timestep is placed by log-sigma, as the grids place it)."""
    if schedule.discrete:
        log_sigmas = edm_sigmas(schedule).log().numpy()

    def model(x_t, t):
        x_t = x_t.double()
        if schedule.discrete:
            s = torch.from_numpy(np.exp(np.interp(t.double().numpy(), np.arange(len(log_sigmas)), log_sigmas)))
            alpha = (1 / (1 + s**2).sqrt()).view(-1, 1, 1, 1)
            sigma = alpha * s.view(-1, 1, 1, 1)
        else:
            alpha, sigma = schedule.alpha_sigma(t.double() / schedule.timesteps, 4)
        x0 = mean + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (x_t - alpha * mean)
        eps = (x_t - alpha * x0) / sigma
        return target(prediction, schedule, x0, eps, alpha, sigma).float()

    return model


VP_RUNS = [("ddim", "linspace"), ("euler", "karras"), ("heun", "linspace"), ("heun", "karras"),
           ("dpmpp_2m", "linspace"), ("dpmpp_2m", "karras")]
FLOW_RUNS = [("euler", "linspace"), ("heun", "linspace"), ("dpmpp_2m", "linspace")]


@pytest.mark.parametrize("kind,prediction", [("linear", "eps"), ("cosine", "eps"), ("cosine", "v"), ("cosine", "x0"),
                                             ("flow", "v"), ("flow", "x0")])
def test_every_solver_turns_noise_into_the_gaussian_data(kind, prediction):
    """For x0 ~ N(m, std²), x_t ~ N(alpha m, alpha² std² + sigma²) and the probability-flow ODE keeps
    z = (x_t - alpha m) / sqrt(alpha² std² + sigma²): it ends at x0 = m + std z_T. Each solver's answer approaches
    it as its steps grow, and its samples have the data's mean and spread, for every target of both processes."""
    schedule = Flow(3.0) if kind == "flow" else VP(kind, 1000)
    mean, std = 0.3, 0.5
    model = gaussian_model(schedule, prediction, mean, std)
    x_T = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    if kind == "flow":
        exact = mean + std * x_T  # t = 1: x_T is the noise itself
    else:
        s_T = float(edm_sigmas(schedule)[-1])  # every VP grid starts at t = T-1
        alpha_T, sigma_T = (1 + s_T**2) ** -0.5, s_T * (1 + s_T**2) ** -0.5
        exact = mean + std * (x_T - alpha_T * mean) / (alpha_T**2 * std**2 + sigma_T**2) ** 0.5
    for sampler, spacing in (FLOW_RUNS if kind == "flow" else VP_RUNS):
        errors = []
        for steps in (25, 100):
            x = sample(model, schedule, x_T, sampler, steps, spacing=spacing, clip_x0=False, prediction=prediction)
            errors.append((x - exact).abs().max().item())
        assert errors[1] < errors[0] and errors[1] < 0.2, (sampler, spacing, errors)
        # 20,000 draws: the sampling error is about 0.004 on the mean and 0.003 on the spread
        assert abs(x.mean().item() - mean) < 0.015 and abs(x.std().item() - std) < 0.05, (sampler, spacing)
    # DDIM with DDPM-like noise (eta 1) lands on the data's distribution, not on the ODE's answer
    x = sample(model, schedule, x_T, "ddim", 100, eta=1.0, generator=torch.Generator().manual_seed(1), clip_x0=False,
               prediction=prediction)
    assert abs(x.mean().item() - mean) < 0.015 and abs(x.std().item() - std) < 0.05
    spacing = "linspace" if kind == "flow" else "karras"
    second_order = sample(model, schedule, x_T, "heun", 25, spacing=spacing, clip_x0=False, prediction=prediction)
    first_order = sample(model, schedule, x_T, "euler", 25, spacing=spacing, clip_x0=False, prediction=prediction)
    assert (second_order - exact).abs().max() < (first_order - exact).abs().max()  # Heun's order shows


def test_network_evaluations_are_counted_as_they_happen():
    calls = []

    def counting(x_t, t):
        calls.append(len(x_t))
        return smooth_model(x_t, t)

    x_T = torch.randn(2, 1, 4, 4)
    for sampler in ("ddim", "euler", "heun", "dpmpp_2m"):
        calls.clear()
        sample(counting, SCHEDULE, x_T, sampler, steps=6)
        assert len(calls) == network_evaluations(sampler, 6, 1000), sampler
    assert network_evaluations("ddpm", 6, 1000) == 1000

    class Conditional(torch.nn.Module):  # a conditional "network": counts the images it is shown
        num_classes = 2

        def forward(self, x_t, t, y):
            calls.append(len(x_t))
            return smooth_model(x_t, t)

    for w, expected in ((2.0, 22), (1.0, 11)):  # guidance runs both passes in one batch; w = 1 needs one
        calls.clear()
        sample(Conditional(), SCHEDULE, x_T, "heun", steps=6, labels=torch.tensor([0, 1]), guidance_scale=w)
        assert sum(calls) / len(x_T) == expected == network_evaluations("heun", 6, 1000, w, guided=True)
