"""The command line, as a user runs it."""

import contextlib
import io
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_lit.cli import main

from conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def cli(*args, cwd=REPO, **env_vars) -> subprocess.CompletedProcess:
    """`python -m diffusion_lit *args`, in this process (the interpreter's start and imports cost seconds a call).

    A subprocess where one is needed: with environment variables of its own, and for DDP, whose launcher starts the
    same command line again. A few tests always run one (`python_m`), so the module's entry point is covered too.
    """
    words = [str(a) for a in args]
    if env_vars or any(w == "ddp" or w.startswith(("ddp_", "--trainer.strategy=ddp")) for w in words):
        return python_m(*words, cwd=cwd, **env_vars)
    out, err = io.StringIO(), io.StringIO()
    before_cwd, before_env, before_filters = os.getcwd(), dict(os.environ), warnings.filters[:]
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(words)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            except Exception:  # what a subprocess would die of: a traceback and status 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(before_cwd)
        os.environ.clear()
        os.environ.update(before_env)  # seed_everything leaves PL_GLOBAL_SEED behind
        warnings.filters[:] = before_filters
        torch.set_grad_enabled(True)
    return subprocess.CompletedProcess(words, code, out.getvalue(), err.getvalue())


def python_m(*args, cwd=REPO, **env_vars) -> subprocess.CompletedProcess:
    """`python -m diffusion_lit *args` in a subprocess, as a user runs it."""
    # tests/ on the path for the feature network tests.features.TinyFeatures
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "2", **env_vars}
    return subprocess.run(
        [sys.executable, "-m", "diffusion_lit", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )


def scalars(run_dir: Path, tag: str) -> list[int]:
    """Steps at which `tag` was logged, over every event file in the run's folder."""
    steps = []
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return steps


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config):
    result = cli("fit", "--config", config, "--print_config")  # one `fit` for every config
    assert result.returncode == 0, result.stderr
    model = yaml.safe_load(result.stdout)["model"]
    if model.get("class_path") == "diffusion_lit.model.autoencoder.AutoencoderModule":  # the config names its module
        assert model["init_args"]["latent_channels"] > 0
    elif model.get("class_path") == "diffusion_lit.model.stable_diffusion.StableDiffusionModule":
        assert model["init_args"]["lora_rank"] > 0  # its net comes from --model.pretrained
    else:
        assert model["net"]["class_path"] in {"diffusion_lit.UNet", "diffusion_lit.nets.unet.UNet", "diffusion_lit.nets.dit.DiT"}


def test_a_refusal_of_a_config_named_module_is_one_error_line():
    # jsonargparse reports a class_path module's own UserError as a union that did not validate: still one line.
    result = cli("fit", "--config", "configs/digits_autoencoder.yaml", "--model.init_args.kl_weight", "-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: kl_weight must not be negative (a negative weight rewards a divergent latent), got -1.0"]


def test_a_config_given_to_the_wrong_command_names_the_right_one(tmp_path):
    diffusion = cli("autoencoder", "fit", "--config", "configs/tiny_cpu.yaml", "--print_config")
    assert diffusion.returncode == 2 and "Traceback" not in diffusion.stderr
    assert "run `python -m diffusion_lit fit --config configs/tiny_cpu.yaml" in diffusion.stderr
    # The synonym still takes the autoencoder's config.
    synonym = cli("autoencoder", "fit", "--config", "configs/digits_autoencoder.yaml", "--print_config")
    assert synonym.returncode == 0, synonym.stderr
    foreign = tmp_path / "foreign.yaml"
    foreign.write_text("model:\n  class_path: os.system\n  init_args: {}\n")
    refused = cli("fit", "--config", foreign, "--print_config")
    assert refused.returncode == 2 and "not one of diffusion_lit's modules" in refused.stderr


def test_fit_writes_tensorboard_and_checkpoints_then_resumes(tmp_path):
    images = write_image_folder(tmp_path / "images", n_per_class=16, size=16)
    common = [
        "fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "ImageFolder",
        "--data.source.root", images, "--data.batch_size", 8,
        "--trainer.logger.init_args.save_dir", tmp_path / "runs", "--trainer.log_every_n_steps", 1,
        "--checkpoint.every_n_train_steps", 3, "--trainer.val_check_interval", 3, "--trainer.callbacks", "[]",
    ]
    first = cli(*common, "--trainer.max_steps", 4)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "runs" / "tiny_cpu"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "step00000003.ckpt").is_file()
    assert scalars(run_dir, "train/loss") == [0, 1, 2, 3]
    assert scalars(run_dir, "val/loss")

    again = cli(*common, "--trainer.max_steps", 4)  # a fresh run would bury the earlier one: refused
    assert again.returncode != 0 and "--ckpt_path last" in again.stderr and "Traceback" not in again.stderr

    resumed = cli(*common, "--trainer.max_steps", 7, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 7
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])
    assert scalars(run_dir, "train/loss") == list(range(7))  # the same curve, continued in the same folder

    fresh = cli(*common, "--trainer.max_steps", 2, "--fresh_run", "true")  # the earlier run is set aside, not lost
    assert fresh.returncode == 0, fresh.stderr
    assert torch.load(run_dir.with_name("tiny_cpu.1") / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_resume_without_a_checkpoint_stops_with_a_message(tmp_path):
    images = write_image_folder(tmp_path / "images")
    result = cli(
        "fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "ImageFolder",
        "--data.source.root", images,
        "--trainer.logger.init_args.save_dir", tmp_path / "runs", "--ckpt_path", "last",
    )
    assert result.returncode != 0
    assert "nothing to resume" in result.stderr and "Traceback" not in result.stderr


def test_missing_dataset_prints_one_message(tmp_path):
    # CIFAR-10 has no stand-in (MNIST has the shipped digits: tests/test_digits.py)
    result = cli(
        "fit", "--config", REPO / "configs/cifar10.yaml", "--data.source.root", tmp_path / "nowhere",
        "--data.source.download", "false",
        "--trainer.logger.init_args.save_dir", tmp_path / "runs",
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and str(tmp_path / "nowhere") in message[0] and "--data.source ImageFolder" in message[0]


def test_missing_image_folder_prints_one_message(tmp_path):
    result = cli("fit", "--config", REPO / "configs/mnist.yaml",
                 "--data.source", "ImageFolder", "--data.source.root", tmp_path / "x")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr
