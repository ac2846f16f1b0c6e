"""Hard edges: full disks, bad files and huge requests end in one clear line (exit status 2), with nothing lost."""

import errno
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lit.commands import sample as commands
from diffusion_lit.data import images as images_module
from diffusion_lit.model.autoencoder import AutoencoderModule
from diffusion_lit.commands.sample import parse_prompts
from diffusion_lit.core.errors import UserError
from diffusion_lit.data.folders import FolderImages, FolderIndex
from diffusion_lit.nets.text import ByteTextEncoder

from conftest import write_image_folder
from test_cli import cli
from test_errors import fit_args, images  # noqa: F401 (fixture)
from test_run_folder import start_fit, wait_for


def assert_one_error_line(result, *phrases) -> str:
    """Exit status 2, no traceback, and the last line of stderr an `error:` line holding every phrase."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and all(p in line for p in phrases), line
    return line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, images):  # noqa: F811
    tmp = tmp_path_factory.mktemp("run")
    result = cli("fit", *fit_args(images, tmp), "--trainer.max_steps", 2, "--trainer.callbacks", "[]")
    assert result.returncode == 0, result.stderr
    return tmp / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt"


def test_a_full_disk_while_sample_writes_keeps_the_images_in_the_temporary_folder(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "grid.png"
    out.write_bytes(b"the previous grid")

    def full(self, fp, *args, **kwargs):
        fp.write(b"half a picture")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    result = cli("sample", "--ckpt_path", checkpoint, "--num_samples", 3, "--steps", 2, "--out", out)
    line = assert_one_error_line(result, f"could not write the grid {out}", "images are kept in")
    kept = line.split("images are kept in ")[1].split(" (uint8")[0]
    assert np.load(kept)["arr_0"].shape == (3, 16, 16, 1)  # the work is not lost
    os.unlink(kept)
    assert out.read_bytes() == b"the previous grid" and not list(tmp_path.glob(".*tmp"))


def test_sample_refuses_at_once_when_the_images_cannot_fit_on_the_disk(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "free_bytes", lambda folder: 10_000)
    result = cli("sample", "--ckpt_path", checkpoint, "--num_samples", 100, "--out", tmp_path / "x.npz")
    assert_one_error_line(result, "100 images need up to", "nothing was written")


def test_a_batch_too_large_for_memory_is_split_into_ones_that_fit(checkpoint, tmp_path, monkeypatch):
    per_image = commands.activation_bytes(commands.load_checkpoint(str(checkpoint))[0])
    monkeypatch.setattr(commands, "available_memory", lambda device: 3 * per_image)  # room for batches of 3
    split = cli("sample", "--ckpt_path", checkpoint, "--num_samples", 7, "--batch_size", 1000, "--steps", 2,
                "--out", tmp_path / "split.npz")
    assert split.returncode == 0, split.stderr
    assert "sampling in batches of 3" in split.stderr
    monkeypatch.undo()
    small = cli("sample", "--ckpt_path", checkpoint, "--num_samples", 7, "--batch_size", 3, "--steps", 2,
                "--out", tmp_path / "small.npz")
    assert small.returncode == 0, small.stderr
    assert np.array_equal(np.load(tmp_path / "split.npz")["arr_0"], np.load(tmp_path / "small.npz")["arr_0"])


def test_a_reference_cache_that_cannot_be_written_is_said_and_the_score_printed(checkpoint, tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    result = cli("evaluate", "--ckpt_path", checkpoint, "--num_samples", 8, "--steps", 2, "--feature_extractor",
                 "features.TinyFeatures", "--cache_dir", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert '"fid"' in result.stdout and "could not write the reference features" in result.stderr
    assert not list((tmp_path / "cache").glob(".*tmp"))


def test_truncated_and_foreign_files_given_to_evaluate_are_one_line_each(checkpoint, tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((4, 16, 16, 1), np.uint8))
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[:100])
    np.savez(tmp_path / "foreign.npz", images=np.zeros(3))
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for samples in ("truncated.npz", "foreign.npz", "pictures"):
        result = cli("evaluate", "--samples", tmp_path / samples, "--real", good)
        assert_one_error_line(result, str(tmp_path / samples))


def test_a_checkpoint_whose_tensors_do_not_fit_is_one_line_in_every_command(checkpoint, tmp_path, images):  # noqa: F811
    broken = torch.load(checkpoint, weights_only=True)
    key = next(k for k in broken["state_dict"] if k.endswith("conv_in.weight"))
    broken["state_dict"][key] = torch.zeros(3, 3)
    path = tmp_path / "broken.ckpt"
    torch.save(broken, path)
    assert_one_error_line(cli("sample", "--ckpt_path", path, "--out", tmp_path / "x.png"), "do not fit", key)
    resumed = cli("fit", *fit_args(images, tmp_path), "--trainer.max_steps", 4, "--ckpt_path", path)
    assert_one_error_line(resumed, "do not fit", key)


def test_bad_prompt_files_and_autoencoder_settings_are_refused(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    for name, why in (("latin1.txt", "UTF-8"), ("empty.txt", "holds no prompts")):
        with pytest.raises(UserError, match=why):
            parse_prompts(None, str(tmp_path / name), 2, text=True)
    for settings, why in (({"latent_channels": 0}, "latent_channels"), ({"kl_weight": -1.0}, "kl_weight"),
                          ({"norm_num_groups": 5}, "divisible"), ({"image_size": 30}, "cannot be halved")):
        with pytest.raises(UserError, match=why):
            AutoencoderModule(**settings)


def test_a_prompt_longer_than_the_encoder_reads_is_said_once(capsys):
    encoder = ByteTextEncoder(width=8, depth=1, heads=2, max_length=4)
    encoder.tokenize(["seven", "one", "nine!"])
    encoder.tokenize(["twelve"])
    said = capsys.readouterr().err
    assert said.count("longer than the text encoder reads") == 1 and "2 of 3 prompts" in said


def test_images_are_decoded_before_training_and_16_bits_scaled_not_clipped(tmp_path):
    root = write_image_folder(tmp_path / "images", n_per_class=3, size=8)
    whole = (root / "a" / "000.png").read_bytes()
    (root / "a" / "000.png").write_bytes(whole[: len(whole) // 2])  # a valid header, a truncated body
    with pytest.raises(UserError, match="000.png"):
        FolderIndex.scan(root)
    index = FolderIndex.scan(root, skip_unreadable=True)
    assert len(index.files) == 5

    deep = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    Image.fromarray(deep).save(root / "b" / "deep.png")  # 16-bit grayscale
    loaded = np.asarray(FolderImages(FolderIndex.scan(root, skip_unreadable=True), channels=1)[5][0])
    assert loaded.min() == 0 and loaded.max() == 255 and len(np.unique(loaded)) > 32  # a ramp, not all white
    np.testing.assert_allclose(loaded, deep / 257, atol=0.5)


def test_a_folder_nested_deeper_than_pythons_recursion_limit_is_scanned(tmp_path):
    folder = tmp_path / "root"
    folder.mkdir()
    for _ in range(1100):  # one level at a time (mkdir's parents=True recurses itself)
        folder = folder / "d"
        folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "x.png")
    try:
        assert len(FolderIndex.scan(tmp_path / "root").files) == 1
    finally:  # removed from the bottom up: shutil.rmtree (pytest's clean-up) recurses and would fail at this depth
        (folder / "x.png").unlink()
        while folder != tmp_path:
            folder.rmdir()
            folder = folder.parent


def test_an_empty_class_folder_is_kept_as_a_class_and_said(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", n_per_class=2, size=8, classes=("a", "c"))
    (root / "b").mkdir()
    index = FolderIndex.scan(root)
    assert index.classes == ["a", "b", "c"] and sorted(set(index.labels)) == [0, 2]  # c keeps its label
    assert "1 class folder(s) hold no images (b)" in capsys.readouterr().err


def test_fresh_run_with_a_checkpoint_is_refused(images, tmp_path):  # noqa: F811
    result = cli("fit", *fit_args(images, tmp_path), "--fresh_run", "true", "--ckpt_path", "last")
    assert_one_error_line(result, "--fresh_run", "--ckpt_path")


def test_ctrl_c_saves_the_step_it_reached_and_says_how_to_resume(images, tmp_path):  # noqa: F811
    ckpt_dir = tmp_path / "runs" / "tiny_cpu" / "checkpoints"
    run = start_fit([*fit_args(images, tmp_path), "--checkpoint.every_n_train_steps", 3, "--trainer.val_check_interval",
                     1000, "--trainer.max_steps", 100000, "--trainer.callbacks", "[]"])
    wait_for(lambda: (ckpt_dir / "step00000003.ckpt").is_file() or run.poll() is not None)
    assert run.poll() is None, run.stderr.read()
    run.send_signal(signal.SIGINT)
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode == 130 and "Traceback" not in stderr, stderr
    assert "stopped by SIGINT at step" in stderr and "--ckpt_path last" in stderr
    step = int(stderr.split("stopped by SIGINT at step ")[1].split(":")[0])
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == step >= 3
