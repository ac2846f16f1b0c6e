"""Each data source's native shape, classes, captions and FID cache identity; older spellings of the data settings
(command line, config files, checkpoints) read or refused; the trust rule at the source's place in a checkpoint."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion_lit.commands.evaluate import checkpoint_data, evaluate
from diffusion_lit.data.datamodule import DiffusionDataModule, from_config
from diffusion_lit.core.errors import UserError
from diffusion_lit.training.metrics import reference_cache_path
from diffusion_lit.data.old_data import refuse_old_configs, upgrade, upgrade_words
from diffusion_lit.data.sources import CIFAR10, MNIST, ImageFolder, ShippedDigits, Source, build
from diffusion_lit.core.trust import check_data_hparams

from conftest import write_image_folder
from test_cli import REPO, cli
from test_errors import assert_clean_failure, checkpoints, images  # noqa: F401 (fixtures)


def old_cache_path(cache_dir, extractor, dataset, root, data, num_real) -> Path:
    """reference_cache_path as older versions computed it from `--data.dataset` and `--data.root`."""
    identity = {"dataset": dataset, "root": Path(root).resolve(), "images": len(data.reference_set),
                "image_size": data.image_size, "channels": data.channels,
                "num_real": min(num_real, len(data.reference_set)), "extractor": extractor}
    digest = hashlib.sha1(repr(sorted(identity.items())).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"{dataset}-{extractor.rsplit('.', 1)[-1]}-{digest}.pt"


def test_shipped_digits_shape_classes_captions_and_cache_key(tmp_path):
    source = ShippedDigits()
    assert (source.image_size, source.channels, source.num_classes, source.flip) == (28, 1, 10, False)
    assert [source.caption(i, 7) for i in range(3)] == ["7", "seven", "the digit 7"]
    data = DiffusionDataModule(source, batch_size=8, num_workers=0)
    data.setup()
    assert len(data.train_set) + len(data.val_set) == 10000 and data.train_set[0][0].shape == (1, 28, 28)
    assert data.hparams.source == {"class_path": "diffusion_lit.data.sources.ShippedDigits", "init_args": {}}
    # older versions keyed the digits' cache by the default root, data/: their caches still match
    assert reference_cache_path(tmp_path, "digits", data, 100) == old_cache_path(tmp_path, "digits", "digits", "data",
                                                                                 data, 100)


def test_mnist_without_its_files_is_the_shipped_digits_said_once(tmp_path):
    source = MNIST(str(tmp_path), download=False)
    assert (source.image_size, source.channels, source.num_classes, source.caption(1, 3)) == (28, 1, 10, "three")
    data = DiffusionDataModule(source, channels=3, batch_size=8, num_workers=0)  # grayscale digits as RGB
    data.setup()
    assert data.train_set[0][0].shape == (3, 28, 28)
    assert len(source.notes(28, 3)) == 1 and "MNIST/raw/train-images-idx3-ubyte" in source.notes(28, 3)[0]
    assert reference_cache_path(tmp_path, "x", data, 50) == old_cache_path(tmp_path, "x", "mnist", tmp_path, data, 50)


def test_the_default_source_is_mnist():
    data = DiffusionDataModule(batch_size=8)
    assert isinstance(data.source, MNIST) and data.source.root == "data"
    assert data.hparams.source == {"class_path": "diffusion_lit.data.sources.MNIST",
                                   "init_args": {"root": "data", "download": True}}


def test_cifar10_shape_captions_and_a_clear_error_without_its_files(tmp_path):
    source = CIFAR10(str(tmp_path), download=False)
    assert (source.image_size, source.channels, source.num_classes, source.flip) == (32, 3, 10, True)
    assert [source.caption(i, 3) for i in range(3)] == ["cat", "a cat", "a photo of a cat"]
    assert len(source.colour(1)) == 1 and source.colour(3) == []
    data = DiffusionDataModule(source, batch_size=8)
    assert (data.image_size, data.channels, data.random_flip) == (32, 3, True)
    with pytest.raises(UserError, match=f"cifar10 was not found in {tmp_path}.*--data.source ImageFolder "
                                        "--data.source.root DIR"):
        data.setup()


def test_image_folder_shape_classes_captions_and_cache_key(tmp_path):
    root = write_image_folder(tmp_path / "images", n_per_class=4, size=12)
    (root / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{c}/{i:03d}.png", "text": f"{c} {i}"}) + "\n" for c in "ab" for i in range(4)))
    source = ImageFolder(str(root))
    assert (source.image_size, source.channels, source.num_classes) == (12, 1, 2)
    data = DiffusionDataModule(source, batch_size=2, num_workers=0, val_fraction=0, captions=True)
    data.setup()
    assert source.caption(5, 1) == "b 1" and len(data.example_prompts(3)) == 3
    assert {data.train_set[i][1] for i in range(8)} == {f"{c} {i}" for c in "ab" for i in range(4)}
    assert data.hparams.source == {"class_path": "diffusion_lit.data.sources.ImageFolder",
                                   "init_args": {"root": str(root), "skip_unreadable": False}}
    assert reference_cache_path(tmp_path, "x", data, 5) == old_cache_path(tmp_path, "x", "folder", root, data, 5)
    Image.new("RGB", (20, 20)).save(root / "a" / "rgb.png")
    assert ImageFolder(str(root)).channels == 1  # the first image's mode, as before


def test_a_source_round_trips_through_its_config(tmp_path):
    root = write_image_folder(tmp_path / "images", n_per_class=2)
    for source in (ShippedDigits(), MNIST("somewhere", download=False), CIFAR10(), ImageFolder(str(root), True)):
        assert build(source.config()).config() == source.config()
    assert isinstance(build({"class_path": "ShippedDigits"}), ShippedDigits)  # a bare name is one of ours
    for spec, message in [({"class_path": "collections.OrderedDict"}, "is not a diffusion_lit.data.sources.Source"),
                          ({"class_path": "MNIST", "init_args": {"folder": "x"}}, "unexpected keyword"),
                          ({"class_path": "nowhere.Thing"}, "cannot import it")]:
        with pytest.raises(UserError, match=message):
            build(spec)


def test_old_data_settings_are_read_as_their_source():
    assert upgrade({"dataset": "folder", "root": "imgs", "download": True, "skip_unreadable": True, "seed": 3}) == {
        "seed": 3, "source": {"class_path": "diffusion_lit.data.sources.ImageFolder",
                              "init_args": {"root": "imgs", "skip_unreadable": True}}}
    assert upgrade({"dataset": "digits", "root": "data", "download": True})["source"] == {
        "class_path": "diffusion_lit.data.sources.ShippedDigits", "init_args": {}}
    assert upgrade({"root": "d", "batch_size": 4})["source"]["init_args"] == {"root": "d"}  # mnist, the old default
    new = {"source": {"class_path": "diffusion_lit.data.sources.CIFAR10"}, "seed": 0}
    assert upgrade(new) is new
    with pytest.raises(UserError, match="unknown dataset 'imagenet'.*ShippedDigits, MNIST, CIFAR10, ImageFolder"):
        upgrade({"dataset": "imagenet"})
    data = from_config({"dataset": "digits", "root": "data", "download": True, "skip_unreadable": False,
                        "batch_size": 8, "_instantiator": "lightning.pytorch.cli.instantiate_module"})
    assert isinstance(data.source, ShippedDigits) and data.hparams.batch_size == 8


def test_old_options_on_the_command_line_are_translated_and_said(capsys):
    words = ["fit", "--data.root=imgs", "--data.batch_size", "4", "--data.dataset", "folder",
             "--data.skip_unreadable", "true"]
    assert upgrade_words(words) == ["fit", "--data.source", "ImageFolder", "--data.source.root", "imgs",
                                    "--data.batch_size", "4", "--data.source.skip_unreadable", "true"]
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and "is spelled --data.source ImageFolder --data.source.root imgs" in said[0]
    assert upgrade_words(["fit", "--data.source.root", "x"]) == ["fit", "--data.source.root", "x"]
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        upgrade_words(["--data.dataset", "imagenet"])


def test_old_spellings_through_the_cli(tmp_path, image_folder):
    parsed = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.dataset", "folder", "--data.root",
                 image_folder, "--print_config")
    assert parsed.returncode == 0, parsed.stderr
    assert "class_path: diffusion_lit.data.sources.ImageFolder" in parsed.stdout and f"root: {image_folder}" in parsed.stdout
    assert "note: --data.dataset folder" in parsed.stderr
    old = tmp_path / "old.yaml"
    old.write_text((REPO / "configs/mnist.yaml").read_text().replace(
        "  source:\n    class_path: diffusion_lit.data.sources.MNIST\n    init_args: {root: data}\n",
        "  dataset: mnist\n  root: data\n"))
    refused = cli("fit", "--config", old, "--print_config")
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.dataset, data.root are older spellings" in errors[0]
    assert "data: {source: {class_path: diffusion_lit.data.sources.MNIST, init_args: {root: data}}}" in errors[0]
    with pytest.raises(UserError, match="data.dataset is an older spelling"):
        (tmp_path / "digits.yaml").write_text("data:\n  dataset: digits\n")
        refuse_old_configs([tmp_path / "digits.yaml"])


def test_every_config_names_its_source():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        refuse_old_configs([path])
        assert "source:" in path.read_text(), path


def crafted_data(good: Path, out: Path, **changes) -> Path:
    """A copy of a good checkpoint whose data hyperparameters are changed."""
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["datamodule_hyper_parameters"] = {**checkpoint["datamodule_hyper_parameters"], **changes}
    torch.save(checkpoint, out)
    return out


def test_an_old_checkpoints_data_settings_still_evaluate(checkpoints, images, tmp_path, capsys):
    good, _ = checkpoints
    hparams = torch.load(good, weights_only=True)["datamodule_hyper_parameters"]
    assert hparams["source"]["class_path"] == "diffusion_lit.data.sources.ImageFolder"
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["datamodule_hyper_parameters"] = {k: v for k, v in hparams.items() if k != "source"} | {
        "dataset": "folder", "root": str(images), "download": True, "skip_unreadable": False}  # as older versions
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    # the same data, the same reference cache as the new checkpoint's
    old_data, new_data = checkpoint_data(checkpoint), checkpoint_data(torch.load(good, weights_only=True))
    assert isinstance(old_data.source, ImageFolder) and len(old_data.reference_set) == len(new_data.reference_set)
    assert reference_cache_path(tmp_path, "x", old_data, 100) == reference_cache_path(tmp_path, "x", new_data, 100)
    evaluate(ckpt_path=str(old), num_samples=8, steps=2, batch_size=8, num_real=16,
             feature_extractor="features.TinyFeatures", cache_dir=str(tmp_path / "cache"))
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["num_samples"] == 8 and "fid" in scores


def test_a_crafted_source_is_refused_before_import(checkpoints, tmp_path):
    good, _ = checkpoints
    marker = tmp_path / "marker"
    evil = crafted_data(good, tmp_path / "evil.ckpt",
                        source={"class_path": "os.system", "init_args": {"command": f"touch {marker}"}})
    result = cli("evaluate", "--ckpt_path", evil, "--feature_extractor", "features.TinyFeatures",
                 "--num_samples", 4, "--steps", 2)
    assert result.returncode == 2, result.stderr
    assert_clean_failure(result, "'os.system'", "as its source", "refused before importing it")
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not marker.exists()
    for changes in ({"_class_path": "os.system"}, {"source": "os.system"},
                    {"source": {"class_path": "diffusion_lit.data.sources.os.system"}}):
        with pytest.raises(UserError, match="refused"):
            check_data_hparams({"source": None, **changes})
    with pytest.raises(UserError, match="not a subclass of diffusion_lit.data.sources.Source"):
        check_data_hparams({"source": {"class_path": "collections.OrderedDict"}}, ["collections.OrderedDict"])


class Gray(Source):
    """A user's own source: four gray images."""

    name, image_size, channels = "gray", 8, 1

    def images(self, transform, channels):
        return [(transform(Image.new("L", (8, 8), 128)), 0)] * 4


