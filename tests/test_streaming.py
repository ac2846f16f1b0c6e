"""litdata chunks: `data optimize` of any source, streaming them for training, the cache bound, bad chunk folders."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning.pytorch import Callback, Trainer

from conftest import tiny_unet, write_image_folder
from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.core.errors import UserError
from diffusion_lit.commands.optimize import optimize
from diffusion_lit.data.streaming import AHEAD_CHUNKS, Streaming
from diffusion_lit.data.sources import ImageFolder
from test_cli import REPO, cli


def pixels(image: Image.Image) -> bytes:
    return np.asarray(image).tobytes()


@pytest.fixture
def chunks(tmp_path) -> Path:
    images = write_image_folder(tmp_path / "images", n_per_class=20)
    result = cli("data", "optimize", "--source", "ImageFolder", "--source.root", images, "--out", tmp_path / "chunks",
                 "--chunk_bytes", "800B")
    assert result.returncode == 0, result.stderr
    assert "wrote 40 images" in result.stdout
    return tmp_path / "chunks"


def test_optimize_keeps_every_image_and_label_and_streaming_trains_on_them(chunks, tmp_path):
    folder = ImageFolder(str(tmp_path / "images"))
    wanted = sorted((pixels(image), label) for image, label in folder.images(None, 1))
    source = Streaming(str(chunks))
    assert (source.image_size, source.channels, source.num_classes) == (8, 1, 2)
    assert len(list(chunks.glob("*.bin"))) > 2  # several chunks, as a large set has
    streamed = source.stream()
    got = sorted((pixels(Image.open(__import__("io").BytesIO(item["image"]))), item["label"]) for item in streamed)
    assert got == wanted  # the same images, compared pixel for pixel, with the same labels
    assert not list(tmp_path.glob("*.partial"))

    result = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "Streaming",
                 "--data.source.root", chunks, "--data.batch_size", 4, "--trainer.max_steps", 3,
                 "--trainer.callbacks", "[]", "--trainer.logger.init_args.save_dir", tmp_path / "runs",
                 "--trainer.enable_progress_bar", "false", "--model.conditioning", "Labels")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt").is_file()


def test_a_held_out_share_is_kept_from_training(chunks):
    data = DiffusionDataModule(Streaming(str(chunks)), batch_size=4, num_workers=0, val_fraction=0.25)
    data.setup()
    train = {float(x.sum()) for x, _ in data.train_set}
    val = {float(x.sum()) for x, _ in data.val_set}
    assert len(data.val_set) == 10 and len(data.train_set) == 30 and not train & val


def cache_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class CacheSizes(Callback):
    def __init__(self, cache: Path) -> None:
        self.cache, self.sizes, self.seen = cache, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sizes.append(sum(f.stat().st_size for f in self.cache.rglob("*") if f.is_file()))
        self.seen += len(batch[0])


def test_the_cache_stays_under_max_cache_size_through_an_epoch_of_training(chunks, tmp_path):
    total = sum(f.stat().st_size for f in chunks.glob("*.bin"))
    largest = max(f.stat().st_size for f in chunks.glob("*.bin"))
    bound = (AHEAD_CHUNKS + 4) * largest  # room for litdata's fetching ahead and four chunks at a time
    assert bound < total
    data = DiffusionDataModule(Streaming(f"local:{chunks}", max_cache_size=bound, cache_dir=str(tmp_path / "cache")),
                               batch_size=4, num_workers=2, val_fraction=0)
    sizes = CacheSizes(tmp_path / "cache")
    Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[sizes]).fit(DiffusionModule(net=tiny_unet, image_size=8, channels=1), data)
    assert sizes.seen == 40 and 0 < max(sizes.sizes) <= bound  # the whole set went through the cache
    image, label = data.reference_set[5]  # FID's reference images, read in order from the remote folder
    assert image.shape == (1, 8, 8) and label in (0, 1) and len(data.reference_set) == 40


def test_a_folder_that_is_not_ours_or_is_cut_short_is_refused_in_one_line(chunks, tmp_path):
    with pytest.raises(UserError, match="no chunk index"):
        Streaming(str(tmp_path / "images"))
    index = json.loads((chunks / "index.json").read_text())
    other = {**index, "diffusion_lit": {**index["diffusion_lit"], "format": 99}}
    (chunks / "index.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="written by another version of diffusion_lit \\(format 99; this version reads 1"):
        Streaming(str(chunks))
    (chunks / "index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "diffusion_lit"}))
    with pytest.raises(UserError, match="was not written by `python -m diffusion_lit data optimize`"):
        Streaming(str(chunks))
    (chunks / "index.json").write_text(json.dumps(index))
    first = chunks / index["chunks"][0]["filename"]
    first.write_bytes(first.read_bytes()[:-10])
    with pytest.raises(UserError, match=f"chunk {first} holds {index['chunks'][0]['chunk_bytes'] - 10} bytes of"):
        Streaming(str(chunks))


def test_bad_settings_are_one_error_line_and_write_nothing(chunks, tmp_path):
    (tmp_path / "a-file").write_text("")
    result = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "Streaming",
                 "--data.source.root", f"local:{chunks}", "--data.source.cache_dir", tmp_path / "a-file" / "cache",
                 "--trainer.logger.init_args.save_dir", tmp_path / "runs")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --data.source.cache_dir")
    assert "cannot be written to" in result.stderr and not (tmp_path / "runs").exists()
    with pytest.raises(UserError, match="max_cache_size 1KB is too small for chunks"):
        Streaming(str(chunks), max_cache_size="1KB")
    with pytest.raises(UserError, match="max_cache_size lots is not a size"):
        Streaming(str(chunks), max_cache_size="lots")
    result = cli("data", "optimize", "--source", "ImageFolder", "--source.root", tmp_path / "images", "--out", chunks)
    assert result.returncode == 2 and "already exists and is not an empty folder" in result.stderr
    for option, value, said in (("--chunk_bytes", "lots", "--chunk_bytes lots is not a size"),
                                ("--num_workers", -1, "--num_workers must be 0")):
        result = cli("data", "optimize", "--source", "ImageFolder", "--source.root", tmp_path / "images", "--out",
                     tmp_path / "new", option, value)
        assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "new").exists() and not (tmp_path / "new.partial").exists()
    os.chmod(chunks, 0o755)


def test_a_bucket_that_does_not_answer_is_one_line_after_the_timeout(tmp_path, monkeypatch):
    """Credentials set and no network: boto retries for minutes without a word. The index is waited for `timeout`
    seconds, then one line says what was tried and how to wait longer."""
    import time

    def no_answer(self, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(Streaming, "stream", no_answer)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://192.0.2.1:9")
    began = time.monotonic()
    with pytest.raises(UserError, match=r"s3://no-such-bucket/x: no chunk index within 0.5 s from http://192.0.2.1:9, "
                                        r"with the credentials in this environment: .* --data.source.timeout SECONDS"):
        Streaming("s3://no-such-bucket/x", timeout=0.5)
    assert time.monotonic() - began < 5


def test_a_bucket_with_credentials_and_no_network_ends_in_one_line(tmp_path):
    result = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "Streaming", "--data.source.root",
                 "s3://no-such-bucket/x", "--data.source.timeout", 3, AWS_ACCESS_KEY_ID="AKIAEXAMPLE",
                 AWS_SECRET_ACCESS_KEY="example", AWS_DEFAULT_REGION="us-east-1")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith("error: --data.source.root s3://no-such-bucket/x: no chunk index")
