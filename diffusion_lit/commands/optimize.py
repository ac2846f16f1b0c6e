"""`python -m diffusion_lit data optimize`: any source's images (PNG-compressed, at their native size) with their
labels and captions written as litdata chunks, which `data.source: Streaming(DIR)` trains from (`streaming`).

The chunks go to `OUT.partial`, which takes OUT's name only once every image is in and the index is written: a
signal, a full disk or an unreadable image leaves nothing there, and one line says so."""

import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
from pathlib import Path
from unittest import mock

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from diffusion_lit.training.checkpointing import Stopped
from diffusion_lit.core.errors import UserError, reason, say
from diffusion_lit.core.files import space_text, write_atomic
from diffusion_lit.data.images import check_space
from diffusion_lit.data.loaders import Unreadable
from diffusion_lit.data.sources import Source
from diffusion_lit.data.streaming import FORMAT, Streaming, checksum, size_in_bytes
from diffusion_lit.core.optional import need


class Item:
    """One image of a source as a chunk item: its index, PNG bytes, label and caption (litdata pickles this to its
    workers). An image that cannot be read is noted in `unreadable` (its index and why, for the main process to
    say) and left out (None) when skipping, else it stops the writing."""

    def __init__(self, images: Dataset, source: Source, captions: bool, unreadable: Path, skip: bool) -> None:
        self.images, self.source, self.captions = images, source, captions
        self.unreadable, self.skip = unreadable, skip

    def __call__(self, index: int) -> dict | None:
        try:
            image, label = self.images[index]
        except Exception as err:  # a damaged file or row, whatever the library that decodes it raises
            why = err.why if isinstance(err, Unreadable) else reason(err)  # a source's own, or the decoder's
            with open(self.unreadable, "a") as f:  # one short append per image: whole lines from every worker
                f.write(f"{index}\t{why[:300]}\n")
            if self.skip:
                return None
            raise
        png = io.BytesIO()
        image.save(png, "PNG")
        caption = self.source.caption(index, label) if self.captions else ""
        return {"index": index, "image": png.getvalue(), "label": int(label), "caption": caption}


def optimize(source: Source, out: str, captions: bool = False, num_workers: int = 1,
             chunk_bytes: str | int = "64MB", skip_unreadable: bool = False) -> None:
    """Write a source's images as litdata chunks that `data.source: Streaming(out)` trains from.

    Args:
        source: any data source, as `fit` names it (``--source ImageFolder --source.root DIR``).
        out: the folder to write (new, or empty); a half-written one never takes its place.
        captions: store each image's caption too, for text models.
        num_workers: processes that encode the images (0: in this one).
        chunk_bytes: the size of a chunk file: bytes, or a size such as 64MB.
        skip_unreadable: leave out images that cannot be read while writing (counted and the first named) instead
            of stopping; a folder's images are checked when the source is made (``--source.skip_unreadable``).
    """
    ld = need("litdata", "data")
    folder = Path(out).resolve()  # `.` and `..` name their folder (the partial one is written beside it)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--out {folder} already exists and is not an empty folder: give a new one")
    if num_workers < 0:
        raise UserError(f"--num_workers must be 0 (encode in this process) or more, got {num_workers}")
    chunk_bytes = size_in_bytes(chunk_bytes, "--chunk_bytes")
    if captions and isinstance(source, Streaming):
        raise UserError("--captions true: a stream's captions are not read back to be written again: optimize the "
                        "source it was written from")
    if captions:
        source.read_captions()
    source.prepare()
    images = source.images(None, source.channels)
    if len(images) == 0:
        raise UserError("the source holds no images: nothing to write")
    partial = folder.with_name(folder.name + ".partial")
    unreadable = folder.with_name(f".{folder.name}.unreadable")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted optimize into the same --out left
    make_room(folder, partial, len(images), source)
    unreadable.unlink(missing_ok=True)
    try:
        write_chunks(ld, Item(images, source, captions, unreadable, skip_unreadable), len(images), partial,
                     chunk_bytes, num_workers)
        skipped = read_unreadable(unreadable)
        index = json.loads((partial / "index.json").read_text())
        written = sum(chunk["chunk_size"] for chunk in index["chunks"])
        if written != len(images) - len(skipped):  # litdata's workers can fail without an error reaching here
            raise UserError(f"data optimize wrote {written} of {len(images)} images and kept none; run it again with "
                            "--num_workers 1 to see what fails")
        if written == 0:
            raise UserError(f"none of the {len(images)} images could be read ({described(skipped)}): nothing to write")
        index["diffusion_lit"] = {"format": FORMAT, "count": written, "image_size": source.image_size,
                                  "channels": source.channels, "num_classes": source.num_classes,
                                  "captions": captions, "source": source.config(),
                                  "checksums": {chunk["filename"]: checksum(partial / chunk["filename"])
                                                for chunk in index["chunks"]}}
        write_atomic(partial / "index.json", lambda f: f.write(json.dumps(index).encode()), "the chunk index",
                     "make room or write elsewhere; nothing was kept")
        if folder.exists():
            folder.rmdir()
        partial.rename(folder)
    except Stopped as stop:
        if not partial.exists() and (folder / "index.json").is_file():  # it came after the folder took its name
            raise Stopped(stop.signum, f"stopped by {stop.name} once data optimize had written {folder}: it is "
                                       "complete") from None
        raise Stopped(stop.signum, f"stopped by {stop.name}: data optimize kept nothing (the partial chunks were "
                                   f"removed): run it again") from None
    except (OSError, RuntimeError) as err:  # a full disk, litdata's report of a worker's failure
        if skipped := read_unreadable(unreadable):
            raise UserError(f"{described(skipped)}: fix or remove it, or pass --skip_unreadable true to leave "
                            "unreadable images out (nothing was written)") from None
        space = space_text(partial.parent, err)
        raise UserError(f"could not write {folder} ({reason(err)}){' ' + space if space else ''}; nothing was "
                        "kept") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        unreadable.unlink(missing_ok=True)
    if skipped:
        say(f"left out {len(skipped)} unreadable image(s) (skip_unreadable): {described(skipped)}")
    print(f"wrote {written} images to {folder} ({sum(1 for _ in folder.glob('*.bin'))} chunks); train with "
          f"--data.source Streaming --data.source.root {folder}")


