"""SIGTERM, Ctrl-C and a lost DDP rank end in one line, with the work done so far kept and nothing half-written."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusion_lit.commands import sample as commands
from diffusion_lit.training.checkpointing import Stopped
from diffusion_lit.commands.sample import kept_when_stopped
from diffusion_lit.core.files import write_atomic
from diffusion_lit.nets.unet import UNet

from test_cli import REPO, cli
from test_errors import fit_args, images  # noqa: F401 (fixture)
from test_run_folder import wait_for


class SlowLoadingUNet(UNet):
    """A UNet whose weights take a minute to load from a checkpoint, as a large model's do; it touches the file
    named by $SLOW_LOAD_MARKER when it begins."""

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        if marker := os.environ.get("SLOW_LOAD_MARKER"):
            Path(marker).touch()
            time.sleep(60)
        super()._load_from_state_dict(*args, **kwargs)


def start(tmp_path: Path, *args, log: str = "stderr.txt", **env_vars) -> subprocess.Popen:
    """`python -m diffusion_lit *args` in a process group of its own, as a scheduler's job runs; its stderr goes to
    tmp_path/log, to be read while it runs."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1", **env_vars}
    stderr = open(tmp_path / log, "w")
    return subprocess.Popen([sys.executable, "-m", "diffusion_lit", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True, start_new_session=True)


def ended(run: subprocess.Popen, tmp_path: Path, log: str = "stderr.txt") -> tuple[str, str]:
    """(all of stderr, its last line) once the run has ended; a run still going after 2 minutes is killed."""
    try:
        run.wait(120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    stderr = (tmp_path / log).read_text()
    return stderr, stderr.strip().splitlines()[-1]


def drawn(tmp_path: Path) -> int:
    """The images the sampling progress bar says are done."""
    counts = re.findall(r"(\d+)/100000", (tmp_path / "stderr.txt").read_text())
    return int(counts[-1]) if counts else 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, images):  # noqa: F811
    tmp = tmp_path_factory.mktemp("run")
    result = cli("fit", *fit_args(images, tmp), "--trainer.max_steps", 2)
    assert result.returncode == 0, result.stderr
    return tmp / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt"


def test_one_writer_per_run_sigterm_to_the_group_saves_the_step_with_workers_and_stops_a_resume_while_it_loads(
        images, tmp_path):  # noqa: F811
    ckpt_dir = tmp_path / "runs" / "tiny_cpu" / "checkpoints"
    args = ["fit", *fit_args(images, tmp_path), "--data.num_workers", 2, "--model.net", "test_signals.SlowLoadingUNet",
            "--checkpoint.every_n_train_steps", 3, "--trainer.val_check_interval", 1000, "--trainer.max_steps", 100000]
    # Two fits started together into one run folder: one trains, the other is refused
    runs = [start(tmp_path, *args, log="first.txt"), start(tmp_path, *args, log="second.txt")]
    try:
        wait_for(lambda: any(r.poll() is not None for r in runs))
        lost = 0 if runs[0].poll() is not None else 1
        (loser, loser_log), (run, log) = (runs[lost], ("first.txt", "second.txt")[lost]), (
            runs[1 - lost], ("first.txt", "second.txt")[1 - lost])
        stderr, line = ended(loser, tmp_path, loser_log)
        assert loser.returncode == 2 and "Traceback" not in stderr, stderr
        assert "is in use by another fit" in line and f"process {run.pid}" in line, line

        wait_for(lambda: (ckpt_dir / "step00000003.ckpt").is_file() or run.poll() is not None)
        assert run.poll() is None, (tmp_path / log).read_text()  # still training
        os.killpg(run.pid, signal.SIGTERM)  # as timeout, scancel and `kill -- -PGID` do: the workers get it too
        stderr, line = ended(run, tmp_path, log)
    finally:  # a failed check must not leave a fit of 100,000 steps running beside the rest of the suite
        for r in runs:
            if r.poll() is None:
                os.killpg(r.pid, signal.SIGKILL)
    assert run.returncode == 143 and "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr
    assert line.startswith("stopped by SIGTERM at step ") and line.endswith("--ckpt_path last to continue"), line
    step = int(line.split(" at step ")[1].split(":")[0])
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == step >= 3
    events = list(ckpt_dir.parent.glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one run's events: the refused fit wrote none

    # Resumed, and stopped again while it loads the weights, before training: nothing saved over, nothing half-written
    saved = (ckpt_dir / "last.ckpt").read_bytes()
    marker = tmp_path / "loading"
    run = start(tmp_path, *args, "--ckpt_path", "last", SLOW_LOAD_MARKER=marker)
    wait_for(lambda: marker.exists() or run.poll() is not None)
    os.killpg(run.pid, signal.SIGTERM)
    stderr, line = ended(run, tmp_path)
    assert run.returncode == 143 and "Traceback" not in stderr, stderr
    assert line == "stopped by SIGTERM before training started: nothing new to save"
    assert (ckpt_dir / "last.ckpt").read_bytes() == saved and not list(ckpt_dir.glob(".*"))
    assert yaml.safe_load((ckpt_dir.parent / "config.yaml").read_text())["model"]["net"]["class_path"]

    # Resumed again, it continues from the step it was stopped at
    resumed = cli(*args[:-1], step + 2, "--ckpt_path", "last", "--data.num_workers", 0)
    assert resumed.returncode == 0, resumed.stderr
    assert "saved with --data.num_workers 2 and this run has 0: its epoch starts again" in resumed.stderr
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == step + 2


def test_sample_stopped_by_sigterm_or_ctrl_c_writes_the_images_it_drew(checkpoint, tmp_path, monkeypatch):
    # SIGTERM to the group of a `sample` process, as a scheduler sends it
    out = tmp_path / "drawn.npz"
    run = start(tmp_path, "sample", "--ckpt_path", checkpoint, "--out", out, "--num_samples", 100000,
                "--batch_size", 4, "--steps", 20)
    wait_for(lambda: drawn(tmp_path) >= 8 or run.poll() is not None)
    os.killpg(run.pid, signal.SIGTERM)
    stderr, line = ended(run, tmp_path)
    assert run.returncode == 143 and "Traceback" not in stderr, stderr
    assert re.fullmatch(rf"stopped by SIGTERM after \d+ of 100000 images: wrote them to {re.escape(str(out))}", line)
    count = int(line.split(" after ")[1].split(" of ")[0])
    assert np.load(out)["arr_0"].shape[0] == count >= 8 and count % 4 == 0  # whole batches
    assert not list(tmp_path.glob("**/.*tmp"))

    # Ctrl-C after two batches (in this process: the handling is the same), into a folder of PNG files
    interrupt_after(2, signal.SIGINT, monkeypatch)
    out = tmp_path / "drawn"
    result = cli("sample", "--ckpt_path", checkpoint, "--out", out, "--num_samples", 64, "--batch_size", 4,
                 "--steps", 2)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"stopped by SIGINT after 8 of 64 images: wrote them to {out}"
    assert len(list(out.glob("*.png"))) == 8 and not list(tmp_path.glob("**/.*tmp"))


def interrupt_after(batches: int, signum: int, monkeypatch) -> None:
    """The sampling loop of sample and evaluate sends this process `signum` once `batches` batches are drawn."""
    generate = commands.generate

    def interrupted(*args, **kwargs):
        for i, batch in enumerate(generate(*args, **kwargs)):
            yield batch
            if i == batches - 1:
                assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.default_int_handler), (
                    "it would end pytest itself")
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(commands, "generate", interrupted)


def test_a_second_signal_while_writing_stops_at_once_and_leaves_no_partial_file(tmp_path):
    def cut_short(f) -> None:
        f.write(b"half an archive")
        raise Stopped(signal.SIGINT)  # what the handler raises on the second Ctrl-C

    out, first = tmp_path / "drawn.npz", Stopped(signal.SIGTERM)
    images_drawn = torch.zeros(5, 1, 8, 8, dtype=torch.uint8)
    stop = kept_when_stopped(first, images_drawn, 64, lambda: write_atomic(out, cut_short, "the images", ""), out)
    assert stop is not first and stop.exit_status == 130
    assert stop.line == "stopped at once by a second SIGINT while writing the 5 images drawn: not kept"
    assert list(tmp_path.iterdir()) == []


def test_evaluate_stopped_while_sampling_keeps_the_samples_and_scores_nothing(checkpoint, images, monkeypatch):  # noqa: F811
    interrupt_after(2, signal.SIGTERM, monkeypatch)
    handler = signal.getsignal(signal.SIGTERM)
    result = cli("evaluate", "--ckpt_path", checkpoint, "--real", images, "--feature_extractor",
                 "features.TinyFeatures", "--num_samples", 64, "--batch_size", 4, "--steps", 2)
    assert signal.getsignal(signal.SIGTERM) is handler  # the CLI's own handling ended with it
    assert result.returncode == 143 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    said = re.fullmatch(r"stopped by SIGTERM after 8 of 64 samples: wrote them to (\S+\.npz); no score was computed "
                        r"\(evaluate --samples FILE scores them\)", line)
    assert said, line
    assert np.load(said[1])["arr_0"].shape == (8, 16, 16, 1)
    os.unlink(said[1])


def test_a_lost_ddp_rank_ends_in_one_line_and_the_run_resumes_and_stops_on_sigterm(images, tmp_path):  # noqa: F811
    ckpt_dir = tmp_path / "runs" / "tiny_cpu" / "checkpoints"
    args = ["fit", *fit_args(images, tmp_path), "--trainer.accelerator", "cpu", "--trainer.devices", 2,
            "--trainer.strategy", "ddp", "--checkpoint.every_n_train_steps", 3, "--trainer.val_check_interval", 1000,
            "--trainer.max_steps", 100000]
    run = start(tmp_path, *args)
    wait_for(lambda: (ckpt_dir / "step00000003.ckpt").is_file() or run.poll() is not None)
    ranks = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()  # Lightning launched rank 1
    assert len(ranks) == 1, ranks
    os.kill(int(ranks[0]), signal.SIGKILL)
    stderr, line = ended(run, tmp_path)
    assert run.returncode == 1 and "Traceback" not in stderr, stderr
    said = re.fullmatch(rf"rank 1 \(process {ranks[0]}, killed by SIGKILL\) was lost at step (\d+)(: saved \S+|, which "
                        r"is saved); run the same command with --ckpt_path last to continue", line)
    assert said, line
    step = int(said[1])
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == step >= 3

    # Resumed, it trains on; SIGTERM to every rank at once (scancel) stops them after one step, saved together
    run = start(tmp_path, *args, "--ckpt_path", "last")
    wait_for(lambda: (ckpt_dir / f"step{(step // 3 + 1) * 3:08d}.ckpt").is_file() or run.poll() is not None)
    os.killpg(run.pid, signal.SIGTERM)
    stderr, line = ended(run, tmp_path)
    assert run.returncode == 143 and "Traceback" not in stderr, stderr
    assert line.startswith("stopped by SIGTERM at step ") and line.endswith("--ckpt_path last to continue"), line
    stopped = int(line.split(" at step ")[1].split(":")[0])
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == stopped > step
