"""One way to write a file: to a temporary name beside it, synced to disk, renamed into place. A failure (an
OSError, torch's RuntimeError from its zip writer, a short write) removes the temporary file, leaves the previous
file at that path whole, and becomes one UserError naming the path, the free space there and what to do."""

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from diffusion_lit.core.errors import UserError, reason


def free_bytes(folder: Path) -> int | None:
    """Bytes free for writing in folder (or the nearest existing folder above it), None when unknown."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def size_text(n: float) -> str:
    """1234567 -> '1.2 MB'."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def space_text(folder: Path, err: BaseException | None = None) -> str:
    """'the disk is full (12 kB free in /x)' or '(12 kB free in /x)', for a message about a failed write."""
    free = free_bytes(folder)
    where = f"{size_text(free)} free in {folder}" if free is not None else ""
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos", "file write failed")
    full = full or (isinstance(err, RuntimeError) and free is not None and free < 64 * 2**20)
    if full:
        return f"the disk is full ({where})" if where else "the disk is full"
    return f"({where})" if where else ""


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], what: str, fix: str) -> Path:
    """Calls write(file) on a temporary file beside `path`, syncs it and renames it to `path`; on any failure a
    UserError naming `what` at `path`, the free space and `fix` (what the user can do), with no temporary file left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        said = [text for text in (space_text(path.parent, err), fix) if text]
        raise UserError(f"could not write {what} {path} ({reason(err)}); " + "; ".join(said)) from None
    except BaseException:  # a signal (Stopped, KeyboardInterrupt) cut the write short: the caller says what it kept
        tmp.unlink(missing_ok=True)
        raise
    return path


def temporary_fallback(name: str, size: int) -> Path | None:
    """A path in the system's temporary folder with room for `size` bytes (and a margin), None when there is none."""
    folder = Path(tempfile.gettempdir())
    free = free_bytes(folder)
    if free is None or free < 2 * size + 2**20:
        return None
    return folder / f"diffusion_lit-{os.getpid()}-{name}"


def read_json(path: Path) -> dict:
    """A diffusers config file; a UserError naming it when it cannot be read as a JSON object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} cannot be read as a diffusers config ({reason(err)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a diffusers config (a JSON object)")
    return value
