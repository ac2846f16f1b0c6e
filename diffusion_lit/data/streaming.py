"""Training images streamed in chunks with litdata (`pip install -e ".[data]"`), for data that outgrows a disk.

`python -m diffusion_lit data optimize --source ... --out DIR` writes any source's images as litdata chunks
(`optimize`); `data.source: Streaming(DIR)` trains from them: a local folder is read in place (its chunks checked
against their checksums first), a remote one (s3://, gs://, azure://, r2://, hf://; `local:DIR` reads a local folder
as if it were remote) is fetched into a cache that `max_cache_size` bounds.
"""

import functools
import io
import json
import os
import tempfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from diffusion_lit.core.errors import UserError, reason
from diffusion_lit.data.loaders import Splits, Unreadable, leave_signals_to_main
from diffusion_lit.data.sources import Source
from diffusion_lit.core.optional import need

FORMAT = 1  # what diffusion_lit writes beside litdata's own index (under "diffusion_lit"): this version reads 1
AHEAD_CHUNKS = 4  # chunks of room kept in the cache for litdata's fetching ahead (`cache_budget`)
REMOTE = ("s3://", "gs://", "azure://", "r2://", "hf://", "local:")
CHECKED_BYTES = 2**30  # local chunks up to this size in all are checked against their checksums before training


class Decode:
    """A chunk item -> (image through `transform`, or the PIL image without one; label or caption); an image that
    cannot be decoded is an `Unreadable` naming it."""

    def __init__(self, transform, channels: int, captions: bool, root: str) -> None:
        self.transform, self.mode, self.captions = transform, "L" if channels == 1 else "RGB", captions
        self.root = root

    def __call__(self, item: dict):
        try:
            with Image.open(io.BytesIO(item["image"])) as image:
                image = image.convert(self.mode)
        except Exception as err:  # PIL's errors for damaged bytes take many forms
            what, why = f"image {item.get('index')} of the chunks in {self.root}", reason(err)
            raise Unreadable(f"{what} cannot be decoded ({why}): the chunk is damaged; copy it again, or write the "
                             "folder again with `data optimize`", what, why) from None
        label = item["caption"] if self.captions else int(item["label"])
        return (self.transform(image) if self.transform else image), label


