"""On a GPU: `fit` in float32 and bf16-mixed with the EMA, the sample grid and FID; resume; `sample` against the CPU;
the guide, a latent model and LoRA; two DDP ranks on the one GPU with FID's sampling sharded between them.

Skipped without CUDA (CI has none). `DIFFUSION_LIT_TEST_DEVICE=cpu` runs them on the CPU instead, to check the tests
themselves on a machine without a GPU (the CPU versions of these checks live in the other test files).
"""

import json
import os
from functools import partial

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.sampling.samplers import sample
from diffusion_lit.data.sources import ImageFolder

from conftest import bars, tiny_unet, write_image_folder
from test_callbacks import events, fit_with_callbacks
from test_cli import REPO, cli
from test_guidance import tiny_guide

DEVICE = os.environ.get("DIFFUSION_LIT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device (DIFFUSION_LIT_TEST_DEVICE=cpu runs these tests on the CPU)")
ACCELERATOR = "cuda" if DEVICE == "cuda" else "cpu"

# Resume without deterministic algorithms: CUDA's convolution backward and cuDNN's algorithm choice round differently
# from run to run, in the last bits; 12 Adam steps carry that to far less than this share of each tensor's norm.
NONDETERMINISTIC_RTOL = 1e-3
# `sample` on the GPU against the CPU, uint8 images of 255 levels: cuDNN runs float32 convolutions in TF32 (10-bit
# mantissa) by default, and rounding near a level's edge moves a pixel by one level.
SAMPLE_MEAN_LEVELS, SAMPLE_MAX_LEVELS = 0.5, 8


@pytest.fixture(autouse=True)
def _nondeterministic_afterwards():
    """A Trainer with deterministic=True leaves deterministic algorithms on for the process: off again after each."""
    yield
    torch.use_deterministic_algorithms(False)


def on_device(tensor: torch.Tensor) -> bool:
    return tensor.device.type == DEVICE


