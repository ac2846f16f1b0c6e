"""A small CNN digit classifier, trained on the shipped MNIST digits, to judge generated digits.

    python benchmarks/digit_classifier.py train          # writes benchmarks/digit_classifier.pt (not committed)
    python benchmarks/digit_classifier.py score --ckpt_path runs/mnist_cpu/checkpoints/last.ckpt
    python benchmarks/digit_classifier.py score --ckpt_path runs/mnist_cond/checkpoints/last.ckpt --guidance 0,1,3

`score` samples a checkpoint with DDIM (--steps) and classifies the samples, then prints one JSON line.
An unconditional model: the share of --num_samples samples classified with confidence above 0.9, and a histogram of
the digits they were classified as. A conditional one: per guidance scale, the share of --per_class samples of every
class that the classifier assigns to the requested class (and the share it does so with confidence above 0.9).
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from diffusion_lit.commands import generate_images, load_checkpoint
from diffusion_lit.data import ImageFolder
from diffusion_lit.images import save_images

WEIGHTS = Path(__file__).with_name("digit_classifier.pt")
DIGITS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"


class DigitNet(nn.Module):
    """uint8 or [0, 1] float digits [N, 1, 28, 28] -> logits [N, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return self.head(self.features(x))


def train(data: Path, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    augment = transforms.Compose([transforms.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1)), transforms.ToTensor()])
    train_set, test_set = ImageFolder(data, 1, augment), ImageFolder(data, 1, transforms.ToTensor())
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = order[:1000]
    train_loader = DataLoader(Subset(train_set, order[1000:]), batch_size=128, shuffle=True)
    test_loader = DataLoader(Subset(test_set, held_out), batch_size=500)
    net = DigitNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    start = time.time()
    for epoch in range(epochs):
        net.train()
        for x, y in train_loader:
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            correct = sum((net(x).argmax(1) == y).sum().item() for x, y in test_loader)
        print(f"epoch {epoch + 1}: held-out accuracy {correct / len(held_out):.4f} ({time.time() - start:.0f} s)")
    torch.save(net.state_dict(), WEIGHTS)
    print(f"wrote {WEIGHTS}")


def classifier() -> DigitNet:
    if not WEIGHTS.is_file():
        raise SystemExit(f"no {WEIGHTS}: run `python benchmarks/digit_classifier.py train` first")
    net = DigitNet()
    net.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return net.eval()


def histogram(counts: list[int]) -> str:
    """One text bar per class: `3 |#######      112`."""
    top = max(counts) or 1
    return "\n".join(f"  {c} |{'#' * round(40 * n / top):<40} {n}" for c, n in enumerate(counts))


def score_conditional(module, net, guidance: list[float], per_class: int, steps: int, seed: int, precision: str) -> dict:
    """Per guidance scale: the share of samples classified as the class they were drawn for."""
    labels = torch.arange(module.num_classes).repeat_interleave(per_class)
    results = {"per_class": per_class}
    for w in guidance:
        start = time.time()
        images = generate_images(module, len(labels), seed, 250, labels=labels, guidance_scale=w, steps=steps,
                                 precision=precision)
        with torch.no_grad():
            confidence, predicted = net(images).softmax(1).max(1)
        hit = predicted == labels
        r = results[f"w={w:g}"] = {
            "requested_class_share": hit.float().mean().item(),
            "confident_requested_share": (hit & (confidence > 0.9)).float().mean().item(),
            "per_class": [round(hit[labels == c].float().mean().item(), 2) for c in range(module.num_classes)],
            "seconds": round(time.time() - start, 1),
        }
        print(f"w = {w:g}: {r['requested_class_share']:.1%} classified as the requested digit "
              f"({r['confident_requested_share']:.1%} with confidence > 0.9); per class {r['per_class']}")
    return results


def score_unconditional(module, net, num_samples: int, steps: int, seed: int, precision: str, grid: str | None) -> dict:
    """The share of samples the classifier calls some digit with confidence above 0.9, and which digits they are."""
    start = time.time()
    images = generate_images(module, num_samples, seed, 250, steps=steps, precision=precision)
    with torch.no_grad():
        confidence, predicted = net(images).softmax(1).max(1)
    confident = confidence > 0.9
    counts = torch.bincount(predicted[confident], minlength=10).tolist()
    share = confident.float().mean().item()
    print(f"{share:.1%} of {num_samples} samples classified with confidence > 0.9; confident ones per class:")
    print(histogram(counts))
    if grid:
        print(f"wrote the first 64 samples to {save_images(images[:64], grid)}")
    return {"num_samples": num_samples, "confident_share": share, "confident_per_class": counts,
            "seconds": round(time.time() - start, 1)}


def score(ckpt_path: str, guidance: list[float], per_class: int, num_samples: int, steps: int, seed: int,
          precision: str, grid: str | None) -> None:
    module, checkpoint = load_checkpoint(ckpt_path)
    net = classifier()
    results = {"ckpt_path": ckpt_path, "global_step": checkpoint["global_step"], "steps": steps, "seed": seed}
    if module.num_classes:
        results |= score_conditional(module, net, guidance, per_class, steps, seed, precision)
    else:
        results |= score_unconditional(module, net, num_samples, steps, seed, precision, grid)
    print(json.dumps(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train the classifier on the shipped digits")
    t.add_argument("--data", type=Path, default=DIGITS)
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    s = commands.add_parser("score", help="classify samples of a checkpoint")
    s.add_argument("--ckpt_path", required=True)
    s.add_argument("--guidance", default="0,1,3", help="conditional models: guidance scales, comma-separated")
    s.add_argument("--per_class", type=int, default=100, help="conditional models: samples per class and scale")
    s.add_argument("--num_samples", type=int, default=1000, help="unconditional models: samples")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--precision", default="bf16-mixed", help="sampling precision: 32-true or bf16-mixed")
    s.add_argument("--grid", help="unconditional models: save the first 64 samples as this PNG grid")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.command == "train":
        train(args.data, args.epochs, args.seed)
    else:
        score(args.ckpt_path, [float(w) for w in args.guidance.split(",")], args.per_class, args.num_samples, args.steps,
              args.seed, args.precision, args.grid)
