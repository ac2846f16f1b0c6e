from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from PIL import Image

from diffusion_lit.nets.unet import UNet

# A UNet small enough to train for a few steps in a test: 2 levels, no attention unless asked.
tiny_unet = partial(
    UNet, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0, norm_groups=8
)


def write_image_folder(root: Path, n_per_class: int = 8, size: int = 8, classes=("a", "b")) -> Path:
    """Grayscale PNG images in one sub-folder per class: class i is a bright square in corner i, plus noise."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 40, (size, size))
            img[c * size // 2 : (c + 1) * size // 2, : size // 2] = 255
            Image.fromarray(img.astype(np.uint8), "L").save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


def bars() -> torch.Tensor:
    """Eight distinct images [8, 1, 8, 8] in [-1, 1]: a bright bar at row i; seeds everything first."""
    seed_everything(0)
    x = torch.zeros(8, 1, 8, 8) - 1
    for i in range(8):
        x[i, 0, i] = 1
    return x


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item() if isinstance(outputs, dict) else outputs.item())


def assert_halves_its_loss(model, loader, steps: int = 100, window: int = 10) -> None:
    """Trains for `steps` steps: the mean loss of the last `window` steps is below half that of the first."""
    recorder = LossRecorder()
    Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[recorder]).fit(model, loader)
    first, last = sum(recorder.losses[:window]) / window, sum(recorder.losses[-window:]) / window
    assert last < first / 2, (first, last)


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory) -> Path:
    """The folder where `ddp_runs.py` ran the suite's two-rank fits, all in one launch."""
    import os
    import subprocess
    import sys

    import ddp_runs

    tmp = tmp_path_factory.mktemp("ddp")
    ddp_runs.prepare(tmp)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'tests'}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(repo / "tests" / "ddp_runs.py"), str(tmp)], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    return tmp
