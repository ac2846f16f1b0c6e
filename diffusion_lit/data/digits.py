"""The digits that ship with the package, and the digit judge trained on them.

The 10,000 digits of the MNIST test split (LeCun, Cortes & Burges; CC BY-SA 3.0) travel in `assets/` in their
original IDX form, so MNIST-like training, tests and FID work with no download. The judge is a small CNN trained on
them (`benchmarks/digit_classifier.py train`); its weights travel in `assets/` too. It serves as FID's feature
network for digits (`--feature_extractor digits`: its 64-d pooled features) and as a classifier that tells how many
samples are clearly some digit, and for a conditional model, the digit asked for.
"""

import gzip
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

ASSETS = Path(__file__).parents[1] / "assets"  # diffusion_lit/assets, beside the subpackages
IMAGES, LABELS = ASSETS / "t10k-images-idx3-ubyte.gz", ASSETS / "t10k-labels-idx1-ubyte.gz"
JUDGE_WEIGHTS = ASSETS / "digit_judge.pt"
CONFIDENT = 0.9  # a sample is "clearly a digit" when the judge gives one class more than this probability


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: a magic number whose last byte is the number of dimensions, the dimensions as
    big-endian int32, then unsigned bytes) as a uint8 array."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = np.frombuffer(data, ">i4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@cache
def shipped_digits() -> tuple[Tensor, Tensor]:
    """uint8 images [10000, 1, 28, 28] and int64 labels [10000]."""
    return torch.from_numpy(read_idx(IMAGES).copy())[:, None], torch.from_numpy(read_idx(LABELS).astype(np.int64))


class ShippedDigits(Dataset):
    """The shipped digits as (PIL image, label) pairs, like torchvision's MNIST, through an optional transform."""

    def __init__(self, transform=None) -> None:
        self.images, self.labels = shipped_digits()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.images[i, 0].numpy(), "L")
        return (self.transform(image) if self.transform else image), int(self.labels[i])


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# How the captioned digits (--data.captions true) name their label; "number seven" and the like stay unseen.
PHRASINGS = ("{digit}", "{word}", "the digit {digit}", "the digit {word}", "a handwritten {word}", "a handwritten {digit}")


def digit_caption(label: int, index: int) -> str:
    """A caption for a digit, one of PHRASINGS picked by the image's index."""
    return PHRASINGS[index % len(PHRASINGS)].format(digit=label, word=WORDS[label])


def held_out(num_digits: int = 10000, count: int = 1000, seed: int = 0) -> list[int]:
    """Indices of the digits the judge never trained on (its training script uses the rest)."""
    return torch.randperm(num_digits, generator=torch.Generator().manual_seed(seed))[:count].tolist()


class DigitJudge(nn.Module):
    """[0, 1] digits [N, 1, 28, 28] -> 64-d features (`forward`); `head(features)` -> logits of the 10 digits.

    Images of another size or with three channels are averaged to gray and resized to 28x28 first.
    """

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(64, 10)
        if pretrained:
            self.load_state_dict(torch.load(JUDGE_WEIGHTS, map_location="cpu", weights_only=True))
            self.eval()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return self.features(x)

    def classify(self, x: Tensor) -> Tensor:
        """Logits [N, 10] of [0, 1] digits."""
        return self.head(self(x))


def judge_counts(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    """[samples the judge gives one digit with probability above 0.9, samples it classifies as the label asked for
    (0 without labels)], as floats, to be summed over batches and ranks."""
    confidence, predicted = logits.float().softmax(1).max(1)
    hits = (predicted == labels.to(predicted.device)).sum() if labels is not None else torch.zeros((), device=logits.device)
    return torch.stack([(confidence > CONFIDENT).sum(), hits]).float()


FRAME = 4  # pixels: the border that real digits leave black
GREY = 10  # a frame whose mean is above this (0-255) is grey: 0.4% of the shipped digits, mean 2.2


def frame_stats(images: Tensor) -> dict[str, float]:
    """The mean of uint8 digits' 4-pixel border (0-255) and the share of images whose border mean is above 10: a
    grey background that the judge, looking at the strokes, does not see."""
    x = images.float()
    inner = torch.zeros(x.shape[-2:], dtype=torch.bool, device=x.device)
    inner[FRAME:-FRAME, FRAME:-FRAME] = True
    border = x[..., ~inner].flatten(1).mean(1)
    return {"frame_mean": border.mean().item(), "grey_frame_share": (border > GREY).float().mean().item()}


def judge_shares(counts: Tensor, num_samples: int, conditional: bool) -> dict[str, float]:
    """`confident_share` and, for a conditional model, `requested_share`, from summed `judge_counts`."""
    shares = {"confident_share": counts[0].item() / num_samples}
    if conditional:
        shares["requested_share"] = counts[1].item() / num_samples
    return shares
