"""A folder of images as training data: the readable images below it found once (with their class sub-folders, sizes
and colour modes) before training, their captions, and the images as a dataset. Also reads folders for `evaluate`."""

import errno
import io
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm  # Lightning's own progress-bar library

from diffusion_lit.core.errors import UserError, reason, say

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


SCAN_BAR_DELAY = 0.5  # seconds of walking before the folder scan's running count shows (none for a quick scan)
PIECE = 1024  # bytes of a path opened at once when the whole is too long (Linux's PATH_MAX is 4,096, macOS's 1,024)
DIRECTORY = os.O_RDONLY | os.O_DIRECTORY


def open_fd(path: str | Path, flags: int) -> int:
    """os.open(path, flags), also for a path longer than PATH_MAX (one-letter folders nested 2,000 deep): such a path
    is opened a piece at a time, each piece relative to the folder the one before it opened."""
    try:
        return os.open(path, flags)
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
    rest, fd = os.fsencode(path), None
    try:
        while rest:
            cut = rest.rfind(b"/", 1, PIECE) if len(rest) >= PIECE else -1
            piece, rest = (rest[:cut], rest[cut + 1:].lstrip(b"/")) if cut > 0 else (rest, b"")
            opened = os.open(piece, DIRECTORY if rest else flags, dir_fd=fd)
            if fd is not None:
                os.close(fd)
            fd = opened
        return fd
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def open_file(path: Path, mode: str = "rb", **options) -> IO:
    """open(path, mode, ...) for reading, also for a path longer than PATH_MAX."""
    try:
        return open(path, mode, **options)
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
    fd = open_fd(path, os.O_RDONLY)
    try:
        return open(fd, mode, **options)
    except BaseException:
        os.close(fd)
        raise


def open_image(path: Path) -> Image.Image:
    """Image.open(path), also for a path longer than PATH_MAX: then from the file's bytes, read through its folders'
    descriptors (nothing left open for the image to close)."""
    try:
        return Image.open(path)
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
    with open_file(path) as file:
        return Image.open(io.BytesIO(file.read()))


def is_file(path: Path) -> bool:
    """Path.is_file(), also for a path longer than PATH_MAX."""
    try:
        try:
            return stat.S_ISREG(os.stat(path).st_mode)
        except OSError as err:
            if err.errno != errno.ENAMETOOLONG:
                raise
        fd = open_fd(path.parent, DIRECTORY)
        try:
            return stat.S_ISREG(os.stat(path.name, dir_fd=fd).st_mode)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # what Path.is_file() answers False to
            return False
        raise


def walk(root: Path, bar: tqdm | None = None, unreadable: list[tuple[str, OSError]] | None = None) -> Iterator[Path]:
    """Every file below root, at any depth: without recursion (a folder nested thousands deep cannot exhaust Python's
    stack), each folder opened by its path, or a piece at a time where the path is longer than PATH_MAX; symbolic
    links to folders are followed once each. `bar` counts the folders as they are read; the folders (and links)
    that cannot be read are added to `unreadable` with their error."""
    stack, seen = [os.fspath(root)], set()
    unreadable = [] if unreadable is None else unreadable
    while stack:
        folder = stack.pop()
        try:
            fd = open_fd(folder, DIRECTORY)
        except OSError as err:  # permission denied, vanished since it was listed
            unreadable.append((folder, err))
            continue
        try:
            # Identity by device and inode: Path.resolve() checks every component of the path, which made a folder
            # 2,000 deep cost 2 million lstat calls (45 s) where this is one stat a folder.
            status = os.fstat(fd)
            identity = (status.st_dev, status.st_ino) if status.st_ino else Path(folder).resolve()
            if identity in seen:
                continue
            seen.add(identity)
            with os.scandir(fd) as listing:
                entries = sorted(listing, key=lambda e: e.name)
            folders, files = [], []
            for entry in entries:  # while fd is open: a link's is_dir() and is_file() stat it relative to fd
                try:
                    if entry.is_dir():
                        folders.append(os.path.join(folder, entry.name))
                    elif entry.is_file():
                        files.append(Path(folder, entry.name))
                except OSError as err:  # a link that cannot be followed: a loop, or a target we may not read
                    unreadable.append((os.path.join(folder, entry.name), err))
        except OSError as err:
            unreadable.append((folder, err))
            continue
        finally:
            os.close(fd)
        if bar is not None:
            bar.update()
        stack.extend(folders)
        yield from files


def image_files(root: Path) -> list[Path]:
    """The image files below root (by extension), with a running count of the folders read and the images found
    from the first folder on, once the walk has taken SCAN_BAR_DELAY seconds; one line says how many folders could
    not be read."""
    found, unreadable = [], []
    with tqdm(desc=f"looking for images in {root}", unit=" folders", delay=SCAN_BAR_DELAY, leave=False) as bar:
        for path in walk(root, bar, unreadable):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(path)
                bar.set_postfix_str(f"{len(found)} images", refresh=False)
    if unreadable:
        where, err = unreadable[0]
        say(f"{root}: {len(unreadable)} folder(s) could not be read and are left out (the first, {where}: "
            f"{err.strerror or reason(err)})")
    return found