def make_room(folder: Path, partial: Path, count: int, source: Source) -> None:
    """Makes the partial folder, or a UserError when `--out`'s place cannot be written or has too little room (PNG
    bytes at most about the raw pixels' count)."""
    try:
        partial.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"--out {folder}: cannot write in {folder.parent} ({reason(err)}): give a writable "
                        "place") from None
    try:
        check_space(folder, count, (source.channels, source.image_size, source.image_size))
    except UserError:
        partial.rmdir()
        raise


def write_chunks(ld, item: Item, count: int, partial: Path, chunk_bytes: int, num_workers: int) -> None:
    """litdata's optimize into `partial`, with SIGTERM and Ctrl-C left to this process: litdata's own Ctrl-C handler
    ends the process with status 0 at once, and the workers it forks would each end in a traceback of their own."""
    main = os.getpid()

    def stop(signum, frame) -> None:
        if os.getpid() != main:  # a forked worker: the main process ends it and says what was kept
            os._exit(1)
        raise Stopped(signum)

    from litdata.processing.data_processor import DataProcessor

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    start_method = multiprocessing.get_start_method(allow_none=True)
    try:
        for signum in handlers:
            signal.signal(signum, stop)
        # litdata's lines (an account to create, its settings) say nothing a user needs; its bar stays.
        with contextlib.redirect_stdout(io.StringIO()), \
                mock.patch.object(DataProcessor, "_signal_handler", lambda self, signum, frame: stop(signum, frame)):
            # Forked workers start at once; litdata's default (spawn) imports everything again in each.
            ld.optimize(fn=item, inputs=list(range(count)), output_dir=str(partial.resolve()),
                        chunk_bytes=chunk_bytes, num_workers=num_workers, mode="overwrite", start_method="fork")
    except BaseException:
        for bar in list(getattr(tqdm, "_instances", ())):  # litdata's bar, closed now rather than after our line
            bar.close()
        for left in Path(tempfile.gettempdir()).glob(f"litdata-node-*-items-{main}-*.pkl"):  # its list of the items
            left.unlink(missing_ok=True)
        raise
    finally:
        for child in multiprocessing.active_children():  # a worker left running by a stop or a failure
            child.terminate()
            child.join()
        multiprocessing.set_start_method(start_method, force=True)  # litdata sets it for the whole process
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def read_unreadable(path: Path) -> list[tuple[int, str]]:
    """The images the workers could not read, by index: (index, why)."""
    if not path.is_file():
        return []
    rows = (line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line)
    return sorted((int(index), why) for index, why in rows)


def described(skipped: list[tuple[int, str]]) -> str:
    index, why = skipped[0]
    more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
    return f"image {index} of the source cannot be read ({why}){more}"
