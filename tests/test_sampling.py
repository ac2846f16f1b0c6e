import math

import pytest
import torch

from diffusion_lit.core.errors import UserError
from diffusion_lit.sampling.samplers import ddim_sample, ddim_timesteps, ddpm_sample
from diffusion_lit.model.process import VP

SCHEDULE = VP("linear", 1000)


def exact_noise_model(x_star: torch.Tensor, schedule: VP):
    """The ideal denoiser for a dataset of one image: the eps that makes x_t from x_star."""

    def model(x_t, t):
        a = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - a * x_star) / s

    return model


def smooth_model(x_t, t):
    """An arbitrary deterministic eps predictor that depends on x_t and t."""
    return 0.8 * torch.tanh(x_t) + 0.1 * torch.sin(t.float() / 100).view(-1, 1, 1, 1)


@pytest.mark.parametrize("schedule", [SCHEDULE, VP("cosine", 1000)], ids=["linear", "cosine"])
def test_both_samplers_recover_the_single_training_image(schedule):
    torch.manual_seed(0)
    x_star = torch.rand(1, 3, 8, 8) * 2 - 1
    model = exact_noise_model(x_star, schedule)
    x_T = torch.randn(4, 3, 8, 8) * 3  # any starting noise, even off the prior's scale
    g = torch.Generator().manual_seed(1)
    # The last step lands on the predicted x0 at t = 0, where sqrt(ᾱ_0) ≈ 1, so float32 rounding of the
    # eps -> x0 inversion stays at the 1e-6 level; 1e-4 leaves room without hiding a wrong step.
    for x in [
        ddpm_sample(model, schedule, x_T, generator=g, clip_x0=False),
        ddpm_sample(model, schedule, x_T, generator=g, variance="beta"),
        ddim_sample(model, schedule, x_T, steps=20, generator=g),
        ddim_sample(model, schedule, x_T, steps=7, eta=1.0, generator=g, clip_x0=False),
    ]:
        torch.testing.assert_close(x, x_star.expand_as(x), rtol=0, atol=1e-4)


def test_ddim_with_eta_zero_is_deterministic():
    x_T = torch.randn(2, 1, 4, 4)
    a = ddim_sample(smooth_model, SCHEDULE, x_T, steps=25, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(smooth_model, SCHEDULE, x_T, steps=25, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    c = ddim_sample(smooth_model, SCHEDULE, x_T, steps=25, eta=0.5, generator=torch.Generator().manual_seed(123))
    assert not torch.allclose(a, c)


def test_full_ddim_with_eta_one_is_ddpm_with_posterior_variance():
    schedule = VP("linear", 200)
    x_T = torch.randn(2, 1, 4, 4)
    ddpm = ddpm_sample(smooth_model, schedule, x_T, generator=torch.Generator().manual_seed(7), clip_x0=False)
    ddim = ddim_sample(
        smooth_model, schedule, x_T, steps=200, eta=1.0, generator=torch.Generator().manual_seed(7), clip_x0=False
    )
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-4)


def alphas_cumprod(t: int) -> float:
    """ᾱ_t of the linear schedule (T = 1000), computed from the betas in Python floats."""
    return math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(t + 1))


def test_one_ddpm_step_against_algorithm_2():
    x_T = torch.randn(1, 1, 2, 2)
    _, states = ddpm_sample(
        smooth_model, SCHEDULE, x_T, generator=torch.Generator().manual_seed(3), clip_x0=False, return_intermediates=True
    )
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3))  # the first noise the sampler drew
    t = 999
    beta, ab, ab_prev = 0.02, alphas_cumprod(t), alphas_cumprod(t - 1)
    eps = smooth_model(x_T, torch.tensor([t]))
    sigma = math.sqrt(beta * (1 - ab_prev) / (1 - ab))
    expected = (x_T - beta / math.sqrt(1 - ab) * eps) / math.sqrt(1 - beta) + sigma * z
    torch.testing.assert_close(states[1], expected, rtol=1e-5, atol=1e-5)
    assert len(states) == 1001


def test_one_ddim_step_against_equation_12():
    x_T = torch.randn(1, 1, 2, 2)
    eta = 0.5
    _, states = ddim_sample(
        smooth_model, SCHEDULE, x_T, steps=10, eta=eta, generator=torch.Generator().manual_seed(5),
        clip_x0=False, return_intermediates=True,
    )
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(5))
    t, t_prev = 999, 888  # 10 steps evenly over [0, 999]: 0, 111, ..., 888, 999
    ab, ab_prev = alphas_cumprod(t), alphas_cumprod(t_prev)
    eps = smooth_model(x_T, torch.tensor([t]))
    x0 = (x_T - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    expected = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * eps + sigma * z
    torch.testing.assert_close(states[1], expected, rtol=1e-4, atol=1e-5)
    assert len(states) == 11


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert ddim_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(UserError, match="steps"):
        ddim_timesteps(1000, 0)


def test_clipping_keeps_the_prediction_in_range():
    x_T = torch.randn(4, 1, 4, 4)
    wild = lambda x, t: -10 * x  # noqa: E731  an eps far off, so the predicted x0 leaves [-1, 1]
    x = ddim_sample(wild, SCHEDULE, x_T, steps=5, clip_x0=True)
    assert x.abs().max() <= 1 + 1e-6
