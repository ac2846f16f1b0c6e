"""`data optimize` and streamed data at their edges: a signal at each phase, a place that cannot be written, an image
that cannot be read, and damaged bytes in chunks or a parquet file found before training (or named, with a
checkpoint saved, when met mid-run)."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from built_data import hf_layout
from conftest import write_image_folder
from diffusion_lit.training.checkpointing import Stopped
from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.core.errors import UserError
from diffusion_lit.commands.optimize import optimize
from diffusion_lit.data.sources import ImageFolder
from diffusion_lit.data.streaming import Streaming
from test_cli import REPO, cli
from test_signals import ended, start
from test_run_folder import wait_for


class SignalledFolder(ImageFolder):
    """A folder of images that are slow to read (as a large set's are), which sends $OPTIMIZE_SIGNAL (TERM or INT)
    to its own process group when the phase $OPTIMIZE_PHASE begins: `scan` (before the images are listed) or
    `write` (at the 10th image, in a litdata worker)."""

    def prepare(self) -> None:
        self.signal_at("scan")
        super().prepare()

    def images(self, transform, channels: int):
        return SlowImages(super().images(transform, channels), self)

    def signal_at(self, phase: str) -> None:
        if os.environ.get("OPTIMIZE_PHASE") == phase:
            os.killpg(os.getpgrp(), getattr(signal, "SIG" + os.environ["OPTIMIZE_SIGNAL"]))
            time.sleep(5)  # the signal arrives meanwhile


class SlowImages(torch.utils.data.Dataset):
    def __init__(self, images, folder: SignalledFolder) -> None:
        self.images, self.folder = images, folder

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if i == 10:
            self.folder.signal_at("write")
        time.sleep(0.05)
        return self.images[i]


@pytest.mark.parametrize("phase,name,status", [("scan", "TERM", 143), ("start", "INT", 130), ("write", "TERM", 143)])
def test_a_signal_at_each_phase_of_data_optimize_is_one_line_and_keeps_nothing(tmp_path, phase, name, status):
    images = write_image_folder(tmp_path / "images", n_per_class=40)
    out = tmp_path / "chunks"
    run = start(tmp_path, "data", "optimize", "--source", "test_optimize_edges.SignalledFolder", "--source.root",
                images, "--out", out, OPTIMIZE_PHASE=phase, OPTIMIZE_SIGNAL=name)
    if phase == "start":  # as litdata starts its workers: its progress bar is the first thing it shows
        wait_for(lambda: "Progress" in (tmp_path / "stderr.txt").read_text() or run.poll() is not None)
        os.killpg(run.pid, getattr(signal, "SIG" + name))
    stderr, line = ended(run, tmp_path)
    assert run.returncode == status and "Traceback" not in stderr, stderr
    assert line.startswith(f"stopped by SIG{name}: "), line
    if phase != "scan":
        assert "data optimize kept nothing (the partial chunks were removed)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "stderr.txt"]  # no chunks, no partial folder


def test_a_signal_while_the_index_is_written_keeps_nothing(tmp_path, monkeypatch):
    def cut_short(*args, **kwargs):
        raise Stopped(signal.SIGTERM)

    monkeypatch.setattr("diffusion_lit.commands.optimize.write_atomic", cut_short)
    with pytest.raises(Stopped) as stopped:
        optimize(ImageFolder(str(write_image_folder(tmp_path / "images"))), str(tmp_path / "chunks"), num_workers=0)
    assert "data optimize kept nothing" in stopped.value.line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_a_place_that_cannot_be_written_or_has_no_room_is_one_line_before_any_work(tmp_path, monkeypatch):
    images = str(write_image_folder(tmp_path / "images"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: a read-only place is a file system's, not a mode's
            monkeypatch.setattr(Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
        result = cli("data", "optimize", "--source", "ImageFolder", "--source.root", images, "--out", locked / "c")
    finally:
        monkeypatch.undo()
        locked.chmod(0o700)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: --out {locked / 'c'}: cannot write in ") and "writable place" in result.stderr
    assert not list(locked.iterdir())

    monkeypatch.setattr("diffusion_lit.data.images.free_bytes", lambda folder: 1000)
    result = cli("data", "optimize", "--source", "ImageFolder", "--source.root", images, "--out", tmp_path / "c")
    assert result.returncode == 2 and "16 images need up to" in result.stderr and "1.0 kB free" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "locked"]


def test_a_full_disk_mid_write_is_one_line_and_keeps_nothing(tmp_path, monkeypatch):
    import litdata

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(litdata, "optimize", full)
    monkeypatch.setattr("diffusion_lit.commands.optimize.space_text", lambda folder, err: "the disk is full (0 bytes free)")
    result = cli("data", "optimize", "--source", "ImageFolder", "--source.root", write_image_folder(tmp_path / "i"),
                 "--out", tmp_path / "chunks")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "No space left on device" in result.stderr and "the disk is full" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i"]


def broken_row(tmp_path: Path, layout: str) -> Path:
    """An HF dataset of 16 images whose row 5 is a PNG cut short."""
    images = write_image_folder(tmp_path / "images")
    files = sorted(images.rglob("*.png"))
    files[5].write_bytes(files[5].read_bytes()[:40])
    return hf_layout(tmp_path, layout, written=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_named_or_skipped(tmp_path, workers):
    data = broken_row(tmp_path, "save_to_disk")
    args = ["data", "optimize", "--source", "HFDataset", "--source.path", data, "--num_workers", workers]
    result = cli(*args, "--out", tmp_path / "chunks")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: image 5 of the source cannot be read (") and "--skip_unreadable true" in line
    assert not (tmp_path / "chunks").exists() and not list(tmp_path.glob("*.partial")) and \
        not list(tmp_path.glob(".*unreadable"))

    result = cli(*args, "--out", tmp_path / "chunks", "--skip_unreadable", "true")
    assert result.returncode == 0, result.stderr
    assert "left out 1 unreadable image(s) (skip_unreadable): image 5 of the source" in result.stderr
    assert len(Streaming(str(tmp_path / "chunks")).stream()) == 15


def test_damaged_chunk_bytes_are_found_before_training(tmp_path):
    optimize(ImageFolder(str(write_image_folder(tmp_path / "images"))), str(tmp_path / "chunks"), num_workers=0)
    chunk = next((tmp_path / "chunks").glob("*.bin"))
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # the size stays: only the checksum tells
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(UserError, match=f"chunk {chunk} is damaged"):
        Streaming(str(tmp_path / "chunks"))


def test_a_damaged_image_met_mid_run_is_one_line_naming_it_after_saving_the_steps_before(tmp_path, monkeypatch):
    """Chunks not checked before training (written before checksums were recorded, or too large), one image's bytes
    damaged: the run ends in one line naming the image, with last.ckpt saved at the step before it."""
    optimize(ImageFolder(str(write_image_folder(tmp_path / "images", n_per_class=20))), str(tmp_path / "chunks"),
             num_workers=0)
    index = json.loads((tmp_path / "chunks" / "index.json").read_text())
    del index["diffusion_lit"]["checksums"]
    (tmp_path / "chunks" / "index.json").write_text(json.dumps(index))
    chunk = tmp_path / "chunks" / index["chunks"][0]["filename"]
    data = bytearray(chunk.read_bytes())
    at = data.find(b"IDAT")  # the pixel data of the first PNG in the chunk
    data[at + 4:at + 40] = bytes(36)
    chunk.write_bytes(bytes(data))
    ran = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "Streaming", "--data.source.root",
              tmp_path / "chunks", "--data.batch_size", 4, "--data.num_workers", 2, "--trainer.max_steps", 40,
              "--trainer.callbacks", "[]", "--trainer.logger.init_args.save_dir", tmp_path / "runs",
              "--trainer.enable_progress_bar", "false")
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    line = ran.stderr.strip().splitlines()[-1]
    assert line.startswith("error: image ") and "cannot be decoded" in line and "the chunk is damaged" in line, line
    assert "last.ckpt holds step " in line and "--ckpt_path last" in line
    saved = torch.load(tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert f"holds step {saved['global_step']}:" in line


def test_a_broken_row_of_a_parquet_file_is_found_before_training(tmp_path):
    from diffusion_lit.data.hf_data import HFDataset

    source = HFDataset(str(broken_row(tmp_path, "parquet")))
    with pytest.raises(UserError, match=r"^1 of the 16 rows checked cannot be read: row 5 of \S+ \(\w+Error: "):
        DiffusionDataModule(source, batch_size=4, num_workers=0).setup("fit")


def test_out_may_be_the_current_folder_and_a_folders_options_are_named_as_optimize_spells_them(tmp_path):
    images = write_image_folder(tmp_path / "images")
    here = tmp_path / "here"
    here.mkdir()
    result = cli("data", "optimize", "--source", "ImageFolder", "--source.root", images, "--out", ".", cwd=here)
    assert result.returncode == 0 and (here / "index.json").is_file(), result.stderr
    (images / "a" / "000.png").write_bytes(b"not a png")
    result = cli("data", "optimize", "--source", "ImageFolder", "--source.root", images, "--out", tmp_path / "c")
    assert result.returncode == 2 and "--source.skip_unreadable true" in result.stderr, result.stderr
    assert "--data.source" not in result.stderr
