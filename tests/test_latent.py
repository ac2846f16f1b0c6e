"""Latent diffusion: the autoencoder stage (diffusers' AutoencoderKL), and diffusion on its scaled latents."""

import sys
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lit.model.autoencoder import AutoencoderModule, psnr
from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.model.conditioning import Prompts
from diffusion_lit.core.errors import UserError
from diffusion_lit.model.latent import Latent
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.data.sources import ImageFolder
from diffusion_lit.nets.text import ByteTextEncoder, CLIPText

from conftest import assert_halves_its_loss, bars, tiny_unet, write_image_folder
from test_cli import cli

diffusers = pytest.importorskip("diffusers")
TINY_AE = {"block_out_channels": (8, 16), "latent_channels": 2, "norm_num_groups": 4}


def test_encode_decode_shapes_and_psnr():
    ae = AutoencoderModule(image_size=16, channels=3, **TINY_AE)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = ae.vae.encode(x).latent_dist
    assert posterior.mean.shape == (2, 2, 8, 8)  # two levels: half the size
    assert ae.vae.decode(posterior.mode()).sample.shape == x.shape
    noisy = x + 0.1 * torch.randn_like(x)  # PSNR on the [0, 1] scale: 10 log10(1 / mse)
    expected = -10 * torch.log10(((noisy - x) / 2).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(psnr(noisy, x), expected)
    assert psnr(x, x).min() > 90


def test_tiny_autoencoder_lowers_its_reconstruction_loss():
    ae = AutoencoderModule(image_size=8, channels=1, optimizer=partial(torch.optim.Adam, lr=2e-3), **TINY_AE)
    assert_halves_its_loss(ae, DataLoader(TensorDataset(bars(), torch.zeros(8)), batch_size=8), steps=60, window=5)


def test_a_diffusers_folder_loads_through_model_autoencoder(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=4, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "sd" / "vae")  # SD's layout: the autoencoder in a vae sub-folder
    model = DiffusionModule(tiny_unet, image_size=16, channels=1, latent=Latent(str(tmp_path / "sd")))
    assert model.shape == (2, 8, 8) and model.latent.scale.item() == 0.5  # its own scaling factor
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.latent.encode(x)
        assert z.shape == (3, 2, 8, 8)
        torch.testing.assert_close(model.latent.decode(z), vae.decode(z / 0.5).sample.clamp(-1, 1))
    assert not any("frozen." in k for k in model.state_dict())
    with pytest.raises(UserError, match="does not exist"):
        DiffusionModule(tiny_unet, image_size=16, channels=1, latent=Latent(str(tmp_path / "nothing")))
    with pytest.raises(UserError, match="takes 1-channel images and the data has 3"):
        DiffusionModule(tiny_unet, image_size=16, channels=3, latent=Latent(str(tmp_path / "sd")))
    # Caching latents without an autoencoder: the latent part needs one.
    result = cli("fit", "--config", "configs/tiny_cpu.yaml", "--model.latent", "Latent", "--model.latent.cache", "true",
                 "--trainer.logger.init_args.save_dir", tmp_path / "runs", "--trainer.max_steps", 1)
    assert result.returncode == 2 and "required: autoencoder" in result.stderr, result.stderr


@pytest.mark.parametrize("cache", ["false", "true"], ids=["encoded-each-step", "cached"])
def test_latent_diffusion_trains_resumes_exactly_and_samples_images(tmp_path, cache):
    root = write_image_folder(tmp_path / "images", n_per_class=16, size=16)
    runs = tmp_path / "runs"
    common = ["--data.source", "ImageFolder", "--data.source.root", root, "--data.batch_size", 8,
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", runs]
    result = cli("fit", "--config", "configs/digits_autoencoder.yaml", *common,
                 "--model.block_out_channels", "[8, 16]", "--model.norm_num_groups", 4, "--trainer.max_steps", 4,
                 "--trainer.max_time", "null", "--trainer.logger.init_args.name", "ae")
    assert result.returncode == 0, result.stderr
    ae_ckpt = runs / "ae" / "checkpoints" / "last.ckpt"
    wrong = cli("sample", "--ckpt_path", ae_ckpt, "--out", tmp_path / "x.png")  # not a diffusion checkpoint
    assert (wrong.returncode == 2 and "an autoencoder's checkpoint" in wrong.stderr
            and "model.latent" in wrong.stderr)  # the part that names an autoencoder

    def fit(name: str, steps: int, *extra):
        return cli("fit", "--config", "configs/tiny_cpu.yaml", *common, "--model.latent", "Latent",
                   "--model.latent.autoencoder", ae_ckpt,
                   "--trainer.logger.init_args.name", name, "--trainer.max_steps", steps, "--trainer.val_check_interval",
                   2, "--checkpoint.every_n_train_steps", 2, "--trainer.callbacks.init_args.sampling.steps", 2,
                   "--trainer.callbacks.init_args.every_n_steps", 2, "--model.latent.cache", cache, *extra)

    straight = fit("straight", 4)
    assert straight.returncode == 0, straight.stderr
    assert "latent scale:" in straight.stderr
    assert fit("resumed", 2).returncode == 0
    resumed = fit("resumed", 4, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr
    assert "latent scale:" not in resumed.stderr  # measured once, then carried in the checkpoint
    a = torch.load(runs / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(runs / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and not any("frozen." in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)

    # The measured scale brings the training latents to unit variance.
    model = DiffusionModule.load_from_checkpoint(runs / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    data = DiffusionDataModule(ImageFolder(str(root)), batch_size=8, num_workers=0)
    data.setup("fit")
    images = torch.stack([data.train_set[i][0] for i in range(len(data.train_set))])
    assert abs(model.latent.encode(images).std().item() - 1.0) < 0.1

    out = tmp_path / "samples.npz"
    result = cli("sample", "--ckpt_path", runs / "straight" / "checkpoints" / "last.ckpt", "--num_samples", 3,
                 "--steps", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    assert np.load(out)["arr_0"].shape == (3, 16, 16, 1)  # the data's size, through the decoder
    if cache == "true":
        return  # the autoencoder's checks below once

    # The autoencoder moves: the checkpoint names where it was, --autoencoder where it is (its weights checked).
    moved = tmp_path / "moved" / "ae.ckpt"
    moved.parent.mkdir()
    ae_ckpt.rename(moved)
    straight_ckpt = runs / "straight" / "checkpoints" / "last.ckpt"
    lost = cli("sample", "--ckpt_path", straight_ckpt, "--out", tmp_path / "lost.png")
    assert lost.returncode == 2 and "--autoencoder PATH" in lost.stderr.strip().splitlines()[-1]
    found = cli("sample", "--ckpt_path", straight_ckpt, "--autoencoder", moved, "--num_samples", 3, "--steps", 2,
                "--out", tmp_path / "found.npz")
    assert found.returncode == 0, found.stderr
    assert np.array_equal(np.load(tmp_path / "found.npz")["arr_0"], np.load(out)["arr_0"])
    other = torch.load(moved, weights_only=True)  # another autoencoder of the same shape
    for value in other["state_dict"].values():
        value.add_(0.01) if value.is_floating_point() else None
    torch.save(other, tmp_path / "other.ckpt")
    wrong = cli("sample", "--ckpt_path", straight_ckpt, "--autoencoder", tmp_path / "other.ckpt", "--out", out)
    line = wrong.stderr.strip().splitlines()[-1]
    assert wrong.returncode == 2 and "is not the one this model was trained with" in line and "other.ckpt" in line


@pytest.mark.parametrize("package, part", [("diffusers", "latent"), ("transformers", "conditioning")])
def test_without_the_sd_extra_latent_and_clip_models_say_what_to_install(monkeypatch, tmp_path, package, part):
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not installed
    build = {"latent": lambda: Latent(str(tmp_path)), "conditioning": lambda: Prompts(CLIPText(str(tmp_path)))}[part]
    with pytest.raises(UserError, match=rf'needs the {package} package: pip install -e "\.\[sd\]"'):
        DiffusionModule(tiny_unet, image_size=16, channels=1, **{part: build()})
    DiffusionModule(tiny_unet, image_size=16, channels=1,
                    conditioning=Prompts(ByteTextEncoder()))  # the pixel trainer needs neither

