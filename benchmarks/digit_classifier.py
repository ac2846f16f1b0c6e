"""A small CNN digit classifier, trained on the shipped MNIST digits, to judge generated digits.

    python benchmarks/digit_classifier.py train          # writes benchmarks/digit_classifier.pt (not committed)
    python benchmarks/digit_classifier.py score --ckpt_path runs/mnist_cond/checkpoints/last.ckpt --guidance 0,1,3

`score` draws --per_class samples of every class from a conditional checkpoint at each guidance scale and prints,
per scale, the share that the classifier assigns to the requested class (and the share it does so with confidence
above 0.9), then one JSON line.
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


def score(ckpt_path: str, guidance: list[float], per_class: int, steps: int, seed: int) -> None:
    module, checkpoint = load_checkpoint(ckpt_path)
    if not module.num_classes:
        raise SystemExit(f"{ckpt_path} is an unconditional model: score needs a conditional one")
    net = classifier()
    labels = torch.arange(module.num_classes).repeat_interleave(per_class)
    results = {"ckpt_path": ckpt_path, "global_step": checkpoint["global_step"], "per_class": per_class, "steps": steps}
    for w in guidance:
        start = time.time()
        images = generate_images(module, len(labels), seed, 250, labels=labels, guidance_scale=w, steps=steps)
        with torch.no_grad():
            probs = net(images).softmax(1)
        confidence, predicted = probs.max(1)
        hit = predicted == labels
        results[f"w={w:g}"] = {
            "requested_class_share": hit.float().mean().item(),
            "confident_requested_share": (hit & (confidence > 0.9)).float().mean().item(),
            "per_class": [round(hit[labels == c].float().mean().item(), 2) for c in range(module.num_classes)],
            "seconds": round(time.time() - start, 1),
        }
        r = results[f"w={w:g}"]
        print(f"w = {w:g}: {r['requested_class_share']:.1%} classified as the requested digit "
              f"({r['confident_requested_share']:.1%} with confidence > 0.9); per class {r['per_class']}")
    print(json.dumps(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train the classifier on the shipped digits")
    t.add_argument("--data", type=Path, default=DIGITS)
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    s = commands.add_parser("score", help="classify class-conditional samples of a checkpoint")
    s.add_argument("--ckpt_path", required=True)
    s.add_argument("--guidance", default="0,1,3", help="guidance scales, comma-separated")
    s.add_argument("--per_class", type=int, default=100)
    s.add_argument("--steps", type=int, default=25, help="DDIM steps")
    s.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.command == "train":
        train(args.data, args.epochs, args.seed)
    else:
        score(args.ckpt_path, [float(w) for w in args.guidance.split(",")], args.per_class, args.steps, args.seed)
