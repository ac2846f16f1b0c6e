from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lit.unet import UNet

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
