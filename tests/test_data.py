import pytest
import torch

from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.core.errors import UserError
from diffusion_lit.data.sources import MNIST, ImageFolder

from conftest import write_image_folder


def test_folder_with_class_subfolders(image_folder):
    data = DiffusionDataModule(ImageFolder(str(image_folder)), batch_size=4, num_workers=0, val_fraction=0.25)
    assert (data.image_size, data.channels, data.random_flip) == (8, 1, False)
    data.setup("fit")
    assert len(data.train_set) == 12 and len(data.val_set) == 4
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1  # pixel 0 -> -1, pixel 255 -> 1
    labels = {data.train_set.dataset.index.labels[i] for i in range(16)}
    assert labels == {0, 1} and data.train_set.dataset.index.classes == ["a", "b"]


def test_folder_resized_to_rgb(tmp_path):
    root = write_image_folder(tmp_path / "flat", n_per_class=4, size=12, classes=("only",))
    for p in (root / "only").iterdir():  # a flat folder: no class sub-folders
        p.rename(root / p.name)
    data = DiffusionDataModule(ImageFolder(str(root)), image_size=8, channels=3, batch_size=2, num_workers=0,
                               val_fraction=0)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (2, 3, 8, 8) and set(y.tolist()) == {0}
    assert data.val_dataloader() == []


def test_split_and_shuffle_are_seeded(image_folder):
    def first_batch(epoch):
        data = DiffusionDataModule(ImageFolder(str(image_folder)), batch_size=4, num_workers=0, seed=3)
        data.setup("fit")
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"source": "folder"}, "source must be one of diffusion_lit.data.sources"),
        ({"batch_size": 0}, "batch_size"),
        ({"channels": 2}, "channels must be 1 or 3"),
    ],
)
def test_bad_input_is_a_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        DiffusionDataModule(**kwargs)


def test_a_missing_folder_is_a_user_error():
    with pytest.raises(UserError, match="does not exist: give an existing folder with --data.source.root"):
        ImageFolder("/does/not/exist")


def test_missing_mnist_falls_back_to_the_shipped_digits_and_names_the_folder(tmp_path, capsys):
    data = DiffusionDataModule(MNIST(str(tmp_path), download=False))
    data.setup("fit")
    said = capsys.readouterr().err
    assert "the 10,000 MNIST test digits that ship with diffusion_lit" in said and str(tmp_path) in said
    assert "--data.source ShippedDigits" in said
    assert len(data.train_set) + len(data.val_set) == 10000