class Streaming(Source):
    """Chunks written by `data optimize`, streamed with litdata: shuffled by seed and epoch, each DDP rank its own
    share, resumable mid-epoch. A local folder is read in place; a remote one goes through a local cache.

    Args:
        root: the chunk folder, or a URL (s3://, gs://, azure://, r2://, hf://, or local:DIR).
        max_cache_size: the most a remote folder's cache may hold ("50GB", "500MB", or bytes); by default litdata's
            (75% of the free disk).
        cache_dir: where a remote folder's chunks are cached; by default litdata's.
        timeout: seconds to wait for a remote folder's index before giving up in one line.
    """

    name, elastic = "streaming", True  # litdata's loader resumes with another number of workers
    not_data = ("max_cache_size", "cache_dir", "timeout")

    def __init__(self, root: str, max_cache_size: str | int | None = None, cache_dir: str | None = None,
                 timeout: float = 60.0) -> None:
        self.root, self.max_cache_size, self.cache_dir, self.timeout = root, max_cache_size, cache_dir, timeout
        if timeout <= 0:
            raise UserError(f"--data.source.timeout must be a number of seconds above 0, got {timeout}")
        self.remote = root.startswith(REMOTE)
        if not self.remote:
            check_chunks(Path(root))
        if cache_dir is not None:
            check_writable(Path(cache_dir))
        self.budget = None  # what litdata is told: max_cache_size less room for the chunks it fetches ahead
        index = self.read_index()
        self.meta = index["diffusion_lit"]
        self.image_size, self.channels = self.meta["image_size"], self.meta["channels"]
        self.num_classes = self.meta["num_classes"]
        if max_cache_size is not None:
            self.budget = cache_budget(max_cache_size, max(chunk["chunk_bytes"] for chunk in index["chunks"]))

    def stream(self, **kwargs):
        """A litdata StreamingDataset over the chunks."""
        ld = need("litdata", "data")
        return ld.StreamingDataset(self.root, cache_dir=self.cache_dir, max_cache_size=self.budget, **kwargs)

    def read_index(self) -> dict:
        """litdata's index with what `data optimize` wrote into it (read from the cache for a remote folder, within
        `timeout` seconds: a client with credentials and no network retries for minutes without a word)."""
        try:
            index = json.loads(within(self.timeout, lambda: (Path(self.stream().input_dir.path) / "index.json")
                                      .read_text(), self.waited))
        except UserError:
            raise
        except Exception as err:  # litdata's, for a folder it cannot open: credentials, a missing client, no chunks
            raise UserError(f"--data.source.root {self.root}: no chunk index can be read ({reason(err)}): give a "
                            "folder written by `python -m diffusion_lit data optimize`, and for a bucket its "
                            "credentials and client library (litdata's docs)") from None
        meta = index.get("diffusion_lit") if isinstance(index, dict) else None
        if not isinstance(meta, dict):
            raise UserError(f"{self.root} was not written by `python -m diffusion_lit data optimize` (its index has no "
                            "diffusion_lit section): write it with `data optimize --source ... --out DIR`")
        if meta.get("format") != FORMAT:
            raise UserError(f"{self.root} was written by another version of diffusion_lit (format "
                            f"{meta.get('format')}; this version reads {FORMAT}): write it again with `data optimize`")
        return index

    def waited(self) -> UserError:
        scheme = self.root.split("://")[0]
        endpoint = {"s3": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    or "AWS S3 (s3.amazonaws.com, or the endpoint in ~/.aws/config)",
                    "gs": "Google Cloud Storage (storage.googleapis.com)", "hf": "the Hugging Face Hub (huggingface.co)",
                    "r2": "Cloudflare R2 (r2.cloudflarestorage.com)", "azure": "Azure Blob Storage (blob.core.windows.net)"}
        return UserError(f"--data.source.root {self.root}: no chunk index within {self.timeout:g} s from "
                         f"{endpoint.get(scheme, scheme)}, with the credentials in this environment: check the network "
                         "and the endpoint, or wait longer with --data.source.timeout SECONDS")

    def read_captions(self) -> None:
        if not self.meta["captions"]:
            raise UserError(f"--data.captions true: {self.root} holds no captions: write it again with "
                            "`data optimize --captions true`")

    def images(self, transform, channels: int) -> Dataset:
        return self.stream(transform=Decode(transform, channels, False, self.root))

    def datasets(self, transform, channels: int, captions: bool, val_fraction: float, seed: int) -> Splits:
        """The stream for training (shuffled by seed and epoch), a share of its chunks' items held out for
        validation, and the whole set in order as the reference (read by index from a local folder)."""
        ld = need("litdata", "data")
        train = self.stream(shuffle=True, seed=seed, drop_last=True,
                            transform=Decode(transform(True), channels, captions, self.root))
        val = []
        if val_fraction > 0:
            train, val = ld.train_test_split(train, [1.0 - val_fraction, val_fraction], seed=seed)
            val.shuffle, val.drop_last = False, False
            val.transform = Decode(transform(False), channels, captions, self.root)
        reference = self.stream(transform=Decode(transform(False), channels, captions, self.root))
        return Splits(train, val, InOrder(reference) if self.remote else reference)

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int,
               world_size: int, rank: int) -> DataLoader:
        ld = need("litdata", "data")
        if not isinstance(dataset, ld.StreamingDataset):  # an encoded copy (latent diffusion's cache)
            return super().loader(dataset, batch_size, shuffle, seed, num_workers, world_size, rank)
        # litdata splits the chunks between DDP ranks and workers itself, and shuffles them by seed and epoch.
        return resumed_once_loader()(dataset, batch_size=batch_size, num_workers=num_workers,
                                     worker_init_fn=leave_signals_to_main, pin_memory=torch.cuda.is_available(),
                                     persistent_workers=num_workers > 0)


@functools.cache
def resumed_once_loader() -> type:
    """litdata's StreamingDataLoader whose restored position serves only the first epoch iterated after
    `load_state_dict`. litdata keeps replaying a restored position until an epoch's iterator runs to its end, and
    Lightning stops asking for batches once it has had `len(loader)` of them: with no workers, the next epoch then
    began by repeating the resumed one (its order and its batches)."""

    class ResumedOnce(need("litdata", "data").StreamingDataLoader):
        replay = False  # the next iterator goes on from a restored position

        def load_state_dict(self, obj: dict) -> None:
            super().load_state_dict(obj)
            self.replay = True

        def __iter__(self):
            if not self.replay:
                self.restore = False
            self.replay = False
            return super().__iter__()

    return ResumedOnce


