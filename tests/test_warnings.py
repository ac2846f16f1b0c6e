"""One-line notices and refusals at the edges of a run: a CPU run that would take hours, bf16 on a CPU without bf16
instructions, a LoRA checkpoint given another base model, the folder scan's running count, and GuideCheckpoint's save
without Lightning's `weights_only` log line."""

import json
import logging
import os
import shutil
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import RunningStage
from PIL import Image

from diffusion_lit.data import folders
from diffusion_lit.training import speed
from diffusion_lit.core.errors import UserError
from diffusion_lit.data.folders import FolderIndex, walk
from diffusion_lit.training.speed import CpuCost, cpu_has_bf16, warn_bf16
from test_cli import cli
from test_errors import fit_args, images  # noqa: F401
from test_hard_edges import assert_one_error_line


class Clock:
    """time.perf_counter for CpuCost: each step takes `first` seconds (the warm-up), then `step` seconds."""

    def __init__(self, first: float, step: float) -> None:
        self.now, self.first, self.step, self.calls = 0.0, first, step, 0

    def __call__(self) -> float:
        self.now += self.first if self.calls == 0 else self.step
        self.calls += 1
        return self.now


def drive(monkeypatch, steps: int, per_step: float, device: str = "cpu", callbacks=(), **limits) -> CpuCost:
    """CpuCost over `steps` optimizer steps of `per_step` seconds (the first 60 s) on a stand-in trainer."""
    monkeypatch.setattr(speed, "perf_counter", Clock(60.0, per_step))
    trainer = SimpleNamespace(global_step=0, max_steps=-1, max_epochs=-1, num_training_batches=74,
                              accumulate_grad_batches=1, callbacks=list(callbacks), precision="32-true",
                              strategy=SimpleNamespace(root_device=torch.device(device)))
    trainer.__dict__.update(limits)
    cost = CpuCost()
    cost.setup(trainer, None, "fit")
    cost.on_train_start(trainer, None)
    for _ in range(steps):
        trainer.global_step += 1
        for batch_idx in range(2):  # two micro-batches a step (one of them mid-accumulation): timed once
            cost.on_train_batch_end(trainer, None, None, None, batch_idx)
    return cost


def notices(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("fit: a training step takes")]


def test_a_cpu_run_of_days_is_said_in_one_line_with_its_step_time_and_the_cpu_recipes(monkeypatch, capsys):
    drive(monkeypatch, 10, 4.0, max_steps=100_000)
    [line] = notices(capsys.readouterr().err)
    assert "4.00 s" in line and "steps 2-4" in line  # the first step (60 s: warm-up) is not counted
    assert "about 4.6 days" in line and "99,996 more steps to max_steps 100,000" in line  # 99,996 x 4 s
    assert "configs/mnist_cpu.yaml" in line and "configs/tiny_cpu.yaml" in line and "60 minutes" in line


def test_no_line_for_a_run_within_the_hour_on_a_gpu_or_of_no_set_length(monkeypatch, capsys):
    drive(monkeypatch, 10, 4.0, max_steps=800)  # 796 x 4 s: 53 minutes
    drive(monkeypatch, 10, 4.0, max_steps=100_000, device="cuda")
    drive(monkeypatch, 10, 4.0)  # no max_steps, max_epochs or max_time: no time to give
    timer = Timer(duration="00:00:10:00")  # max_time 10 minutes, started now
    timer._start_time[RunningStage.TRAINING] = time.monotonic()
    drive(monkeypatch, 10, 4.0, max_steps=100_000, callbacks=[timer])
    assert notices(capsys.readouterr().err) == []
    drive(monkeypatch, 10, 4.0, max_steps=1000)  # 996 x 4 s: 66 minutes
    assert len(notices(capsys.readouterr().err)) == 1


def test_max_time_and_max_epochs_set_the_length_said(monkeypatch, capsys):
    timer = Timer(duration="03:00:00:00")
    timer._start_time[RunningStage.TRAINING] = time.monotonic()
    drive(monkeypatch, 10, 4.0, max_steps=100_000, callbacks=[timer])  # 4.6 days of steps, stopped at 3 days
    drive(monkeypatch, 10, 4.0, max_epochs=100)  # 100 epochs of 74 steps, less the 4 done: 7,396 x 4 s
    first, second = notices(capsys.readouterr().err)
    assert "(max_time 3.0 days)" in first and "about 3.0 days" in first
    assert "7,396 more steps to max_epochs 100" in second and "about 8.2 hours" in second


