"""Bad input ends with one clear message, a non-zero exit status and no traceback; nothing is lost."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import write_image_folder
from test_cli import REPO, cli


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", n_per_class=16, size=16)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, images):
    """A good checkpoint of a 2-step run, and a truncated copy of it."""
    tmp = tmp_path_factory.mktemp("ckpt")
    result = cli("fit", *fit_args(images, tmp), "--trainer.max_steps", 2)
    assert result.returncode == 0, result.stderr
    good = tmp / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt"
    truncated = tmp / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return good, truncated


def fit_args(images, tmp):
    return ["--config", REPO / "configs/tiny_cpu.yaml", "--data.root", images, "--data.batch_size", 4,
            "--trainer.logger.init_args.save_dir", tmp / "runs", "--trainer.enable_progress_bar", "false"]


def assert_clean_failure(result, *phrases):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args,phrases",
    [
        (["--model.schedule", "quadratic"], ["model.schedule", "'linear', 'cosine'"]),
        (["--data.dataset", "imagenet"], ["data.dataset", "'mnist', 'cifar10', 'folder'"]),
        (["--model.optimizer.init_args.lr", "-0.1", "--trainer.max_steps", "1"], ["Invalid learning rate: -0.1"]),
        (["--trainer.max_steps", "-5"], ["max_steps", "-5"]),
        (["--model.warmup_steps", "-1"], ["warmup_steps must not be negative"]),
        (["--data.image_size", "15", "--trainer.max_steps", "1"], ["image_size 15 cannot be halved"]),
    ],
    ids=["schedule", "dataset", "learning-rate", "max-steps", "warmup", "image-size"],
)
def test_bad_fit_values(images, tmp_path, args, phrases):
    assert_clean_failure(cli("fit", *fit_args(images, tmp_path), *args), *phrases)


@pytest.mark.parametrize(
    "args,phrases",
    [
        (["--sampler", "euler"], ["sampler", "'ddpm', 'ddim'"]),
        (["--steps", "0"], ["DDIM steps must lie in [1, 1000]"]),
        (["--num_samples", "-3"], ["num_samples and batch_size must be at least 1"]),
    ],
    ids=["sampler", "steps", "num-samples"],
)
def test_bad_sample_values(checkpoints, tmp_path, args, phrases):
    good, _ = checkpoints
    assert_clean_failure(cli("sample", "--ckpt_path", good, "--out", tmp_path / "x.png", *args), *phrases)


def test_truncated_checkpoint(images, checkpoints, tmp_path):
    _, truncated = checkpoints
    assert_clean_failure(cli("fit", *fit_args(images, tmp_path), "--ckpt_path", truncated), "not a readable checkpoint")
    assert_clean_failure(cli("sample", "--ckpt_path", truncated), "could not be loaded")
    assert_clean_failure(
        cli("evaluate", "--ckpt_path", truncated, "--feature_extractor", "features.TinyFeatures"), "could not be loaded"
    )


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(images, tmp_path):
    result = cli("fit", *fit_args(images, tmp_path), "--model.optimizer.init_args.lr", "1e30",
                 "--model.warmup_steps", "0", "--trainer.max_steps", "50", "--checkpoint.every_n_train_steps", "1")
    assert_clean_failure(result, "training diverged", "--ckpt_path last")
    step = int(result.stderr.split(" at step ")[1].split(":")[0])
    last = torch.load(tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == step  # saved after the last step whose loss was finite
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_killed_run_resumes_from_last(images, tmp_path):
    args = [*fit_args(images, tmp_path), "--checkpoint.every_n_train_steps", "2", "--trainer.val_check_interval", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_lit", "fit", *map(str, args), "--trainer.max_steps", "1000"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not (last.is_file() and len(list(last.parent.glob("step*.ckpt"))) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # wherever it is: training, or in the middle of writing a checkpoint
    proc.wait()
    assert last.is_file(), "no checkpoint was written within two minutes"
    killed_at = torch.load(last, weights_only=True)["global_step"]

    resumed = cli("fit", *args, "--trainer.max_steps", killed_at + 3, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == killed_at + 3
