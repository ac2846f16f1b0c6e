"""benchmarks/bench.py: diffusers' twin network matches ours in size and contract; one measurement runs."""

import sys
from argparse import Namespace

import pytest
import torch
import yaml

from conftest import write_image_folder
from test_cli import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench  # noqa: E402


def config(name: str, tmp_path) -> dict:
    """The config, its image folder (if any) replaced by a few 28x28 digits-like images."""
    cfg = yaml.safe_load((REPO / "configs" / name).read_text())
    if cfg["data"]["source"]["class_path"] == "diffusion_lit.sources.ImageFolder":
        cfg["data"]["source"]["init_args"] = {"root": str(write_image_folder(tmp_path / "images", size=28))}
    return cfg


@pytest.mark.parametrize("name", ["mnist.yaml", "cifar10.yaml", "mnist_cpu.yaml"])
def test_diffusers_twin_is_within_ten_percent_of_ours(name, tmp_path):
    cfg = config(name, tmp_path)
    ours, batch_size = bench.build(cfg, "ours")
    theirs, _ = bench.build(cfg, "diffusers")
    n_ours, n_theirs = (sum(p.numel() for p in m.net.parameters()) for m in (ours, theirs))
    assert 0.9 < n_ours / n_theirs < 1.1, (n_ours, n_theirs)
    hp = ours.hparams
    x = torch.randn(2, hp.channels, hp.image_size, hp.image_size)
    t = torch.tensor([0, 999])
    assert theirs.net(x, t).shape == ours.net(x, t).shape == x.shape
    assert batch_size == cfg["data"]["batch_size"]


def test_one_measurement_reports_every_number(tmp_path):
    args = Namespace(config="configs/tiny_cpu.yaml", network="diffusers", device="cpu", batch_size=2,
                     precision="32-true", channels_last=False, compile=False, warmup=0, repeats=1,
                     sample_steps=1)
    result = bench.measure(args, config("tiny_cpu.yaml", tmp_path))
    assert result["batch_size"] == 2 and result["ddpm_steps"] == 1000
    for key in ("train_img_s", "ddim50_img_s", "ddpm_img_s", "peak_train_mib", "peak_sample_mib", "first_train_step_s"):
        assert result[key] > 0, key
    # DDPM takes 1000 steps to DDIM's 50, each one network call: about 20 times slower per image.
    assert 5 < result["ddim50_img_s"] / result["ddpm_img_s"] < 80


def test_the_share_of_a_training_step_the_guide_takes_is_measured(tmp_path):
    cfg = config("tiny_cpu.yaml", tmp_path)
    cfg["model"]["guide"] = {"class_path": "diffusion_lit.guidance.Guide", "init_args": {"net": {
        "class_path": "diffusion_lit.unet.UNet", "init_args": {"base_channels": 8, "channel_mult": [1],
                                                              "attention_resolutions": [], "norm_groups": 4}}}}
    args = Namespace(config="configs/tiny_cpu.yaml", network="ours", device="cpu", batch_size=2, precision="32-true",
                     channels_last=False, compile=False, warmup=0, repeats=3, sample_steps=1)
    result = bench.measure(args, cfg)
    assert 0 < result["guide_params"] < result["params"]
    assert -1 < result["guide_share_of_step"] < 1  # a time ratio: its value is the benchmark's to print, not a test's