def test_slow_steps_are_timed_for_30_seconds_rather_than_three_steps(monkeypatch, capsys):
    cost = drive(monkeypatch, 2, 40.0, max_steps=100_000)  # step 2 took 40 s: said at step 2, not step 4
    assert cost.done
    [line] = notices(capsys.readouterr().err)
    assert "40.00 s" in line and "step 2," in line


def test_bf16_is_warned_of_where_the_cpu_has_no_bf16_instructions(monkeypatch, capsys):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", "avx2": True,
                                                               "cpu_name": "AMD EPYC"})
    assert not cpu_has_bf16()
    warn_bf16("bf16-mixed", "cpu", "--precision")
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("--precision bf16-mixed: this CPU (AMD EPYC) has no bf16 instructions")
    assert "tens of times slower than float32" in line and "--precision 32-true" in line
    warn_bf16("32-true", "cpu", "--precision")
    warn_bf16("bf16-mixed", torch.device("cuda"), "--precision")
    assert capsys.readouterr().err == ""
    for flags in ({"avx512_bf16": True}, {"amx_bf16": True}, {"architecture": "arm64", "bf16": True}):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda flags=flags: flags)
        assert cpu_has_bf16(), flags
        warn_bf16("bf16-mixed", "cpu", "--trainer.precision")
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory, images):  # noqa: F811
    """A 5-step fit of configs/tiny_cpu.yaml in bf16 with a GuideCheckpoint, on a CPU made to lack bf16 and with
    every run called long: (its result, Lightning's checkpoint-connector log records, its last checkpoint)."""
    tmp = tmp_path_factory.mktemp("fit")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")
    logger.addHandler(handler)
    logger.info("heard")  # the handler hears this logger's INFO lines, Lightning's among them
    guide = [{"class_path": "diffusion_lit.training.callbacks.GuideCheckpoint", "init_args": {"share": 0.5}}]
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(speed, "SLOW_RUN_SECONDS", 0.0)
            patch.setattr(speed, "cpu_has_bf16", lambda: False)
            result = cli("fit", *fit_args(images, tmp), "--trainer.callbacks", json.dumps(guide),
                         "--trainer.max_steps", 5, "--trainer.precision", "bf16-mixed", "--trainer.accelerator", "cpu")
    finally:
        logger.removeHandler(handler)
    return result, records, tmp / "runs" / "tiny_cpu" / "checkpoints"


def test_every_fit_on_a_cpu_has_the_notices(tiny_fit):
    result, _, _ = tiny_fit
    assert result.returncode == 0, result.stderr
    [line] = notices(result.stderr)
    assert "1 more steps to max_steps 5" in line and "configs/mnist_cpu.yaml" in line
    bf16 = [line for line in result.stderr.splitlines() if "bf16-mixed: this CPU" in line]
    assert len(bf16) == 1 and bf16[0].startswith("--trainer.precision bf16-mixed")


def test_guide_checkpoint_saves_without_lightnings_weights_only_line(tiny_fit):
    result, records, checkpoints = tiny_fit
    assert result.returncode == 0, result.stderr
    assert (checkpoints / "guide.ckpt").is_file()
    assert "optimizer_states" in torch.load(checkpoints / "guide.ckpt", weights_only=True)  # the whole checkpoint
    said = [record.getMessage() for record in records]
    assert "heard" in said and not [m for m in said if "weights_only" in m], said  # "`weights_only` was not set, ..."


