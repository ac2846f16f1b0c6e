"""Each fast path gives the plain path's losses and samples, within a stated tolerance."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from diffusion_lit.training import speed
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.process import VP
from diffusion_lit.sampling.samplers import ddim_sample
from diffusion_lit.core.precision import autocast
from diffusion_lit.training.speed import Accelerate
from diffusion_lit.nets.unet import ResBlock, timestep_embedding

from conftest import tiny_unet, write_image_folder
from test_cli import REPO, cli


class OneBlock(nn.Module):
    """For torch.compile: the UNet's parts (time embedding, a residual block with group norm) in one block. Inductor
    compiles C++ for each kernel of each graph (training forward, backward, sampling): with an empty cache, this test
    took 42 s on a one-level UNet and 19 s on this block (2-core Intel Xeon, AVX-512)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.conv_in, self.temb = nn.Conv2d(in_channels, 8, 3, padding=1), nn.Linear(8, 16)
        self.block, self.conv_out = ResBlock(8, 8, 16, dropout=0.0, groups=4), nn.Conv2d(8, in_channels, 3, padding=1)

    def forward(self, x_t, t, y=None):
        return self.conv_out(self.block(self.conv_in(x_t), self.temb(timestep_embedding(t, 8))))


def module(net=tiny_unet) -> DiffusionModule:
    torch.manual_seed(0)  # the same initial weights for every variant
    return DiffusionModule(net=net, image_size=8, channels=1, process=VP("cosine"))


def accelerated(net=tiny_unet, **switches) -> DiffusionModule:
    """`module(net)` with the Accelerate callback's switches applied, as `fit` applies them at its setup."""
    m = module(net)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))  # what compile reads
    Accelerate(**switches).setup(trainer, m, "fit")
    return m


def losses_and_samples(m: DiffusionModule, precision: str = "32-true", steps: int = 3,
                       no_grad: bool = False) -> tuple[list[float], torch.Tensor]:
    """Losses of `steps` Adam steps on a fixed batch (fixed t and noise), then 10-step DDIM samples from the EMA
    (under `m.sampling`'s inference mode, or, with `no_grad`, under torch.no_grad instead)."""
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    optimizer = torch.optim.Adam(m.net.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        with autocast(torch.device("cpu"), precision):
            loss = m.objective.loss(m.net, m.process, x0, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        m.ema.update_parameters(m.net)
        losses.append(loss.item())
    x_T = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    if no_grad:  # m.sampling's denoiser in eval mode, without inference mode
        model = m.denoiser().eval()
        with torch.no_grad(), autocast(torch.device("cpu"), precision):
            return losses, ddim_sample(model, m.process, x_T, steps=10)
    with m.sampling(precision) as model:
        return losses, ddim_sample(model, m.process, x_T, steps=10)


@pytest.fixture(scope="module")
def plain():
    return losses_and_samples(module())


def test_channels_last_matches_plain(plain):
    m = accelerated(channels_last=True)
    weights = [p for p in list(m.net.parameters()) + list(m.ema.module.parameters()) if p.ndim == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    losses, samples = losses_and_samples(m)
    # Only the order of the floating-point sums differs.
    assert losses == pytest.approx(plain[0], rel=1e-5)
    assert torch.allclose(samples, plain[1], atol=1e-4)


def test_bf16_autocast_matches_plain(plain):
    losses, samples = losses_and_samples(module(), precision="bf16-mixed")
    # bf16 keeps 8 bits of mantissa: about 2-3 significant digits per operation.
    assert losses == pytest.approx(plain[0], rel=2e-2)
    assert (samples - plain[1]).abs().mean() < 0.02 and (samples - plain[1]).abs().max() < 0.15
    assert not torch.equal(samples, plain[1])  # autocast did change the arithmetic


def test_inference_mode_matches_no_grad(plain):
    losses, samples = losses_and_samples(module(), no_grad=True)
    assert losses == plain[0] and torch.equal(samples, plain[1])  # bit for bit
    assert plain[1].is_inference() and not samples.is_inference()


def test_compile_matches_plain():
    m = accelerated(OneBlock, compile=True)
    if speed.compile_failure("cpu"):
        pytest.skip(f"torch.compile cannot run here: {speed.compile_failure('cpu')}")
    losses, samples = losses_and_samples(m, steps=2)
    plain_losses, plain_samples = losses_and_samples(module(OneBlock), steps=2)
    # Inductor fuses and reorders floating-point operations.
    assert losses == pytest.approx(plain_losses, rel=1e-4)
    assert torch.allclose(samples, plain_samples, atol=1e-3)


def test_compile_falls_back_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(speed, "compile_failure", lambda device_type: "InvalidCxxCompiler: no working C++ compiler")
    m = accelerated(compile=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unavailable" in err and "running uncompiled" in err
    assert m.net._compiled_call_impl is None  # left as it was


def test_fast_paths_from_the_command_line(tmp_path):
    """bf16 training with channels_last through `fit` (its end-of-training grid included), then bf16 sampling.

    Small images and a small grid: where the CPU has no bf16 instructions, bf16 is emulated and tens of times slower.
    """
    images = write_image_folder(tmp_path / "images", n_per_class=8, size=8)
    grid = {"class_path": "diffusion_lit.training.callbacks.SampleGrid",
            "init_args": {"every_n_steps": 2, "num_samples": 4, "sampling": {"steps": 3}}}
    run = cli(
        "fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "ImageFolder",
        "--data.source.root", images, "--data.batch_size", 8,
        "--trainer.max_steps", 2, "--trainer.logger.init_args.save_dir", tmp_path / "runs",
        "--trainer.precision", "bf16-mixed", "--trainer.callbacks", json.dumps([grid]),
        "--trainer.callbacks+=diffusion_lit.training.speed.Accelerate",
        "--trainer.callbacks.channels_last", "true",
    )
    assert run.returncode == 0, run.stderr
    ckpt = tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt"
    # The run's callbacks held Accelerate with channels_last (a run-time switch, not the model's: not in the checkpoint)
    callbacks = yaml.safe_load((tmp_path / "runs" / "tiny_cpu" / "config.yaml").read_text())["trainer"]["callbacks"]
    assert {"class_path": "diffusion_lit.training.speed.Accelerate",
            "init_args": {"channels_last": True, "compile": False}} in callbacks
    assert (tmp_path / "runs" / "tiny_cpu" / "samples.png").is_file()  # the grid, drawn in bf16 from channels-last weights
    assert "channels_last" not in torch.load(ckpt, weights_only=True)["hyper_parameters"]
    outs = {}
    for precision in ("32-true", "bf16-mixed"):
        done = cli("sample", "--ckpt_path", ckpt, "--num_samples", 4, "--steps", 5, "--precision", precision,
                   "--out", tmp_path / f"{precision}.npz")
        assert done.returncode == 0, done.stderr
        outs[precision] = np.load(tmp_path / f"{precision}.npz")["arr_0"].astype(int)
    assert np.abs(outs["32-true"] - outs["bf16-mixed"]).mean() < 5  # of 255