def quiet_trainer(max_steps: int, **kwargs) -> Trainer:
    return Trainer(accelerator=ACCELERATOR, devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_with_the_ema_the_grid_and_fid(tmp_path, precision):
    result = fit_with_callbacks(tmp_path, {"num_samples": 8, "num_real": 16, "feature_extractor": "digits"},
                                "--trainer.accelerator", ACCELERATOR, "--trainer.devices", 1,
                                "--trainer.precision", precision, "--trainer.log_every_n_steps", 1)
    assert result.returncode == 0, result.stderr
    scalars, images = events(tmp_path / "runs" / "tiny_cpu")
    assert [step for step, _ in scalars["val/fid"]] == [2, 4]
    assert all(np.isfinite(value) and value > 0 for _, value in scalars["val/fid"])
    assert len(scalars["train/loss"]) == 4 and all(np.isfinite(value) for _, value in scalars["train/loss"])
    assert images["samples/grid"] == [2, 4]
    # torch.load puts each tensor back on the device it was saved from: the run's.
    state = torch.load(tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert on_device(state["net.conv_in.weight"]) and state["ema.n_averaged"].item() == 4
    assert not torch.equal(state["net.conv_in.weight"], state["ema.module.conv_in.weight"])  # the EMA lags


def resume_run(root, ckpt_dir, max_steps: int, deterministic: bool, ckpt_path=None):
    """tests/test_resume.py's run, on the device, with or without deterministic algorithms."""
    seed_everything(0)
    data = DiffusionDataModule(ImageFolder(str(root)), batch_size=8, num_workers=0, val_fraction=0.2)
    model = DiffusionModule(net=tiny_unet, image_size=data.image_size, channels=data.channels, ema_decay=0.99,
                            warmup_steps=3, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    model.net.down[0][0].dropout.p = 0.1  # dropout draws from the device's generator: resume must restore it
    trainer = quiet_trainer(
        max_steps, deterministic=deterministic, val_check_interval=4, check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=6, save_top_k=-1)])
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=False)  # hparams hold the test's partials
    return trainer, model


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "nondeterministic"])
def test_a_resumed_run_continues_as_an_uninterrupted_one(tmp_path, deterministic):
    root = write_image_folder(tmp_path / "images", n_per_class=20)  # 32 training images: resumed mid-epoch
    straight, straight_model = resume_run(root, tmp_path / "a", 12, deterministic)
    resume_run(root, tmp_path / "b", 6, deterministic)
    resumed, resumed_model = resume_run(root, tmp_path / "b", 12, deterministic, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert resumed.global_step == straight.global_step == 12 and resumed.current_epoch == straight.current_epoch
    assert on_device(next(straight_model.net.parameters()))
    a, b = straight_model.state_dict(), resumed_model.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # the network, its EMA and the EMA's count
        if deterministic:
            assert torch.equal(a[key], b[key]), key  # the same kernels in the same order: the same bits
        else:
            assert (a[key].float() - b[key].float()).norm() <= NONDETERMINISTIC_RTOL * a[key].float().norm() + 1e-8, key
    moments = [trainer.optimizers[0].state_dict()["state"] for trainer in (straight, resumed)]
    for i, state in moments[0].items():
        assert state["step"] == moments[1][i]["step"] == 12
        if deterministic:
            assert torch.equal(state["exp_avg"], moments[1][i]["exp_avg"])
            assert torch.equal(state["exp_avg_sq"], moments[1][i]["exp_avg_sq"])


def test_sample_on_the_device_draws_what_it_draws_on_the_cpu(tmp_path):
    """The class-conditional checkpoint of tests/data, guided DDIM: the starting noise is drawn on the CPU on every
    device, so the GPU's images are the CPU's to within the rounding of its kernels."""
    ckpt = REPO / "tests" / "data" / "eps_ddpm_v1.ckpt"
    args = ["sample", "--ckpt_path", ckpt, "--num_samples", 16, "--batch_size", 8, "--steps", 10, "--labels", "all",
            "--guidance_scale", 2]
    # `sample` runs on the GPU where there is one; with no GPU visible, on the CPU.
    on_gpu = cli(*args, "--out", tmp_path / "device.npz", **({} if DEVICE == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}))
    on_cpu = cli(*args, "--out", tmp_path / "cpu.npz", CUDA_VISIBLE_DEVICES="")
    assert on_gpu.returncode == 0, on_gpu.stderr
    assert on_cpu.returncode == 0, on_cpu.stderr
    device, cpu = (np.load(tmp_path / f"{name}.npz")["arr_0"].astype(int) for name in ("device", "cpu"))
    assert device.shape == cpu.shape == (16, 28, 28, 1) and cpu.std() > 20  # not a flat field
    difference = np.abs(device - cpu)
    assert difference.mean() <= SAMPLE_MEAN_LEVELS and difference.max() <= SAMPLE_MAX_LEVELS, (
        difference.mean(), difference.max())


def test_the_guide_trains_beside_the_model_and_guides_its_samples():
    model = DiffusionModule(tiny_unet, image_size=8, channels=1, guide=tiny_guide, ema_decay=0.9,
                            optimizer=partial(torch.optim.Adam, lr=1e-2))
    before = [p.detach().clone() for p in model.guide.net.parameters()]
    quiet_trainer(2, enable_checkpointing=False).fit(model, DataLoader(TensorDataset(bars(), torch.zeros(8)),
                                                                       batch_size=8))
    assert on_device(next(model.guide.net.parameters())) and model.guide.ema.n_averaged.item() == 2
    assert any(not torch.equal(a.to(b.device), b) for a, b in zip(before, model.guide.net.parameters()))
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(model.device)
    with model.sampling() as net:
        x = sample(net, model.process, x_T, "ddim", 3, guidance_scale=2.0, **model.sampler_kwargs())
    assert on_device(x) and torch.isfinite(x).all()


