"""benchmarks/bench.py: diffusers' twin network matches ours in size and contract; one measurement runs."""

import json
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
    if cfg["data"]["source"]["class_path"] == "diffusion_lit.data.sources.ImageFolder":
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
    cfg["model"]["guide"] = {"class_path": "diffusion_lit.model.guidance.Guide", "init_args": {"net": {
        "class_path": "diffusion_lit.nets.unet.UNet", "init_args": {"base_channels": 8, "channel_mult": [1],
                                                              "attention_resolutions": [], "norm_groups": 4}}}}
    args = Namespace(config="configs/tiny_cpu.yaml", network="ours", device="cpu", batch_size=2, precision="32-true",
                     channels_last=False, compile=False, warmup=0, repeats=3, sample_steps=1)
    result = bench.measure(args, cfg)
    assert 0 < result["guide_params"] < result["params"]
    assert -1 < result["guide_share_of_step"] < 1  # a time ratio: its value is the benchmark's to print, not a test's


def test_a_child_measures_each_setting_and_counts_the_training_flops(tmp_path, monkeypatch, capsys):
    """What a GPU's one process per (config, network) does: the settings one after the other, a JSON line each."""
    assert [bench.parse_setting(s) for s in ("32-true", bench.LADDER[-1])] == [
        {"precision": "32-true", "channels_last": False, "compile": False},
        {"precision": "bf16-mixed", "channels_last": True, "compile": True}]
    with pytest.raises(SystemExit, match="a setting is a precision"):
        bench.parse_setting("fp8+channels_last")
    monkeypatch.setattr(sys, "argv", ["bench.py", "--config", "configs/tiny_cpu.yaml", "--network", "ours", "--quick",
                                      "--batch_size", "2", "--device", "cpu", "--peak_tflops", "4",
                                      "--settings", "32-true", "bf16-mixed+channels_last"])
    bench.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["setting"] for row in rows] == ["32-true", "bf16-mixed+channels_last"]
    for row in rows:  # FLOPs count the same whatever the precision or memory format
        assert row["train_gflop_per_img"] == rows[0]["train_gflop_per_img"] > 0
        assert row["peak_share"] == pytest.approx(row["train_tflop_s"] / 4)
        assert row["train_tflop_s"] == pytest.approx(row["train_gflop_per_img"] * row["train_img_s"] / 1e3)


def test_the_flop_count_is_per_image_two_flops_a_multiply_add():
    module, _ = bench.build(config("tiny_cpu.yaml", None), "ours")
    one, three = (bench.train_flops(module, torch.zeros(n, 1, 28, 28)) for n in (1, 3))
    assert three == 3 * one
    # A 3x3 convolution of c_in to c_out channels on an HxW map: 2 c_in c_out 9 H W FLOPs forward, twice that
    # backward (the input's gradient and the weight's), except the first layer, whose input needs none.
    conv_in = module.net.conv_in
    first = 2 * conv_in.in_channels * conv_in.out_channels * 9 * 28 * 28
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        conv_in(torch.zeros(1, 1, 28, 28)).sum().backward()
    assert counter.get_total_flops() == 2 * first  # forward, and the weight's gradient


def test_the_twins_count_the_same_flops(tmp_path):
    """The same plan, the same arithmetic: attention included (counted as its matrix products on every device)."""
    cfg = config("mnist.yaml", tmp_path)  # attention at 14x14
    x0 = torch.zeros(1, 1, 28, 28)
    assert bench.train_flops(bench.build(cfg, "ours")[0], x0) == bench.train_flops(bench.build(cfg, "diffusers")[0], x0)