def test_a_users_own_source_is_trusted_when_named():
    hparams = {"source": {"class_path": "test_sources.Gray", "init_args": {}}}
    with pytest.raises(UserError, match="--trust_class test_sources.Gray"):
        check_data_hparams(hparams)
    check_data_hparams(hparams, ["test_sources.Gray"])
    data = from_config({**hparams, "batch_size": 2, "val_fraction": 0.0})
    data.setup()
    assert data.train_set[0][0].shape == (1, 8, 8) and data.num_classes == 0
    with pytest.raises(UserError, match="Gray has no captions: leave --data.captions false"):
        DiffusionDataModule(Gray(), captions=True)


# Folders deeper than PATH_MAX (4,096 bytes), made and removed through folder descriptors: their paths cannot be opened


DIRECTORY = os.O_RDONLY | os.O_DIRECTORY


def remove_chain(root: Path) -> None:
    """Removes the chain of folders named d below root and the files at its bottom, from the bottom up (shutil.rmtree,
    pytest's clean-up, recurses on Python 3.11 and stops with a RecursionError at this depth)."""
    fd, depth = os.open(root, DIRECTORY), 0
    while True:
        try:
            child = os.open("d", DIRECTORY, dir_fd=fd)
        except FileNotFoundError:
            break
        os.close(fd)
        fd, depth = child, depth + 1
    for name in os.listdir(fd):
        os.unlink(name, dir_fd=fd)
    for _ in range(depth):
        parent = os.open("..", DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = parent
        os.rmdir("d", dir_fd=fd)
    os.close(fd)


def test_an_image_deeper_than_path_max_is_found_read_and_captioned(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("L", (8, 8), 0).save(root / "top.png")
    (root / "top.txt").write_text("top")
    fd = os.open(root, DIRECTORY)
    try:
        for _ in range(3000):  # 2 bytes a level: the deep image's path is over 6,000 bytes long
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as file:
            Image.new("L", (8, 8), 255).save(file, format="PNG")
        with open(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as file:
            file.write("deep")
        source = ImageFolder(str(root))
        assert sorted(len(os.fsencode(p)) > 4096 for p in source.index.files) == [False, True]
        data = DiffusionDataModule(source, batch_size=2, num_workers=0, val_fraction=0, captions=True)
        data.setup()
        loaded = {data.train_set[i][1]: data.train_set[i][0] for i in range(2)}  # caption -> image
        assert loaded.keys() == {"top", "deep"} and loaded["deep"].shape == (1, 8, 8)
        assert (loaded["deep"] == 1).all() and (loaded["top"] == -1).all()
    finally:
        os.close(fd)
        remove_chain(root)


def test_a_folder_that_cannot_be_read_is_said_not_lost_silently(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", n_per_class=2)
    (root / "a" / "x").symlink_to("y")  # a loop of links: each names the other
    (root / "a" / "y").symlink_to("x")
    assert len(ImageFolder(str(root)).index.files) == 4
    said = [line for line in capsys.readouterr().err.splitlines() if "could not be read" in line]
    assert said == [f"{root}: 2 folder(s) could not be read and are left out (the first, {root / 'a' / 'x'}: Too many "
                    "levels of symbolic links)"]