def test_sample_and_evaluate_warn_of_bf16_on_a_cpu_without_it(tiny_fit, tmp_path, monkeypatch):
    _, _, checkpoints = tiny_fit
    ckpt = checkpoints / "last.ckpt"
    sample = ["sample", "--ckpt_path", ckpt, "--num_samples", 2, "--steps", 2, "--precision", "bf16-mixed"]
    evaluate = ["evaluate", "--ckpt_path", ckpt, "--num_samples", 4, "--steps", 2, "--precision", "bf16-mixed",
                "--feature_extractor", "features.TinyFeatures", "--cache_dir", tmp_path / "cache", "--num_real", 8]
    for has_bf16 in (False, True):
        monkeypatch.setattr(speed, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        for args in (sample + ["--out", tmp_path / f"{has_bf16}.npz"], evaluate):
            result = cli(*args)
            assert result.returncode == 0, result.stderr
            said = [line for line in result.stderr.splitlines() if "bf16-mixed: this CPU" in line]
            assert len(said) == (0 if has_bf16 else 1), (args[0], result.stderr)
            assert all(line.startswith("--precision bf16-mixed") for line in said)


def test_the_folder_scan_counts_folders_before_any_image_is_found(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(folders, "SCAN_BAR_DELAY", 0.0)  # shown at once, not after half a second
    monkeypatch.setattr(folders, "tqdm", partial(folders.tqdm, mininterval=0))  # every count drawn, not 10 a second
    folder = tmp_path / "root"
    for name in "abc":
        (folder / name / "deeper").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        FolderIndex.scan(folder)
    err = capsys.readouterr().err
    assert f"looking for images in {folder}: 0 folders" in err  # from before the first folder is read
    assert f"looking for images in {folder}: 7 folders" in err  # root, a, b, c and their deeper/


def test_walking_a_deep_folder_costs_a_stat_a_folder_not_one_per_level(tmp_path, monkeypatch):
    folder = tmp_path / "root"
    folder.mkdir()
    for _ in range(200):
        folder = folder / "d"
        folder.mkdir()
    (folder / "x.png").write_bytes(b"")
    calls = []
    lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda *a, **k: calls.append(1) or lstat(*a, **k))
    assert list(walk(tmp_path / "root")) == [folder / "x.png"]
    assert len(calls) < 201  # Path.resolve() checked each level of each folder's path: 20,000 lstat calls here


# A LoRA checkpoint and the base it was trained on


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """(the tiny SD pipeline, a 1-step LoRA checkpoint of configs/sd_lora.yaml on it)."""
    for name in ("diffusers", "peft", "transformers"):
        pytest.importorskip(name)
    from test_stable_diffusion import fit_args as sd_fit_args
    from test_stable_diffusion import write_tiny_sd

    tmp = tmp_path_factory.mktemp("lora")
    sd, captioned = write_tiny_sd(tmp), tmp / "captioned"
    captioned.mkdir()
    rows = []
    for i, color in enumerate(("red", "blue")):
        image = np.zeros((16, 16, 3), np.uint8)
        image[4:12, 4:12, 2 * i] = 255
        Image.fromarray(image).save(captioned / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a {color} square"}) + "\n")
    (captioned / "metadata.jsonl").write_text("".join(rows), encoding="utf-8")
    result = cli(*sd_fit_args(tmp, sd, captioned, "lora", "--trainer.max_steps", 1, "--data.batch_size", 2,
                              "--trainer.callbacks", "[]"))
    assert result.returncode == 0, result.stderr
    return sd, tmp / "runs" / "lora" / "checkpoints" / "last.ckpt"


def perturbed(sd: Path, folder: Path, part: str) -> Path:
    """A copy of the pipeline folder whose `part` (unet or text_encoder) has the same shapes and weights + 0.5."""
    import diffusers
    import transformers

    shutil.copytree(sd, folder)
    kind = diffusers.UNet2DConditionModel if part == "unet" else transformers.CLIPTextModel
    model = kind.from_pretrained(str(folder / part))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    model.save_pretrained(str(folder / part))
    return folder


def test_a_lora_checkpoint_refuses_another_base_naming_what_differs(lora, tmp_path):
    sd, ckpt = lora
    recorded = torch.load(ckpt, weights_only=True)["base_fingerprints"]
    assert set(recorded) == {"unet", "text_encoder"}
    sample = ["sample", "--ckpt_path", ckpt, "--prompt", "a red square", "--num_samples", 1, "--steps", 1,
              "--out", tmp_path / "x.npz"]
    result = cli(*sample, "--autoencoder", sd)  # its own base, by its path
    assert result.returncode == 0, result.stderr
    for part, other in (("unet", "text_encoder"), ("text_encoder", "unet")):
        result = cli(*sample, "--autoencoder", perturbed(sd, tmp_path / f"base_{part[0]}", part))
        line = assert_one_error_line(result, f"its {part} (fingerprint", f"the checkpoint records {recorded[part]}",
                                     "--autoencoder PATH")
        assert other not in line and "vae" not in line, line


def test_a_lora_checkpoint_without_the_record_loads_on_any_base(lora, tmp_path):
    sd, ckpt = lora
    old = torch.load(ckpt, weights_only=True)
    del old["base_fingerprints"]  # as checkpoints written before it was recorded
    torch.save(old, tmp_path / "old.ckpt")
    result = cli("sample", "--ckpt_path", tmp_path / "old.ckpt", "--prompt", "a red square", "--num_samples", 1,
                 "--steps", 1, "--out", tmp_path / "x.npz", "--autoencoder", perturbed(sd, tmp_path / "base_u", "unet"))
    assert result.returncode == 0, result.stderr
