"""Autoguidance (a weak model guides the main one), guidance on an interval of noise levels, and the guide trained
beside the main model in `fit`."""

import copy
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lit.core.errors import UserError
from diffusion_lit.model.guidance import Evaluations, Guide, guided
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.sampling.samplers import ddim_timesteps, sample
from diffusion_lit.model.process import VP, Flow

from conftest import assert_halves_its_loss, bars, tiny_unet, write_image_folder
from test_cli import REPO, cli

# A guide smaller than tiny_unet: 8 channels, one level.
tiny_guide = partial(Guide, net=partial(tiny_unet, base_channels=8, channel_mult=(1,), norm_groups=4), ema_decay=0.9)
SAMPLERS = [("vp", "ddim"), ("vp", "ddpm"), ("vp", "euler"), ("vp", "heun"), ("vp", "dpmpp_2m"),
            ("flow", "ddim"), ("flow", "euler"), ("flow", "heun"), ("flow", "dpmpp_2m")]


def random_net(num_classes: int = 0, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = tiny_unet(1, 8, num_classes, **kwargs)
    for p in net.parameters():  # away from the zero init, so every part reaches the output
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


@pytest.mark.parametrize("num_classes", [0, 3], ids=["unconditional", "conditional"])
def test_autoguided_prediction_is_the_weak_one_plus_w_times_the_difference(num_classes):
    main, weak = random_net(num_classes, 0), random_net(num_classes, 1)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900])
    y = torch.tensor([0, 1, 2, 1]) if num_classes else None
    with torch.no_grad():
        d_main, d_weak = (net(x, t, y) for net in (main, weak))
        assert (d_main - d_weak).abs().max() > 1e-2
        for w, expected in [(0.0, d_weak), (1.0, d_main), (2.5, d_weak + 2.5 * (d_main - d_weak))]:
            counts = Evaluations()
            out = guided(main, y, w, guide=weak, counts=counts)(x, t)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert (counts.model, counts.guide) == {0.0: (0, 4), 1.0: (4, 0), 2.5: (4, 4)}[w]


def test_a_guide_at_the_null_label_is_the_weak_side_of_cfg_and_autoguidance_at_once():
    main, weak = random_net(3, 0), random_net(3, 1)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 1])
    null = torch.full_like(y, 3)  # the null class of a 3-class model
    with torch.no_grad():
        d_main, d_weak = main(x, t, y), weak(x, t, null)
        counts = Evaluations()
        out = guided(main, y, 2.5, guide=weak, counts=counts, guide_condition="null")(x, t)
        torch.testing.assert_close(out, d_weak + 2.5 * (d_main - d_weak), rtol=1e-5, atol=1e-5)
        assert (counts.model, counts.guide) == (4, 4)
        # a guide identical to the model at the null label: classifier-free guidance, two passes instead of one batch
        cfg = guided(main, y, 2.5)(x, t)
        torch.testing.assert_close(guided(main, y, 2.5, guide=copy.deepcopy(main), guide_condition="null")(x, t), cfg,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="guide_condition must be"):
        guided(main, y, 2.5, guide=weak, guide_condition="nothing")


@pytest.mark.parametrize("process, sampler", SAMPLERS, ids=lambda v: v)
def test_a_guide_identical_to_the_model_changes_no_sampler_output(process, sampler):
    main = random_net()
    schedule = VP("linear", 20) if process == "vp" else Flow()
    x_T = torch.randn(2, 1, 8, 8)
    draw = partial(sample, main, schedule, x_T, sampler, 4, 1.0 if sampler == "ddim" else 0.0,
                   prediction="eps" if process == "vp" else "v")
    with torch.no_grad():
        plain = draw(generator=torch.Generator().manual_seed(0))
        autoguided = draw(generator=torch.Generator().manual_seed(0), guide=copy.deepcopy(main), guidance_scale=3.0)
    # D + 3 (D - D) is D up to float rounding of the difference
    torch.testing.assert_close(autoguided, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("process", ["vp", "flow"])
def test_noise_levels_mean_the_same_on_both_processes(process):
    """sigma / alpha from the network's time: the flow's t / (1 - t), VP's sqrt((1 - ᾱ) / ᾱ)."""
    if process == "flow":
        t = torch.tensor([0.0, 0.25, 0.5, 0.75])
        torch.testing.assert_close(Flow().noise_level(1000 * t), (t / (1 - t)).double())
    else:
        schedule = VP("cosine", 100)
        ac = schedule.alphas_cumprod.double()
        expected = ((1 - ac) / ac).sqrt()
        torch.testing.assert_close(schedule.noise_level(torch.tensor([0, 50, 99])), expected[[0, 50, 99]])
        # fractional timesteps (Karras grids) lie between their neighbours
        assert expected[50] < schedule.noise_level(torch.tensor([50.5])).item() < expected[51]


def test_guidance_on_an_interval_makes_one_pass_outside_it_and_two_inside():
    schedule, steps, interval = VP("linear", 100), 10, (0.5, 3.0)
    levels = schedule.noise_level(torch.tensor(ddim_timesteps(100, steps)))
    inside = int(((levels > 0.5) & (levels <= 3.0)).sum())
    assert 0 < inside < steps
    calls = []

    class Counting(torch.nn.Module):  # counts the images it is shown, per call
        num_classes = 2

        def forward(self, x_t, t, y=None):
            calls.append(len(x_t))
            return torch.zeros_like(x_t)

    x_T, labels = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 1])
    for guide in (None, Counting()):  # classifier-free (two passes in one call) and autoguidance
        calls.clear()
        counts = Evaluations()
        sample(Counting(), schedule, x_T, "ddim", steps, labels=labels, guidance_scale=2.0, guide=guide,
               guidance_interval=interval, counts=counts)
        assert sum(calls) / len(x_T) == steps + inside == sum(counts.per_image())
        assert counts.per_image()[1] == (inside if guide is not None else 0)


