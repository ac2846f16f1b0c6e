"""The prediction targets and their conversions, Min-SNR-gamma's weights, and the two processes' time draws."""

import pytest
import torch

from diffusion_lit.model.process import Flow, VP
from diffusion_lit.model.targets import min_snr_weight, split, target

VP_COSINE = VP("cosine", 1000)
FLOW = Flow()
# VP: every integer timestep class (clean end, middle, noisiest); flow: inside (0, 1), where x0 and eps are both
# recoverable (at t = 0 eps is lost, at t = 1 x0)
TIMES = {"vp": (VP_COSINE, torch.tensor([0, 1, 250, 500, 999])), "flow": (FLOW, torch.tensor([1e-3, 0.1, 0.5, 0.9, 0.999]))}


def draw(n: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("process", ["vp", "flow"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_conversions_round_trip(process, prediction):
    schedule, t = TIMES[process]
    x0, eps = draw(len(t))
    alpha, sigma = (v.double() for v in schedule.alpha_sigma(t, 4))
    x_t = alpha * x0 + sigma * eps
    out = target(prediction, schedule, x0, eps, alpha, sigma)
    x0_back, eps_back = split(prediction, schedule, out, x_t, alpha, sigma)
    # float64 throughout; the VP schedule's float32 buffers still leave 1/alpha ~ 160 at t = 999 on the eps side
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-9)


def test_targets_are_the_papers_quantities():
    x0, eps = draw(3)
    t = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    alpha, sigma = FLOW.alpha_sigma(t, 4)
    torch.testing.assert_close(target("v", FLOW, x0, eps, alpha, sigma), eps - x0)  # the flow's velocity
    torch.testing.assert_close(FLOW.q_sample(x0, t, eps), (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    # Salimans & Ho's v on VP: with alpha = cos(phi), sigma = sin(phi), v = d x_t / d phi
    phi = torch.tensor([0.3, 0.8, 1.4], dtype=torch.float64).view(-1, 1, 1, 1)
    dphi = 1e-6
    path = lambda p: p.cos() * x0 + p.sin() * eps  # noqa: E731
    velocity = (path(phi + dphi) - path(phi - dphi)) / (2 * dphi)
    torch.testing.assert_close(target("v", VP_COSINE, x0, eps, phi.cos(), phi.sin()), velocity, rtol=0, atol=1e-8)


@pytest.mark.parametrize("process", ["vp", "flow"])
def test_min_snr_weights(process):
    schedule, t = TIMES[process]
    alpha, sigma = (v.double().flatten() for v in schedule.alpha_sigma(t, 1))
    snr = alpha**2 / sigma**2
    gamma = 5.0
    # Hang et al. 2023, Sec. 3.4: the x0 loss weighted by min(SNR, gamma) is, per target,
    expected = {"eps": torch.minimum(snr, torch.tensor(gamma)) / snr, "x0": torch.minimum(snr, torch.tensor(gamma))}
    if process == "vp":
        expected["v"] = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)
    for prediction, value in expected.items():
        torch.testing.assert_close(min_snr_weight(prediction, schedule, alpha, sigma, gamma), value)
    # and for every target (the flow's v included): weight x |error on the target|² = min(SNR, gamma) |error on x0|²
    x0, eps = draw(len(t))
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    wrong = x0 + 0.1 * torch.randn_like(x0)  # a wrong x0 at the same x_t, and the eps that goes with it
    wrong_eps = (x_t - alpha.view(-1, 1, 1, 1) * wrong) / sigma.view(-1, 1, 1, 1)
    x0_error = (wrong - x0).pow(2).flatten(1).sum(1)
    for prediction in ("eps", "v", "x0"):
        a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        error = (target(prediction, schedule, wrong, wrong_eps, a, s) - target(prediction, schedule, x0, eps, a, s))
        weighted = min_snr_weight(prediction, schedule, alpha, sigma, gamma) * error.pow(2).flatten(1).sum(1)
        torch.testing.assert_close(weighted, torch.minimum(snr, torch.tensor(gamma)) * x0_error)


def test_time_draws():
    g = torch.Generator().manual_seed(0)
    t = FLOW.draw_t(200_000, "logit_normal", "cpu", g)
    logit = (t / (1 - t)).log()  # SD3's logit-normal: logit(t) ~ N(0, 1)
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01
    u = FLOW.draw_t(200_000, "uniform", "cpu", g)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    steps = VP_COSINE.draw_t(200_000, "logit_normal", "cpu", g)
    assert steps.dtype == torch.long and 0 <= steps.min() and steps.max() <= 999
    assert abs(steps.float().median().item() - 500) < 5  # the logit-normal's median, 1/2, at T/2
    assert FLOW.time_of(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0.0, 0.5, 1.0]
    shifted = Flow(3.0).time_of(torch.tensor([0.5]))
    assert shifted.item() == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
