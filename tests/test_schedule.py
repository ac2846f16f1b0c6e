import math

import pytest
import torch

from diffusion_lit.core.errors import UserError
from diffusion_lit.model.process import VP


def test_linear_betas_at_both_ends():
    s = VP("linear", 1000)
    assert s.betas.shape == (1000,)
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-6)


@pytest.mark.parametrize("t", [0, 499, 999])
def test_linear_alphas_cumprod_matches_product(t):
    # Independent: product of (1 - beta_i) for beta_i = 1e-4 + i * (0.02 - 1e-4) / 999, in Python floats.
    expected = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(t + 1))
    assert VP("linear").alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-5)


def test_linear_known_values():
    ac = VP("linear").alphas_cumprod
    assert ac[0].item() == pytest.approx(0.9999, rel=1e-7)
    assert ac[-1].item() == pytest.approx(4.036e-5, rel=1e-2)  # DDPM: x_T is almost pure noise


def test_cosine_alphas_cumprod_closed_form():
    T, s = 1000, 0.008
    sched = VP("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    # alpha_bar at 0-based index t is the closed form at time t + 1; clipping touches only the last steps.
    for t in [0, 10, 250, 500, 750, 900]:
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert sched.betas.max().item() <= 0.999 + 1e-7
    assert sched.betas[-1].item() == pytest.approx(0.999)


def test_posterior_terms():
    s = VP("linear", 1000)
    assert s.posterior_variance[0].item() == 0.0
    t = 500
    expected = s.betas[t] * (1 - s.alphas_cumprod[t - 1]) / (1 - s.alphas_cumprod[t])
    assert s.posterior_variance[t].item() == pytest.approx(expected.item(), rel=1e-5)
    # With eps = 0, x_t = sqrt(ab_t) x0 and the posterior mean must be sqrt(ab_{t-1}) x0.
    mean_of_x0 = s.posterior_mean_coef1 + s.posterior_mean_coef2 * s.sqrt_alphas_cumprod
    assert torch.allclose(mean_of_x0, s.alphas_cumprod_prev.sqrt(), atol=1e-6)


def test_buffers_are_float32_and_not_persistent():
    s = VP("cosine", 100)
    assert all(b.dtype == torch.float32 for b in s.buffers())
    assert s.state_dict() == {}


def test_q_sample_moments():
    torch.manual_seed(0)
    s = VP("linear", 1000)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    for t in [0, 499, 999]:
        tt = torch.full((n,), t)
        x_t = s.q_sample(x0, tt, torch.randn(n, 1))
        ac = s.alphas_cumprod[t].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(ac) * 0.7, abs=5e-3)
        assert x_t.var().item() == pytest.approx(1 - ac, abs=5e-3)


def test_bad_schedule_is_a_user_error():
    with pytest.raises(UserError, match="unknown noise schedule"):
        VP("quadratic")
