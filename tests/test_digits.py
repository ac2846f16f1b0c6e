"""The shipped digits, the digit judge, and a fresh clone's offline main command."""

import json
import os

import numpy as np
import pytest
import torch

from diffusion_lit.commands.evaluate import evaluate
from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.data.digits import DigitJudge, frame_stats, held_out, judge_counts, shipped_digits
from diffusion_lit.training.metrics import ImageFeatures, compute, extract, fid_and_kid
from diffusion_lit.data.sources import ShippedDigits

from test_cli import REPO, cli

# MNIST's test split, per digit (LeCun, Cortes & Burges): a known value the IDX reader must reproduce.
TEST_SPLIT_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_the_shipped_digits_are_mnists_test_split():
    images, labels = shipped_digits()
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == TEST_SPLIT_COUNTS
    assert images[:, :, :4, :4].max() == 0 and images.float().mean().item() == pytest.approx(33.79, abs=0.05)
    data = DiffusionDataModule(ShippedDigits(), batch_size=8)
    data.setup()
    x, y = data.train_set[0]
    assert (data.image_size, data.channels, data.num_classes) == (28, 1, 10)
    assert x.shape == (1, 28, 28) and x.min() == -1 and x.max() <= 1 and 0 <= y <= 9


def test_the_judge_knows_digits_it_never_trained_on():
    images, labels = shipped_digits()
    index = torch.tensor(held_out())
    with torch.no_grad():
        logits = DigitJudge().classify(images[index].float() / 255)
    assert (logits.argmax(1) == labels[index]).float().mean() > 0.97
    confident, requested = judge_counts(logits, labels[index]) / len(index)
    assert confident > 0.9 and requested > 0.97


def fid_of(a: torch.Tensor, b: torch.Tensor, features: ImageFeatures) -> float:
    fid, kid = fid_and_kid(64, 100)
    fid.update(extract(features, a), real=True)
    fid.update(extract(features, b), real=False)
    kid.update(extract(features, a), real=True)
    kid.update(extract(features, b), real=False)
    return compute(fid, kid)["fid"]


def test_digit_fid_is_near_zero_for_two_halves_and_large_for_noise():
    images, _ = shipped_digits()
    features = ImageFeatures("digits")
    same = fid_of(images[:5000], images[5000:], features)
    noise = torch.randint(0, 256, (5000, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    different = fid_of(images[:5000], noise, features)
    assert same < 1.0 and different > 100 * same, (same, different)


def test_evaluate_with_the_judge_on_real_digits(tmp_path, capsys):
    images, _ = shipped_digits()
    for name, part in (("fake", images[:1000]), ("real", images[5000:7000])):
        np.savez(tmp_path / f"{name}.npz", arr_0=part.permute(0, 2, 3, 1).numpy())
    evaluate(samples=str(tmp_path / "fake.npz"), real=str(tmp_path / "real.npz"), feature_extractor="digits")
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["confident_share"] > 0.9 and "requested_share" not in scores
    assert scores["num_samples"] == 1000 and scores["fid"] < 5
    # Real digits' frames are black (the 10,000 shipped ones: mean 2.24, 0.4% above 10).
    assert scores["frame_mean"] < 4 and scores["grey_frame_share"] < 0.02, scores


def test_frame_stats_read_the_four_pixel_border():
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 4:-4, 4:-4] = 255  # strokes inside the frame are not counted
    images[:2, :, :4] = 40  # the top 4 rows of the first two images: 112 of the border's 384 pixels
    stats = frame_stats(images)
    assert stats["grey_frame_share"] == 0.5  # 40 * 112 / 384 = 11.7 > 10
    assert abs(stats["frame_mean"] - 40 * 112 / 384 / 2) < 1e-5


def test_offline_mnist_trains_on_the_shipped_digits(tmp_path, monkeypatch):
    """The main command on a machine without the full MNIST and without a network: it trains, and says so once."""
    for proxy in ("http_proxy", "https_proxy"):  # every download refused (urllib reads them at each request)
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    result = cli("fit", "--config", REPO / "configs/mnist.yaml", "--data.source.root", tmp_path / "empty",
                 "--data.batch_size", 4, "--trainer.max_steps", 2, "--trainer.limit_val_batches", 0,
                 "--trainer.callbacks", "[]", "--trainer.logger.init_args.save_dir", tmp_path / "runs",
                 "--trainer.enable_progress_bar", "false")
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "ship with diffusion_lit" in line]
    assert len(said) == 1 and "train-images-idx3-ubyte" in said[0] and str(tmp_path / "empty") in said[0]
    checkpoint = torch.load(tmp_path / "runs" / "mnist" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2


def test_nothing_points_outside_the_repository():
    """Configs, notebooks, benchmarks, tests, the package and the README never name the folder beside the clone."""
    places = ["configs", "notebooks", "benchmarks", "tests", "diffusion_lit", "README.md", "pyproject.toml"]
    files = [p for place in places for p in ([REPO / place] if (REPO / place).is_file() else (REPO / place).rglob("*"))
             if p.is_file() and p.suffix in (".py", ".yaml", ".ipynb", ".md", ".toml")]
    needles = [os.path.join("..", "shared"), os.path.join("shared", "data")]  # spelled so this file does not match
    offenders = [p for p in files if any(needle in p.read_text(errors="ignore") for needle in needles)]
    assert len(files) > 30 and not offenders
