"""One writer per run folder (its test: test_signals.py, with SIGTERM), a failed save loses nothing."""

import errno
import os
import subprocess
import sys
import time

import pytest
import torch

from diffusion_lit.training import checkpointing
from diffusion_lit.training.checkpointing import AtomicCheckpointIO, newest_checkpoint
from diffusion_lit.cli import main

from test_cli import REPO, cli
from test_errors import assert_clean_failure, fit_args, images  # noqa: F401 (fixture)


def start_fit(args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "diffusion_lit", "fit", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# A full disk as the OS reports it, and as torch's zip writer does (a RuntimeError, after a short write)
FULL = {"oserror": OSError(errno.ENOSPC, "No space left on device"),
        "zip_writer": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1152 vs 1040")}


@pytest.mark.parametrize("error", FULL, ids=list(FULL))
def test_a_full_disk_stops_with_a_message_and_resume_takes_the_newest_checkpoint(images, tmp_path, monkeypatch,
                                                                                 capsys, error):
    args = [*map(str, fit_args(images, tmp_path)), "--checkpoint.every_n_train_steps", "2", "--trainer.max_steps", "6"]
    ckpt_dir = tmp_path / "runs" / "tiny_cpu" / "checkpoints"
    real_save = torch.save

    def save(obj, f, *a, **k):  # the disk fills up when last.ckpt of step 4 is written
        if obj.get("global_step") == 4 and ".last.ckpt." in str(getattr(f, "name", "")):
            f.write(b"the first bytes")
            raise FULL[error]
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpointing.torch, "save", save)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "could not write the checkpoint" in message and "--ckpt_path last" in message and "Traceback" not in message
    assert ("the disk is full" if error == "oserror" else "free in") in message  # this disk has room: a free count
    assert not list(ckpt_dir.glob(".*tmp"))  # the half-written file is gone
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 2
    assert newest_checkpoint(ckpt_dir) == ckpt_dir / "step00000004.ckpt"  # complete, and newer than last.ckpt

    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    main(["fit", *args, "--ckpt_path", "last"])
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 6


def test_stale_temporaries_go_and_truncated_checkpoints_are_passed_over(tmp_path):
    (tmp_path / "step00000009.ckpt").write_bytes(b"truncated")
    (tmp_path / ".last.ckpt.12345.tmp").write_bytes(b"half")
    torch.save({"global_step": 5}, tmp_path / "last.ckpt")
    torch.save({"global_step": 5}, tmp_path / "step00000005.ckpt")
    assert newest_checkpoint(tmp_path) == tmp_path / "last.ckpt"  # a tie goes to last.ckpt
    checkpointing.remove_stale_temporaries(tmp_path)
    assert not (tmp_path / ".last.ckpt.12345.tmp").exists()


def test_temporary_names_are_per_process(tmp_path, monkeypatch):
    names = []
    monkeypatch.setattr(checkpointing.os, "replace", lambda src, dst: names.append(str(src)))
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    assert names == [str(tmp_path / f".last.ckpt.{os.getpid()}.tmp")]


def test_unwritable_run_folder_is_one_line(images, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = cli("fit", *fit_args(images, tmp_path), "--trainer.logger.init_args.save_dir", blocker / "runs")
    assert result.returncode == 2
    assert_clean_failure(result, "cannot create the run folder", "--trainer.logger.init_args.save_dir")
