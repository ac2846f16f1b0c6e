"""Bad input ends with one clear message, a non-zero exit status and no traceback; nothing is lost."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from diffusion_lit.commands.evaluate import evaluate
from diffusion_lit.io.loading import load_checkpoint
from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.core.errors import UserError
from diffusion_lit.data.images import check_output, save_images
from diffusion_lit.training.metrics import ImageFeatures, extract
from diffusion_lit.data.sources import ImageFolder

from conftest import write_image_folder
from test_cli import REPO, cli, python_m


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
    return ["--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "ImageFolder", "--data.source.root", images,
            "--data.batch_size", 4, "--trainer.logger.init_args.save_dir", tmp / "runs",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]


def assert_clean_failure(result, *phrases):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args,phrases",
    [
        (["--model.process", "VP", "--model.process.schedule", "quadratic"], ["schedule", "quadratic"]),
        (["--model.schedule", "cosine"], ["--model.schedule is an option of older diffusion_lit",
                                          "--model.process VP --model.process.schedule"]),
        (["--model.conditional", "true"], ["--model.conditioning Labels"]),
        (["--data.source", "ImageNet"], ["data.source", "ImageNet"]),
        (["--data.dataset", "imagenet"], ["unknown dataset 'imagenet'", "ShippedDigits, MNIST, CIFAR10, ImageFolder"]),
        (["--model.optimizer.init_args.lr", "-0.1", "--trainer.max_steps", "1"], ["Invalid learning rate: -0.1"]),
        (["--trainer.max_steps", "-5"], ["max_steps", "-5"]),
        (["--model.warmup_steps", "-1"], ["warmup_steps must not be negative"]),
        (["--data.image_size", "15", "--trainer.max_steps", "1"], ["image_size 15 cannot be halved"]),
        (["--data.num_workers", "-1"], ["num_workers must be 0"]),
    ],
    ids=["schedule", "old-schedule", "old-conditional", "source", "old-dataset", "learning-rate", "max-steps", "warmup", "image-size", "workers"],
)
def test_bad_fit_values(images, tmp_path, args, phrases):
    assert_clean_failure(cli("fit", *fit_args(images, tmp_path), *args), *phrases)


@pytest.mark.parametrize(
    "args,phrases",
    [
        (["--sampler", "euler_a"], ["sampler", "'ddpm', 'ddim', 'euler', 'heun', 'dpmpp_2m'"]),
        (["--spacing", "karras", "--sampler", "ddim"], ["spacing 'karras' is for the ODE solvers"]),
        (["--steps", "0"], ["DDIM steps must lie in [1, 1000]"]),
        (["--num_samples", "-3"], ["num_samples and batch_size must be at least 1"]),
    ],
    ids=["sampler", "spacing", "steps", "num-samples"],
)
def test_bad_sample_values(checkpoints, tmp_path, args, phrases):
    good, _ = checkpoints
    assert_clean_failure(cli("sample", "--ckpt_path", good, "--out", tmp_path / "x.png", *args), *phrases)


def test_truncated_and_empty_checkpoints(images, checkpoints, tmp_path):
    _, truncated = checkpoints
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert_clean_failure(cli("fit", *fit_args(images, tmp_path), "--ckpt_path", truncated), "not a readable checkpoint")
    for bad in (truncated, empty):
        assert_clean_failure(cli("sample", "--ckpt_path", bad), "could not be loaded")
        assert_clean_failure(
            cli("evaluate", "--ckpt_path", bad, "--feature_extractor", "features.TinyFeatures"), "could not be loaded"
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
    proc.send_signal(signal.SIGKILL)  # wherever it is: training, or in the middle of writing a checkpoint; its run
    # lock goes with it, so the resume below is not blocked
    proc.wait()
    assert last.is_file(), "no checkpoint was written within two minutes"
    killed_at = torch.load(last, weights_only=True)["global_step"]

    resumed = cli("fit", *args, "--trainer.max_steps", killed_at + 3, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == killed_at + 3


def test_unreadable_images_stop_before_training_or_are_skipped(images, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    (folder / "a" / "corrupt.png").write_bytes(b"\x89PNG not really")
    stopped = cli("fit", *fit_args(folder, tmp_path))
    assert_clean_failure(stopped, "1 of 33 image files", "corrupt.png", "--data.source.skip_unreadable true")
    assert not (tmp_path / "runs" / "tiny_cpu" / "checkpoints").exists()  # before the first step
    result = cli("fit", *fit_args(folder, tmp_path), "--data.source.skip_unreadable", "true", "--trainer.max_steps", 1)
    assert result.returncode == 0, result.stderr
    assert "1 of 33 image files" in result.stderr and "left out" in result.stderr


def test_a_folder_of_mixed_images_says_what_it_converts(tmp_path, capsys):
    write_image_folder(tmp_path / "mixed", n_per_class=4, size=16)
    Image.new("RGB", (20, 24)).save(tmp_path / "mixed" / "a" / "rgb.png")
    DiffusionDataModule(ImageFolder(str(tmp_path / "mixed")), batch_size=2).setup()
    assert "of 9 images, 1 resized and center-cropped to 16x16 and 1 converted from other colour modes to L" in (
        capsys.readouterr().err)


def test_sample_checks_its_output_before_sampling(checkpoints, tmp_path):
    good, _ = checkpoints
    (tmp_path / "taken.png").mkdir()
    result = cli("sample", "--ckpt_path", good, "--out", tmp_path / "taken.png", "--num_samples", 100000)
    assert_clean_failure(result, "is an existing folder")
    assert "sampling" not in result.stderr  # no progress bar: nothing was written
    (tmp_path / "file").write_text("")
    for out, phrase in [(tmp_path / "file", "is an existing file"), (tmp_path / "file" / "x.png", "cannot write in"),
                        ("/proc/no/such/x.png", "cannot write in"), (tmp_path / "x.gif", "unknown extension")]:
        with pytest.raises(UserError, match=phrase):
            check_output(out)


def test_jpeg_grid(tmp_path):
    path = save_images(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), tmp_path / "grid.jpg")
    assert path.is_file() and Image.open(path).format == "JPEG"


def test_a_folder_as_checkpoint_is_named_a_folder(checkpoints):
    good, _ = checkpoints
    with pytest.raises(UserError, match="is a folder: give a checkpoint file in it, such as .*last.ckpt"):
        load_checkpoint(str(good.parent))


def test_evaluate_checks_the_reference_before_sampling(checkpoints, tmp_path, monkeypatch):
    good, _ = checkpoints
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["source"]["init_args"]["root"] = "relative/images"  # fit ran elsewhere
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="run evaluate from the folder `fit` ran in, or give .* --real DIR") as err:
        evaluate(ckpt_path="moved.ckpt", num_samples=100000, feature_extractor="features.TinyFeatures")
    assert "--data.source.root" not in str(err.value)

    write_image_folder(tmp_path / "big", n_per_class=4, size=32)
    with pytest.raises(UserError, match="the samples are 16x16 with 1 channel and the real images 32x32"):
        evaluate(ckpt_path=str(good), real=str(tmp_path / "big"), num_samples=100000,
                 feature_extractor="features.TinyFeatures")


def test_a_feature_network_without_parameters(tmp_path):
    features = ImageFeatures("features.PooledPixels")
    assert extract(features, torch.zeros(3, 1, 8, 8, dtype=torch.uint8)).shape == (3, 16)


def test_a_config_error_is_one_line_not_the_usage(images, tmp_path):
    result = cli("fit", *fit_args(images, tmp_path), "--model.no_such_option", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("error:") and "no_such_option" in lines[-1], result.stderr


def test_a_guidance_scale_for_an_unconditional_model_is_said_before_training(tmp_path):
    # a subprocess: the order of our line and Lightning's own log lines is what is checked. The config's own callbacks
    # (its grid and FID run at the end) on 8x8 images, which keep them short.
    images = write_image_folder(tmp_path / "images", n_per_class=4, size=8)
    result = python_m("fit", "--config", REPO / "configs/mnist_cpu.yaml", "--data.source", "ImageFolder",
                      "--data.source.root", images, "--data.batch_size", 4,
                      "--trainer.logger.init_args.save_dir", tmp_path / "runs", "--trainer.enable_progress_bar", "false",
                      "--model.conditioning", "null", "--trainer.max_steps", 1)
    assert result.returncode == 0, result.stderr
    warning = result.stderr.index("SampleGrid: guidance_scale 1.25 is ignored")
    assert warning < result.stderr.index("Trainer.fit` stopped")