class InOrder(Dataset):
    """A remote stream's images in order, read as far as they are asked for and kept (FID's reference images): litdata
    reads a remote folder's chunks by index only once iterating has fetched them."""

    def __init__(self, stream) -> None:
        self.stream, self.items, self.iterator = stream, [], None

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, i: int):
        if self.iterator is None:
            self.iterator = iter(self.stream)
        while len(self.items) <= i:
            self.items.append(next(self.iterator))
        return self.items[i]


def within(seconds: float, read: Callable[[], str], late: Callable[[], UserError]) -> str:
    """read() on a thread of its own, waited for `seconds`; `late()` raised when it has not answered by then (the
    thread is left to end with the process)."""
    box = {}

    def run() -> None:
        try:
            box["value"] = read()
        except Exception as err:  # raised again in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True, name="read-chunk-index")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise late()
    if "error" in box:
        raise box["error"]
    return box["value"]


def size_in_bytes(size: str | int, option: str) -> int:
    """Bytes from a number of them or litdata's sizes ("50GB", "500MB", ...); a UserError naming `option`."""
    from litdata.utilities.format import _convert_bytes_to_int  # litdata's own reading of its sizes

    try:
        value = int(size) if str(size).strip().isdigit() else _convert_bytes_to_int(str(size))
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"{option} {size} is not a size: give bytes, or a size such as 50GB or 500MB")
    return value


def cache_budget(max_cache_size: str | int, chunk_bytes: int) -> int:
    """The cache limit to give litdata so that the cache stays under `max_cache_size`: litdata evicts read chunks
    once over its limit, but fetches up to two chunks ahead per worker first (measured: one chunk over with two
    workers), so room for AHEAD_CHUNKS of the largest chunks is kept aside."""
    limit = size_in_bytes(max_cache_size, "--data.source.max_cache_size")
    room = AHEAD_CHUNKS * chunk_bytes
    if limit < room + 2 * chunk_bytes:
        raise UserError(f"--data.source.max_cache_size {max_cache_size} is too small for chunks of up to "
                        f"{chunk_bytes} bytes: give at least {room + 2 * chunk_bytes} bytes")
    return limit - room


def checksum(path: Path) -> str:
    """A chunk file's CRC-32 (what `data optimize` records and `check_chunks` compares), as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(2**22):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def check_chunks(root: Path) -> None:
    """A UserError when a local chunk folder is missing, or a chunk file is missing, not of its indexed size (cut
    short by a copy or a full disk) or, up to CHECKED_BYTES in all, not of its recorded checksum (damaged bytes)."""
    index_file = root / "index.json"
    if not index_file.is_file():
        raise UserError(f"--data.source.root {root}: no chunk index ({index_file} is missing): give a folder written "
                        "by `python -m diffusion_lit data optimize`")
    try:
        index = json.loads(index_file.read_text())
        chunks = index["chunks"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{index_file} cannot be read ({reason(err)}): write the folder again with "
                        "`data optimize`") from None
    for chunk in chunks:
        path = root / chunk["filename"]
        size = path.stat().st_size if path.is_file() else None
        if size != chunk["chunk_bytes"]:
            found = "is missing" if size is None else f"holds {size} bytes of {chunk['chunk_bytes']}"
            raise UserError(f"chunk {path} {found}: copy it again, or write the folder again with `data optimize`")
    # Folders written before checksums were recorded have none; larger ones are checked image by image as read.
    checksums = (index.get("diffusion_lit") or {}).get("checksums") or {}
    if checksums and sum(chunk["chunk_bytes"] for chunk in chunks) <= CHECKED_BYTES:
        for chunk in chunks:
            path = root / chunk["filename"]
            if checksums.get(chunk["filename"]) not in (None, checksum(path)):
                raise UserError(f"chunk {path} is damaged (its bytes differ from those `data optimize` wrote): copy "
                                "it again, or write the folder again with `data optimize`")


def check_writable(folder: Path) -> None:
    """A UserError when the cache folder cannot be made or written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"--data.source.cache_dir {folder} cannot be written to ({reason(err)}): give a folder you "
                        "can write, with room for max_cache_size") from None

