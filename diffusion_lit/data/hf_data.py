"""A Hugging Face dataset on this machine as a source of training images (`pip install -e ".[data]"`): a folder
written by `save_to_disk`, parquet files, or an `imagefolder` (images in class sub-folders, captions in a
`metadata.jsonl`), read with the `datasets` library, as diffusers' training scripts read them. Nothing is downloaded."""

import json
from pathlib import Path

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from diffusion_lit.core.errors import UserError, reason
from diffusion_lit.data.folders import GRAYSCALE_MODES, to_8_bits
from diffusion_lit.data.loaders import Splits, Unreadable
from diffusion_lit.data.sources import Source
from diffusion_lit.core.optional import need

CHECKED_ROWS = 10_000  # rows decoded before training (all of a smaller dataset, else as many spread over it)


def load(path: Path, split: str):
    """The `split` of the dataset at `path`, in whichever of the three layouts it is."""
    datasets = need("datasets", "data")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # save_to_disk
        if (path / "dataset_dict.json").is_file() and (path / split / "state.json").is_file():
            path = path / split  # the split alone: datasets cannot load a dict with an empty split (IndexError)
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets' own errors for a folder it cannot read take many forms
            if empty_saved(path, split):  # datasets cannot load a dataset of no rows that it saved itself (IndexError)
                raise UserError(f"{path} holds no rows in its {split!r} split (a save_to_disk dataset of none): "
                                "nothing to train on; give a dataset with images") from None
            raise UserError(f"{path} cannot be read as a save_to_disk dataset ({reason(err)}): write it again with "
                            "save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{path} has no split {split!r} (it has {', '.join(loaded)}): name one with "
                                "--data.source.split")
            loaded = loaded[split]
        return loaded
    parquet = [path] if path.suffix == ".parquet" else sorted(path.rglob("*.parquet"))
    try:
        if parquet:
            return datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train")
        return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    except (ValueError, FileNotFoundError) as err:  # no rows, no such split, no images
        if "corresponds to no data" in str(err):
            raise UserError(f"{path} holds no rows in its {split!r} split: nothing to train on") from None
        raise UserError(f"{path} is not a Hugging Face dataset this can read ({reason(err)}): give a "
                        "save_to_disk folder, parquet files, or a folder of images (imagefolder)") from None


def empty_saved(path: Path, split: str) -> bool:
    """Whether a save_to_disk folder (one dataset, or `split` of a DatasetDict) lists no data files."""
    state = path / "state.json" if (path / "state.json").is_file() else path / split / "state.json"
    try:
        return not json.loads(state.read_text()).get("_data_files")
    except (OSError, ValueError, AttributeError):
        return False


