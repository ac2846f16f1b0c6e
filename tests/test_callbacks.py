"""SampleGrid and FID during `fit`, in one process and under 2-process DDP on the CPU (gloo)."""

from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Timer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import write_image_folder
from diffusion_lit.training.callbacks import GuideCheckpoint, run_share
from diffusion_lit.core.errors import UserError
from test_cli import REPO, cli


def events(run_dir):
    """(scalar tag -> [(step, value)], image tag -> [step]) over the run's event files."""
    scalars, images = {}, {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
    return scalars, images


def callback_fit_args(tmp_path, fid_args: dict, *extra) -> list:
    """`fit` of tiny_cpu.yaml on a 32-image folder for 4 steps with a grid, FID (`fid_args`) and the guide
    checkpoint, into tmp_path/runs."""
    images = write_image_folder(tmp_path / "images", n_per_class=16, size=16)
    config = {
        "trainer": {
            "callbacks": [
                {"class_path": "diffusion_lit.training.callbacks.SampleGrid",
                 "init_args": {"every_n_steps": 2, "num_samples": 4, "sampling": {"steps": 3}}},
                {"class_path": "diffusion_lit.training.callbacks.FID",
                 "init_args": {"every_n_steps": 2, "sampling": {"steps": 3}, "cache_dir": str(tmp_path / "cache"),
                              **fid_args}},
                {"class_path": "diffusion_lit.training.callbacks.GuideCheckpoint", "init_args": {"share": 0.5}},
            ]
        }
    }
    (tmp_path / "callbacks.yaml").write_text(yaml.safe_dump(config))
    return ["fit", "--config", REPO / "configs/tiny_cpu.yaml", "--config", tmp_path / "callbacks.yaml",
            "--data.source", "ImageFolder", "--data.source.root", images, "--data.batch_size", 4,
            "--trainer.max_steps", 4, "--trainer.logger.init_args.save_dir", tmp_path / "runs",
            "--trainer.enable_progress_bar", "false", *extra]


def fit_with_callbacks(tmp_path, fid_args: dict, *extra, **env_vars):
    return cli(*callback_fit_args(tmp_path, fid_args, *extra), **env_vars)


DDP_FID_ARGS = ({"num_samples": 11, "num_real": 20, "feature_extractor": "digits"}, "--model.conditioning", "Labels")


def test_ddp_fit_logs_fid_once_per_evaluation_from_exactly_s_samples(ddp_runs):
    tmp_path = ddp_runs / "fid"  # `fit` with DDP_FID_ARGS under two ranks (conftest.ddp_runs)
    scalars, images = events(tmp_path / "runs" / "tiny_cpu")
    assert [step for step, _ in scalars["val/fid"]] == [2, 4]  # once per evaluation, not once per rank
    assert [value for _, value in scalars["val/num_samples"]] == [11, 11]  # 6 + 5 over the two ranks
    assert all(value > 0 for _, value in scalars["val/fid"])
    assert "val/kid" in scalars and "val/kid_std" in scalars
    for tag in ("val/confident_share", "val/requested_share"):  # the digit judge's shares, over both ranks' samples
        assert [step for step, _ in scalars[tag]] == [2, 4]
        assert all(value * 11 == round(value * 11) and 0 <= value <= 1 for _, value in scalars[tag])
    assert images["samples/grid"] == [2, 4] and images["samples/denoising"] == [2, 4]
    assert (tmp_path / "runs" / "tiny_cpu" / "samples.png").is_file()  # the newest grid, as a picture
    # Half of max_steps 4: the guide checkpoint at step 2, written once by both ranks' agreement (no hang)
    guide = torch.load(tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "guide.ckpt", weights_only=True)
    assert guide["global_step"] == 2
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    # The feature network stays out of the checkpoint: only the UNet and its EMA copy are saved.
    ckpt = torch.load(tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert {key.split(".")[0] for key in ckpt["state_dict"]} == {"net", "ema"}


def test_fid_without_inception_weights_turns_itself_off(tmp_path, monkeypatch):
    # No network here, and an empty torch hub cache: training must go on and say why FID is off, once, in one line.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # read by torch.hub at each call: in this process
    result = fit_with_callbacks(tmp_path, {"num_samples": 4, "feature_extractor": "inception"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "FID is off" in line]
    assert len(lines) == 1 and "weights_path" in lines[0]
    scalars, images = events(tmp_path / "runs" / "tiny_cpu")
    assert "val/fid" not in scalars and images["samples/grid"] == [2, 4]


def test_guide_checkpoint_is_written_once_at_its_share_of_the_run_and_not_again_on_resume(tmp_path):
    checkpoints = tmp_path / "runs" / "tiny_cpu" / "checkpoints"
    assert fit_with_callbacks(tmp_path, {"num_samples": 4, "feature_extractor": "digits"}).returncode == 0
    first = torch.load(checkpoints / "guide.ckpt", weights_only=True)
    assert first["global_step"] == 2  # half of max_steps 4
    # Resumed to 8 steps: half of the new length has passed already, and the guide was written: it stays as it was.
    result = fit_with_callbacks(tmp_path, {"num_samples": 4, "feature_extractor": "digits"},
                                "--trainer.max_steps", 8, "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 8
    again = torch.load(checkpoints / "guide.ckpt", weights_only=True)
    assert again["global_step"] == 2
    assert all(torch.equal(again["state_dict"][k], v) for k, v in first["state_dict"].items())
    # It is a checkpoint like the others: the sample command takes it as the guide of the finished model.
    out = tmp_path / "guided.png"
    result = cli("sample", "--ckpt_path", checkpoints / "last.ckpt", "--guide_ckpt", checkpoints / "guide.ckpt",
                 "--guidance_scale", 2, "--num_samples", 2, "--steps", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.is_file()


def test_run_share_is_the_larger_of_steps_and_time():
    timer = Timer(duration="00:00:10:00")
    timer.time_elapsed = lambda stage: 90.0
    timer.time_remaining = lambda stage: 510.0
    trainer = SimpleNamespace(global_step=30, callbacks=[timer])
    assert run_share(trainer, float("inf")) == 0.15  # max_time alone: 90 s of 600
    assert run_share(trainer, 100) == 0.3  # max_steps 100 ends first
    assert run_share(SimpleNamespace(global_step=30, callbacks=[]), float("inf")) is None  # no known length


def test_guide_checkpoint_refuses_a_share_outside_the_run():
    for share in (0, 1, 1.5):
        with pytest.raises(UserError, match="share must lie in"):
            GuideCheckpoint(share)
