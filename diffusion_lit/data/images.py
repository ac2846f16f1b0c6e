"""Images in and out: [-1, 1] tensors to uint8, grids, .npz files and folders of PNG files."""

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from diffusion_lit.data.folders import image_files, open_image, to_8_bits
from diffusion_lit.core.errors import UserError, reason
from diffusion_lit.core.files import free_bytes, size_text, write_atomic


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats to uint8 pixels, as the images would be saved."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """uint8 images [N, C, H, W] as one uint8 grid [C', H', W'], about square unless nrow is given."""
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    return make_grid(images, nrow=nrow, padding=2, pad_value=255)


GRID_SUFFIXES = {".png", ".jpg", ".jpeg"}


def check_output(out: str | Path) -> Path:
    """Makes sure `out` can be written before any work is done: a known kind (`.png` / `.jpg` grid, `.npz`, or a
    folder: a name without extension), not in the way of something else, its folder creatable and writable."""
    out = Path(out)
    if out.suffix and out.suffix.lower() not in GRID_SUFFIXES | {".npz"}:
        raise UserError(
            f"--out {out}: unknown extension {out.suffix!r}: use .png or .jpg for one grid, .npz for an array file, "
            "or a name without an extension for a folder of PNG files"
        )
    folder = out if not out.suffix else out.parent
    if out.suffix and out.is_dir():
        raise UserError(f"--out {out} is an existing folder: give a file name, or a name without an extension")
    if not out.suffix and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file, not a folder: give another name, or a .png / .npz file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"--out {out}: cannot write in {folder} ({reason(err)}): give a writable place") from None
    return out


def needed_bytes(count: int, shape: tuple[int, int, int]) -> int:
    """An upper bound of what `count` uint8 images of `shape` take on disk in any of the output kinds (PNG's and
    .npz's overhead included)."""
    channels, height, width = shape
    return int(count * (channels * height * width * 1.1 + 1024)) + 2**16


def check_space(out: str | Path, count: int, shape: tuple[int, int, int]) -> None:
    """A UserError before any work when `out`'s disk has no room for `count` images of `shape`."""
    folder = Path(out) if not Path(out).suffix else Path(out).parent
    need, free = needed_bytes(count, shape), free_bytes(folder)
    if free is not None and free < need:
        raise UserError(f"--out {out}: {count} images need up to {size_text(need)} and {folder} has "
                        f"{size_text(free)} free: make room or write elsewhere (nothing was written)")


def save_images(images: Tensor, out: str | Path, nrow: int | None = None) -> Path:
    """Saves uint8 images [N, C, H, W]: `.png` / `.jpg` one grid (nrow images a row; about square by default),
    `.npz` NHWC uint8 under `arr_0`, else a folder of PNGs; each file written atomically (`diffusion_lit.core.files`)."""
    out = check_output(out)
    fix = "make room or write elsewhere"
    if out.suffix.lower() in GRID_SUFFIXES:
        picture = _to_pil(grid(images, nrow))
        write_atomic(out, lambda f: picture.save(f, format="JPEG" if out.suffix.lower() != ".png" else "PNG"),
                     "the grid", fix)
    elif out.suffix.lower() == ".npz":
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        write_atomic(out, lambda f: np.savez(f, arr_0=array), "the images", fix)
    else:
        for i, image in enumerate(images):
            picture = _to_pil(image)
            write_atomic(out / f"{i:06d}.png", lambda f: picture.save(f, format="PNG"), "the image", fix)
    return out


def load_images(path: str | Path) -> Tensor:
    """uint8 images [N, C, H, W] from an `.npz` file (NHWC under `arr_0`) or a folder of images."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                array = npz["arr_0"]
        except Exception as err:  # truncated (BadZipFile), foreign (no arr_0), pickled, unreadable
            raise UserError(f"{path} cannot be read as images ({reason(err)}): give an .npz file written by "
                            "`sample` (uint8 NHWC under arr_0) or a folder of images") from None
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise UserError(f"{path}: arr_0 must be uint8 images shaped NHWC (or NHW), got {array.dtype} {array.shape}")
    else:
        files = sorted(image_files(path)) if path.is_dir() else []
        if not files:
            raise UserError(f"no images in {path}: give an .npz file (uint8 NHWC under arr_0) or a folder of images")
        arrays = []
        for f in files:
            try:
                with open_image(f) as image:
                    arrays.append(np.asarray(to_8_bits(image)))
            except (OSError, SyntaxError, ValueError) as err:
                raise UserError(f"{f} cannot be read as an image ({reason(err)}): remove or replace it") from None
        if len({a.shape for a in arrays}) > 1:
            raise UserError(f"the images in {path} differ in size or channels; bring them to one shape first")
        array = np.stack(arrays)
    if array.ndim == 3:  # grayscale without a channel axis
        array = array[..., None]
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _to_pil(image: Tensor) -> Image.Image:
    array = image.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