def to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit grayscale (Pillow's I;16 modes, and I holding 16-bit values) scaled to 8 bits; Pillow's own
    conversion would clip every value above 255 to white. Other images as they are."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64).clip(min=0)
        top = values.max(initial=0)
        if image.mode == "I" and top <= 255:  # 8-bit values in a 32-bit mode
            return Image.fromarray(values.astype(np.uint8), "L")
        top = 65535.0 if top <= 65535 else top
        return Image.fromarray(np.round(values * (255.0 / top)).astype(np.uint8), "L")
    return image


@dataclass
class FolderIndex:
    """The readable images below a folder, with their labels (the top-level sub-folder, when every image lies in
    one; else 0), sizes and colour modes, found once before training so that a bad file stops nothing mid-run."""

    root: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]
    sizes: list[tuple[int, int]]
    modes: list[str]

    @classmethod
    def scan(cls, root: str | Path, skip_unreadable: bool = False) -> "FolderIndex":
        """Decodes every image file once (a progress bar for large folders), so that a truncated one is found before
        the first step; unreadable files stop with one message listing them, or are left out with a warning when
        `skip_unreadable`."""
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist: give an existing folder with --data.source.root")
        candidates = sorted(image_files(root))
        files, sizes, modes, bad = [], [], [], []
        for path in tqdm(candidates, f"checking the images in {root}", disable=len(candidates) < 2000, leave=False):
            try:
                with open_image(path) as image:
                    image.load()  # the whole file, not only its header
                    size, mode = image.size, image.mode
                sizes.append(size)
                modes.append(mode)
                files.append(path)
            except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                bad.append(f"{path} ({reason(err)})")
        if bad:
            listing = f"{len(bad)} of {len(candidates)} image files in {root} cannot be read: {', '.join(bad[:3])}"
            listing += ", ..." if len(bad) > 3 else ""
            if not skip_unreadable:
                raise UserError(f"{listing}. Remove or replace them, or pass --data.source.skip_unreadable true to "
                                "leave them out")
            say(f"{listing}; left out (skip_unreadable)")
        if not files:
            raise UserError(
                f"no images found in {root}: point --data.source.root at a folder of image files "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}), optionally in one sub-folder per class"
            )
        parts = [p.relative_to(root).parts for p in files]
        classes = sorted({q[0] for q in parts}) if all(len(q) > 1 for q in parts) else []
        if classes and (empty := sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                                        and d.name not in classes)):
            # Dropping them would shift the labels of the classes after them.
            classes = sorted(classes + empty)
            say(f"{root}: {len(empty)} class folder(s) hold no images ({', '.join(empty[:3])}"
                f"{', ...' if len(empty) > 3 else ''}): kept as classes without images, so labels follow the folder names")
        index = {name: i for i, name in enumerate(classes)}
        return cls(root, files, [index[q[0]] if classes else 0 for q in parts], classes, sizes, modes)

    def native(self) -> tuple[int, int]:
        """(size, channels) of the first image: its shorter side, and 1 channel for grayscale, else 3."""
        return min(self.sizes[0]), 1 if self.modes[0] in GRAYSCALE_MODES else 3

    def conversions(self, size: int, channels: int) -> str | None:
        """One line saying how many images are resized or change colour mode on the way to size x size, or None."""
        resized = sum(s != (size, size) for s in self.sizes)
        target = "L" if channels == 1 else "RGB"
        converted = sum(m != target for m in self.modes)
        deep = sum(m == "I" or m.startswith("I;16") for m in self.modes)
        said = [f"{resized} resized and center-cropped to {size}x{size}"] if resized else []
        said += [f"{deep} scaled from 16 to 8 bits"] if deep else []
        said += [f"{converted} converted from other colour modes to {target}"] if converted else []
        return f"{self.root}: of {len(self.files)} images, {' and '.join(said)}" if said else None


def read_captions(root: Path, files: list[Path]) -> list[str | None]:
    """Each image's caption: from a `metadata.jsonl` (Hugging Face's imagefolder layout: one JSON object per line
    with `file_name`, relative to that file's folder, and `text`) anywhere below root, else from a `.txt` file of the
    same name beside the image; None where there is neither."""
    captions = {}
    for meta in sorted(p for p in walk(root) if p.name == "metadata.jsonl"):
        for number, line in enumerate(read_text(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row["text"], str):
                    raise TypeError
                captions[(meta.parent / row["file_name"]).resolve()] = row["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{meta}, line {number}: each line must be a JSON object with \"file_name\" and "
                                f"\"text\" (a string), got {line[:80]!r}") from None
    found = []
    for path in files:
        text = captions.get(path.resolve())
        if text is None and is_file(beside := path.with_suffix(".txt")):
            text = read_text(beside).strip()
        found.append(text)
    return found


def read_text(path: Path) -> str:
    """A caption file's text (UTF-8); a UserError when it cannot be read."""
    try:
        with open_file(path, "r", encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"caption file {path} cannot be read as UTF-8 text ({reason(err)}): fix or remove it") from None


class FolderImages(Dataset):
    """The images of a FolderIndex, converted to grayscale (1 channel) or RGB, with their labels."""

    def __init__(self, index: FolderIndex, channels: int, transform=None) -> None:
        self.index = index
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index.files)

    def __getitem__(self, i: int):
        with open_image(self.index.files[i]) as image:
            image = to_8_bits(image).convert(self.mode)
        return (self.transform(image) if self.transform else image), self.index.labels[i]

