"""notebooks/tour.ipynb runs top to bottom (here against a tiny checkpoint, so it takes seconds)."""

import os

import nbformat
from nbclient import NotebookClient

from conftest import write_image_folder
from test_cli import REPO, cli


def test_tour_runs(tmp_path, monkeypatch):
    images = write_image_folder(tmp_path / "images", n_per_class=8, size=8)  # small images: a quick tour
    run = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml",
              "--data.source", "ImageFolder", "--data.source.root", images,
              "--data.batch_size", 4,
              "--trainer.max_steps", 3, "--trainer.logger.init_args.save_dir", tmp_path / "runs",
              "--trainer.log_every_n_steps", 1, "--trainer.callbacks", "[]")
    assert run.returncode == 0, run.stderr
    monkeypatch.setenv("TOUR_CKPT", str(tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt"))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(REPO / "notebooks" / "tour.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO / "notebooks"}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 6  # schedules, noised digit, DDPM grid, DDIM grid, denoising strip, loss curve
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "step 3" in text and "3 train/loss points" in text