def test_a_guide_trained_beside_the_model_learns_and_is_saved():
    loader = DataLoader(TensorDataset(bars()), batch_size=8)
    model = DiffusionModule(net=tiny_unet, image_size=8, channels=1, guide=tiny_guide,
                            optimizer=partial(torch.optim.Adam, lr=3e-3))
    assert sum(p.numel() for p in model.guide.net.parameters()) < sum(p.numel() for p in model.net.parameters()) / 3
    before = [p.clone() for p in model.guide.ema.parameters()]
    losses = []
    model.log = lambda name, value, **kw: losses.append(value.item()) if name == "train/guide_loss" else None
    assert_halves_its_loss(model, loader)  # the main model's loss plus the guide's
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first / 2, (first, last)  # the guide's own loss halves too
    assert any(not torch.equal(a, b) for a, b in zip(before, model.guide.ema.parameters()))  # its EMA follows
    keys = model.state_dict().keys()
    assert any(k.startswith("guide.net.") for k in keys) and any(k.startswith("guide.ema.") for k in keys)
    assert model.sampler_kwargs()["guide"] is model.guide.ema.module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny `fit` runs on 8x8 images: the main one, an earlier one of the same kind, and ones of other kinds."""
    tmp = tmp_path_factory.mktemp("guides")
    images = write_image_folder(tmp / "images", n_per_class=8, size=8)

    def fit(name, *extra):
        result = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml",
                     "--data.source", "ImageFolder", "--data.source.root",
                     images, "--data.batch_size", 8, "--trainer.max_steps", 1, "--trainer.callbacks", "[]",
                     "--trainer.logger.init_args.save_dir", tmp / "runs", "--trainer.logger.init_args.name", name,
                     *extra)
        assert result.returncode == 0, result.stderr
        return tmp / "runs" / name / "checkpoints" / "last.ckpt"

    return tmp, {
        "main": fit("main"), "small": fit("small", "--model.net.init_args.base_channels", 8,
                                          "--model.net.init_args.norm_groups", 4),
        "flow": fit("flow", "--model.process", "Flow"), "v": fit("v", "--model.objective.prediction", "v"),
        "conditional": fit("conditional", "--model.conditioning", "Labels"),
        "bigger": fit("bigger", "--data.image_size", 16),
    }


def test_a_guide_checkpoint_guides_sample_and_counts_its_calls(runs):
    tmp, ckpt = runs
    out = tmp / "guided.npz"
    result = cli("sample", "--ckpt_path", ckpt["main"], "--guide_ckpt", ckpt["small"], "--guidance_scale", 2,
                 "--steps", 4, "--num_samples", 2, "--out", out, "--guidance_interval", "[0.1, 100]")
    assert result.returncode == 0, result.stderr
    levels = VP("cosine", 1000).noise_level(torch.tensor(ddim_timesteps(1000, 4)))
    inside = int(((levels > 0.1) & (levels <= 100)).sum())
    assert f"{4 + inside} network evaluations per image (4 of the model, {inside} of the guide" in result.stdout
    assert "ms per image" in result.stdout


def test_a_class_model_guided_by_itself_at_the_null_label_draws_what_cfg_draws(runs):
    tmp, ckpt = runs
    common = ["--ckpt_path", ckpt["conditional"], "--guidance_scale", 2, "--steps", 4, "--labels", "0,1,0", "--eta", 1]
    result = cli("sample", *common, "--out", tmp / "cfg.npz")
    assert result.returncode == 0, result.stderr
    result = cli("sample", *common, "--guide_ckpt", ckpt["conditional"], "--guide_condition", "null",
                 "--out", tmp / "null_guide.npz")
    assert result.returncode == 0, result.stderr
    assert "8 network evaluations per image (4 of the model, 4 of the guide" in result.stdout
    cfg, null_guide = (np.load(tmp / f"{name}.npz")["arr_0"].astype(int) for name in ("cfg", "null_guide"))
    # The same two predictions, made in one batch of 2B or in two batches of B: float32 rounding, then 8 bits.
    assert np.abs(cfg - null_guide).max() <= 1


@pytest.mark.parametrize("other, what", [("flow", "process"), ("v", "prediction"), ("conditional", "classes"),
                                         ("bigger", "shape")])
def test_a_guide_checkpoint_of_another_kind_is_refused(runs, other, what):
    tmp, ckpt = runs
    result = cli("sample", "--ckpt_path", ckpt["main"], "--guide_ckpt", ckpt[other], "--guidance_scale", 2,
                 "--out", tmp / "x.png")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("error: --guide_ckpt") and f"its {what} is" in lines[-1]
    assert not (tmp / "x.png").exists()