def test_a_latent_model_trains_and_decodes(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffusion_lit.model.latent import Latent

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "sd" / "vae")
    model = DiffusionModule(tiny_unet, image_size=16, channels=1, latent=Latent(str(tmp_path / "sd")),
                            optimizer=partial(torch.optim.Adam, lr=1e-2))
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    quiet_trainer(2, enable_checkpointing=False).fit(model, DataLoader(TensorDataset(images, torch.zeros(8)),
                                                                       batch_size=4))
    assert on_device(next(model.net.parameters())) and model.ema.n_averaged.item() == 2
    x_T = torch.randn(2, *model.shape, generator=torch.Generator().manual_seed(0)).to(model.device)
    with model.sampling() as net:
        x = model.latent.decode(sample(net, model.process, x_T, "ddim", 3, **model.sampler_kwargs()))
    assert x.shape == (2, 1, 16, 16) and on_device(x) and torch.isfinite(x).all()


def write_captioned(root):
    """4 RGB 16x16 images of a red or a blue square, captioned in a metadata.jsonl."""
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        image = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
        image[4:12, 4:12, 0 if i % 2 == 0 else 2] = 255
        Image.fromarray(image).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {('red', 'blue')[i % 2]} square"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return root


def test_lora_trains_the_adapters_of_stable_diffusion_in_bf16(tmp_path):
    """configs/sd_lora.yaml's settings (bf16-mixed, bf16 frozen weights, gradient checkpointing) on the tiny
    pipeline of tests/test_stable_diffusion.py."""
    for package in ("diffusers", "peft", "transformers"):
        pytest.importorskip(package)
    from diffusion_lit.model.stable_diffusion import StableDiffusionModule
    from test_stable_diffusion import write_tiny_sd

    sd = write_tiny_sd(tmp_path / "pipeline")
    seed_everything(0)
    data = DiffusionDataModule(ImageFolder(str(write_captioned(tmp_path / "images"))), image_size=16, channels=3,
                               batch_size=4, num_workers=0, val_fraction=0, captions=True)
    module = StableDiffusionModule(str(sd), lora_rank=4, frozen_dtype="bfloat16", gradient_checkpointing=True,
                                   optimizer=partial(torch.optim.AdamW, lr=1e-2), image_size=16)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    quiet_trainer(2, enable_checkpointing=False, precision="bf16-mixed").fit(module, data)
    after = dict(module.named_parameters())
    changed = {name for name, p in after.items() if not torch.equal(before[name].to(p.device), p)}
    assert changed and all(".lora_" in name for name in changed)
    assert all(on_device(p) for p in after.values())


def test_two_ddp_ranks_on_the_one_device_shard_fid_sampling(tmp_path):
    """tests/test_callbacks.py's DDP run, its two ranks on the one GPU, with attention in the network (whose 1x1
    projection once returned gradients in other strides than its weight's: DDP's 'Grad strides' warning)."""
    strategy = {"class_path": "shared_device.SharedDeviceDDP",
                "init_args": {"device": "cuda:0" if DEVICE == "cuda" else "cpu"}}
    result = fit_with_callbacks(
        tmp_path, {"num_samples": 11, "num_real": 20, "feature_extractor": "digits"}, "--model.conditioning", "Labels",
        "--trainer.strategy", json.dumps(strategy), "--model.net.init_args.attention_resolutions", "[8]",
        PYTHONUNBUFFERED="1",  # an environment of its own: a subprocess, which DDP's launcher starts again
    )
    assert result.returncode == 0, result.stderr
    assert "Grad strides do not match" not in result.stderr
    scalars, images = events(tmp_path / "runs" / "tiny_cpu")
    assert [step for step, _ in scalars["val/fid"]] == [2, 4]  # once per evaluation, not once per rank
    assert [value for _, value in scalars["val/num_samples"]] == [11, 11]  # 6 + 5 over the two ranks
    assert images["samples/grid"] == [2, 4]
    state = torch.load(tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert on_device(state["net.conv_in.weight"])
