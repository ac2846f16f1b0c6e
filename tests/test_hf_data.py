"""A Hugging Face dataset on this machine as the training data: its three layouts, classes, captions, bad input."""

import datasets
import pytest

from built_data import hf_layout
from diffusion_lit.core.errors import UserError
from diffusion_lit.data.hf_data import HFDataset
from test_cli import REPO, cli


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet", "imagefolder"])
def test_each_layout_reads_as_the_same_images_and_one_trains_the_tiny_config(tmp_path, layout):
    path = hf_layout(tmp_path, layout, captions=True)
    source = HFDataset(str(path))
    # datasets' imagefolder takes its columns from a metadata.jsonl, when there is one, instead of the class folders
    classes = [] if layout == "imagefolder" else ["a", "b"]
    assert (source.image_size, source.channels, source.num_classes, source.classes) == (8, 1, len(classes), classes)
    image, label = source.images(None, 1)[0]
    assert image.size == (8, 8) and image.mode == "L" and label == 0
    if layout == "imagefolder":
        assert HFDataset(str(hf_layout(tmp_path / "plain", layout))).classes == ["a", "b"]
    source.read_captions()
    assert source.caption(0, 0) == "image 000 of a"
    if layout != "save_to_disk":  # past loading, every layout is the same rows (`Rows`): one fit shows they train
        return
    result = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "HFDataset",
                 "--data.source.path", path, "--data.batch_size", 4, "--trainer.max_steps", 2,
                 "--trainer.callbacks", "[]", "--trainer.logger.init_args.save_dir", tmp_path / "runs",
                 "--trainer.enable_progress_bar", "false", *(["--model.conditioning", "Labels"] if classes else []))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt").is_file()


def test_a_dataset_dict_is_read_by_its_split_and_unlabelled_rows_are_unlabelled(tmp_path):
    table = datasets.load_from_disk(str(hf_layout(tmp_path, "save_to_disk")))
    datasets.DatasetDict({"train": table.remove_columns("label"), "test": table}).save_to_disk(str(tmp_path / "dd"))
    assert HFDataset(str(tmp_path / "dd")).num_classes == 0
    assert HFDataset(str(tmp_path / "dd"), split="test").num_classes == 2
    with pytest.raises(UserError, match="has no split 'validation' \\(it has train, test\\)"):
        HFDataset(str(tmp_path / "dd"), split="validation")


def bad(tmp_path, kind):
    """A dataset folder and the source's arguments for each kind of bad input."""
    path = hf_layout(tmp_path, "save_to_disk", captions=True)
    table = datasets.load_from_disk(str(path))
    if kind == "empty":
        table.select([]).to_parquet(str(tmp_path / "empty" / "train.parquet"))
        return tmp_path / "empty", {}
    if kind == "empty save_to_disk":  # which datasets itself cannot load again (an IndexError)
        table.select([]).save_to_disk(str(tmp_path / "none"))
        return tmp_path / "none", {}
    if kind == "negative labels":  # -1: Hugging Face's "no label"
        table.cast_column("label", datasets.Value("int64")).map(
            lambda row, i: {"label": -1 if i == 3 else row["label"]}, with_indices=True).save_to_disk(str(tmp_path / "n"))
        return tmp_path / "n", {}
    if kind == "text labels":
        table.cast_column("label", datasets.Value("string")).save_to_disk(str(tmp_path / "strings"))
        return tmp_path / "strings", {}
    return path, {"missing column": {"image_column": "img"}, "not images": {"image_column": "text"},
                  "missing captions": {"caption_column": "prompt"}}[kind]


@pytest.mark.parametrize("kind,message", [
    ("missing column", "has no column 'img' \\(it has image, label, text\\): name the image column"),
    ("not images", "column 'text' holds Value\\('string'\\), not images"),
    ("empty", "holds no rows in its 'train' split"),
    ("empty save_to_disk", "holds no rows in its 'train' split \\(a save_to_disk dataset of none\\): nothing"),
    ("text labels", "column 'label' holds Value\\('string'\\), not class labels"),
    ("negative labels", "column 'label' holds negative labels \\(-1: no label\\) in 1 rows"),
    ("missing captions", "has no column 'prompt'"),
])
def test_bad_input_is_one_line_naming_what_to_change(tmp_path, kind, message):
    path, arguments = bad(tmp_path, kind)
    with pytest.raises(UserError, match=message):
        source = HFDataset(str(path), **arguments)
        source.read_captions()


def test_bad_input_through_fit_is_one_error_line(tmp_path):
    path = hf_layout(tmp_path, "parquet")
    result = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "HFDataset",
                 "--data.source.path", path, "--data.source.image_column", "label",
                 "--trainer.logger.init_args.save_dir", tmp_path / "runs")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "column 'label' holds ClassLabel" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_dataset_dict_with_an_empty_split_reads_its_other_split(tmp_path):
    table = datasets.load_from_disk(str(hf_layout(tmp_path, "save_to_disk")))
    datasets.DatasetDict({"train": table, "test": table.select([])}).save_to_disk(str(tmp_path / "dd"))
    assert len(HFDataset(str(tmp_path / "dd")).images(None, 1)) == len(table)
    with pytest.raises(UserError, match="holds no rows in its 'test' split"):
        HFDataset(str(tmp_path / "dd"), split="test")
