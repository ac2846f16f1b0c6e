"""Small datasets the data tests build: a folder of images written as a Hugging Face dataset in its three layouts,
as litdata chunks, and a callback that logs which batches a run trained on."""

import hashlib
from pathlib import Path

from lightning.pytorch import Callback

from conftest import write_image_folder


def hf_layout(tmp_path: Path, layout: str, n_per_class: int = 8, captions: bool = False, written: bool = False) -> Path:
    """The images of `write_image_folder` as a save_to_disk folder or a parquet file (image, label as a ClassLabel,
    and a caption per image in `text`), or as an imagefolder (the folder itself, with a metadata.jsonl when
    `captions`). Rows in file order; the caption of a/000.png is "image 000 of a". `written`: the images are in
    tmp_path/images already."""
    import datasets

    root = tmp_path / "images" if written else write_image_folder(tmp_path / "images", n_per_class=n_per_class)
    files = sorted(root.rglob("*.png"))
    texts = [f"image {p.stem} of {p.parent.name}" for p in files]
    if layout == "imagefolder":
        if captions:
            lines = [f'{{"file_name": "{p.relative_to(root).as_posix()}", "text": "{text}"}}'
                     for p, text in zip(files, texts)]
            (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        return root
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"]),
                                  "text": datasets.Value("string")})
    table = datasets.Dataset.from_dict(
        {"image": [str(p) for p in files], "label": [p.parent.name for p in files], "text": texts}, features=features)
    if layout == "save_to_disk":
        table.save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved"
    table.to_parquet(str(tmp_path / "parquet" / "train-00000.parquet"))
    return tmp_path / "parquet"


def digest(tensor) -> str:
    return hashlib.sha1(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


class BatchLog(Callback):
    """Appends `step rank digest-of-the-batch's-images` for every training batch to `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {trainer.global_rank} {digest(batch[0].cpu())}\n")


def read_log(path: Path) -> list[tuple[int, int, str]]:
    return [(int(s), int(r), d) for s, r, d in (line.split() for line in Path(path).read_text().splitlines())]