class HFDataset(Source):
    """A local Hugging Face dataset (a `save_to_disk` folder, one or more parquet files, or an imagefolder).

    Args:
        path: the dataset's folder (or one parquet file).
        split: the split to train on (a `save_to_disk` DatasetDict's or an imagefolder's).
        image_column: the column of images.
        label_column: the column of class labels (a `ClassLabel`, or integers); a dataset without it is
            unlabelled.
        caption_column: the column of captions, for text models (`--data.captions true`).
    """

    name = "hf"

    def __init__(self, path: str, split: str = "train", image_column: str = "image", label_column: str = "label",
                 caption_column: str = "text") -> None:
        self.path, self.split = path, split
        self.image_column, self.label_column, self.caption_column = image_column, label_column, caption_column
        self.root = path  # the FID reference cache's key
        if not Path(path).exists():
            raise UserError(f"--data.source.path {path} does not exist: give a save_to_disk folder, parquet files "
                            "or a folder of images")
        table = load(Path(path), split)
        if len(table) == 0:
            raise UserError(f"{path} holds no rows in its {split!r} split: nothing to train on")
        features, columns = table.features, ", ".join(table.column_names)
        if image_column not in features:
            raise UserError(f"{path} has no column {image_column!r} (it has {columns}): name the image column with "
                            "--data.source.image_column")
        if type(features[image_column]).__name__ != "Image":
            raise UserError(f"{path}: column {image_column!r} holds {features[image_column]!r}, not images: name the "
                            "image column with --data.source.image_column")
        self.table = table
        first = table[0][image_column]
        self.image_size, self.channels = min(first.size), 1 if first.mode in GRAYSCALE_MODES else 3
        self.num_classes, self.classes = 0, []
        if label_column in features:
            feature = features[label_column]
            integers = str(getattr(feature, "dtype", "")).startswith(("int", "uint"))  # a ClassLabel's are int64
            if integers and min(table[label_column]) < 0:
                raise UserError(f"{path}: column {label_column!r} holds negative labels (-1: no label) in "
                                f"{sum(label < 0 for label in table[label_column])} rows: remove those rows, or train "
                                "unlabelled with --data.source.label_column none")
            if type(feature).__name__ == "ClassLabel":
                self.classes = list(feature.names)
                self.num_classes = len(self.classes)
            elif integers:
                self.num_classes = max(table[label_column]) + 1
            else:
                raise UserError(f"{path}: column {label_column!r} holds {feature!r}, not class labels: name the label "
                                "column with --data.source.label_column (a ClassLabel or integers)")
        self.captions: list[str] | None = None

    def images(self, transform, channels: int) -> Dataset:
        columns = [self.image_column] + ([self.label_column] if self.num_classes else [])
        return Rows(self.table.select_columns(columns), self.image_column, self.label_column if self.num_classes
                    else None, "L" if channels == 1 else "RGB", transform, self.path)

    def datasets(self, transform, channels: int, captions: bool, val_fraction: float, seed: int) -> Splits:
        self.check_rows()
        return super().datasets(transform, channels, captions, val_fraction, seed)

    def check_rows(self) -> None:
        """A UserError naming the rows whose image cannot be decoded, before training: every row of a dataset of up
        to CHECKED_ROWS, else CHECKED_ROWS spread evenly over it (a row met later is named as it is read)."""
        rows = Rows(self.table.select_columns([self.image_column]), self.image_column, None, "L", None, self.path)
        step = max(1, len(rows) / CHECKED_ROWS)
        picked = sorted({int(k * step) for k in range(min(len(rows), CHECKED_ROWS))})
        bad = []
        for i in tqdm(picked, f"checking the images in {self.path}", disable=len(picked) < 2000, leave=False):
            try:
                rows[i]
            except Unreadable as err:
                bad.append(f"{err.what} ({err.why})")
        if bad:
            more = ", ..." if len(bad) > 3 else ""
            raise UserError(f"{len(bad)} of the {len(picked)} rows checked cannot be read: {', '.join(bad[:3])}{more}"
                            ": remove or replace them, or write the dataset again without them")

    def colour(self, channels: int) -> list:
        return []  # Rows converts each image's mode itself

    def read_captions(self) -> None:
        if self.caption_column not in self.table.features:
            raise UserError(f"--data.captions true: {self.path} has no column {self.caption_column!r} (it has "
                            f"{', '.join(self.table.column_names)}): name the caption column with "
                            "--data.source.caption_column")
        self.captions = [text or "" for text in self.table[self.caption_column]]

    def caption(self, index: int, label: int) -> str:
        return self.captions[index]

    def identity(self) -> dict:
        return {**super().identity(), "split": self.split, "image_column": self.image_column}


class Rows(Dataset):
    """A Hugging Face dataset's images (converted to `mode`) with their labels (0 without a label column)."""

    def __init__(self, table, image_column: str, label_column: str | None, mode: str, transform=None,
                 path: str = "the dataset") -> None:
        self.table, self.image_column, self.label_column = table, image_column, label_column
        self.mode, self.transform, self.path = mode, transform, path

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int):
        try:
            row = self.table[i]
            image = to_8_bits(row[self.image_column]).convert(self.mode)
        except Exception as err:  # a damaged image: PIL's and datasets' errors take many forms
            what, why = f"row {i} of {self.path}", reason(err)
            raise Unreadable(f"{what} cannot be read ({why}): fix or remove it, or write the dataset again without it",
                             what, why) from None
        label = int(row[self.label_column]) if self.label_column else 0
        return (self.transform(image) if self.transform else image), label
