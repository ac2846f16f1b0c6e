"""SampleGrid and FID during `fit`, in one process and under 2-process DDP on the CPU (gloo)."""

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import write_image_folder
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


def fit_with_callbacks(tmp_path, fid_args: dict, *extra, **env_vars):
    images = write_image_folder(tmp_path / "images", n_per_class=16, size=16)
    config = {
        "trainer": {
            "callbacks": [
                {"class_path": "diffusion_lit.callbacks.SampleGrid",
                 "init_args": {"every_n_steps": 2, "num_samples": 4, "steps": 3}},
                {"class_path": "diffusion_lit.callbacks.FID",
                 "init_args": {"every_n_steps": 2, "steps": 3, "cache_dir": str(tmp_path / "cache"), **fid_args}},
            ]
        }
    }
    (tmp_path / "callbacks.yaml").write_text(yaml.safe_dump(config))
    return cli(
        "fit", "--config", REPO / "configs/tiny_cpu.yaml", "--config", tmp_path / "callbacks.yaml",
        "--data.dataset", "folder", "--data.root", images, "--data.batch_size", 4, "--trainer.max_steps", 4,
        "--trainer.logger.init_args.save_dir", tmp_path / "runs", "--trainer.enable_progress_bar", "false", *extra,
        **env_vars,
    )


def test_ddp_fit_logs_fid_once_per_evaluation_from_exactly_s_samples(tmp_path):
    result = fit_with_callbacks(
        tmp_path, {"num_samples": 11, "num_real": 20, "feature_extractor": "digits"}, "--model.conditional", "true",
        "--trainer.accelerator", "cpu", "--trainer.devices", 2, "--trainer.strategy", "ddp",
    )
    assert result.returncode == 0, result.stderr
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
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    # The feature network stays out of the checkpoint: only the UNet and its EMA copy are saved.
    ckpt = torch.load(tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert {key.split(".")[0] for key in ckpt["state_dict"]} == {"net", "ema"}


def test_fid_without_inception_weights_turns_itself_off(tmp_path):
    # No network here, and an empty torch hub cache: training must go on and say why FID is off, once, in one line.
    result = fit_with_callbacks(tmp_path, {"num_samples": 4, "feature_extractor": "inception"},
                                TORCH_HOME=str(tmp_path / "torch_home"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "FID is off" in line]
    assert len(lines) == 1 and "weights_path" in lines[0]
    scalars, images = events(tmp_path / "runs" / "tiny_cpu")
    assert "val/fid" not in scalars and images["samples/grid"] == [2, 4]
