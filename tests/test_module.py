from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lit.core.errors import UserError
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.objective import Objective
from diffusion_lit.model.process import VP, Flow

from conftest import assert_halves_its_loss, bars, tiny_unet


def tiny_module(**kwargs) -> DiffusionModule:
    kwargs = {"net": tiny_unet, "image_size": 8, "channels": 1, **kwargs}
    return DiffusionModule(**kwargs)


OBJECTIVES = [
    {},  # DDPM's: eps, uniform t, no weighting
    {"objective": lambda: Objective("v", "min_snr")},
    {"objective": lambda: Objective("x0", "min_snr", t_sampling="logit_normal")},
    {"process": lambda: Flow()},  # rectified flow: v, logit-normal t
    {"process": lambda: Flow(), "objective": lambda: Objective("x0", "min_snr", t_sampling="uniform")},
]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=["eps", "v-minsnr", "x0-minsnr-lognorm", "flow", "flow-x0"])
def test_tiny_model_overfits_eight_images(objective):
    loader = DataLoader(TensorDataset(bars(), torch.zeros(8)), batch_size=8)
    parts = {"process": VP("cosine")} | {name: make() for name, make in objective.items()}
    # 60 steps: the last ten's mean loss was 0.03-0.25 of the first ten's (2-core Intel Xeon, AVX-512), under 0.5
    assert_halves_its_loss(tiny_module(optimizer=partial(torch.optim.Adam, lr=2e-3), **parts), loader, steps=60)


@pytest.mark.parametrize("warmup, k", [(True, 10), (5.0, 5)])
def test_ema_follows_the_averaging_formula(warmup, k):
    model = tiny_module(ema_decay=0.9, ema_warmup=warmup)
    param = lambda m: next(m.parameters())  # noqa: E731
    ema0 = param(model.net).detach().clone()
    model.ema.update_parameters(model.net)  # first update copies the weights
    assert torch.equal(param(model.ema.module), ema0)

    expected = ema0.clone()
    for n in range(1, 100):
        with torch.no_grad():
            param(model.net).add_(torch.randn_like(ema0))
        model.ema.update_parameters(model.net)
        decay = min(0.9, (1 + n) / (k + n))
        expected = decay * expected + (1 - decay) * param(model.net).detach()
        torch.testing.assert_close(param(model.ema.module), expected)
    assert (1 + 79) / (10 + 79) < 0.9 <= (1 + 80) / (10 + 80)  # the loop crossed from warm-up to the set decay
    assert (1 + 34) / (5 + 34) < 0.9 <= (1 + 35) / (5 + 35)  # (for k = 5 at n = 35)


@pytest.mark.parametrize("warmup", [1, 0.5, -2])
def test_an_ema_ramp_that_would_never_average_is_refused(warmup):
    with pytest.raises(UserError, match="ema_warmup must be true, false or a number above 1"):
        tiny_module(ema_warmup=warmup)


def test_ema_without_warmup_uses_the_set_decay():
    model = tiny_module(ema_decay=0.5, ema_warmup=False)
    model.ema.update_parameters(model.net)
    before = next(model.ema.module.parameters()).detach().clone()
    with torch.no_grad():
        next(model.net.parameters()).add_(1.0)
    model.ema.update_parameters(model.net)
    torch.testing.assert_close(next(model.ema.module.parameters()), before + 0.5)


def test_without_an_ema_the_trained_weights_sample_and_validate():
    model = tiny_module(ema_decay=None)
    assert model.ema is None and model.denoiser() is model.net and model.weights_name() == "trained"
    assert not any(k.startswith("ema.") for k in model.state_dict())
    loader = DataLoader(TensorDataset(bars(), torch.zeros(8)), batch_size=8)
    assert_halves_its_loss(tiny_module(ema_decay=None, optimizer=partial(torch.optim.Adam, lr=2e-3),
                                       process=VP("cosine")), loader)
    with model.sampling() as net:
        assert net is model.net and not net.training


def test_process_is_neither_checkpointed_nor_averaged():
    model = tiny_module()
    keys = model.state_dict().keys()
    assert not any(k.startswith("process.") for k in keys)
    assert {k.split(".")[0] for k in keys} == {"net", "ema"}
    # The EMA holds a copy of the network alone: its tensors are the net's parameters plus its counter.
    ema_keys = {k for k in keys if k.startswith("ema.")}
    assert ema_keys == {"ema.n_averaged"} | {"ema.module." + k for k, _ in model.net.named_parameters()}
    betas = model.process.betas.clone()
    for _ in range(3):
        model.ema.update_parameters(model.net)
    assert torch.equal(model.process.betas, betas)
    assert not any(p.requires_grad for p in model.ema.parameters())


def test_learning_rate_warms_up_linearly():
    model = tiny_module(optimizer=partial(torch.optim.SGD, lr=0.1), warmup_steps=4)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_bad_values_are_user_errors():
    with pytest.raises(UserError, match="warmup_steps"):
        tiny_module(warmup_steps=-1)
    with pytest.raises(UserError, match="ema_decay"):
        tiny_module(ema_decay=1.5)
    with pytest.raises(UserError, match="unknown noise schedule"):
        VP("quadratic")
    with pytest.raises(UserError, match="prediction eps cannot be sampled on Flow"):
        tiny_module(process=Flow(), objective=Objective("eps"))
    with pytest.raises(UserError, match="snr_gamma"):
        Objective(loss_weighting="min_snr", snr_gamma=0)
