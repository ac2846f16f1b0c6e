"""A small CNN digit classifier, trained on the shipped MNIST digits, to judge generated digits.

    python benchmarks/digit_classifier.py train          # writes benchmarks/digit_classifier.pt (not committed)
    python benchmarks/digit_classifier.py score --ckpt_path runs/mnist_cpu/checkpoints/last.ckpt --guidance 1.25 --eta 1
    python benchmarks/digit_classifier.py score --ckpt_path runs/mnist_cond/checkpoints/last.ckpt --guidance 1,1.25

`score` draws --num_samples samples from a checkpoint with DDIM (--steps, --eta) and prints the share that the
classifier assigns to some digit with confidence above 0.9, with a histogram of those digits. For a conditional
model it does so per guidance scale, with the labels balanced over the classes, and also prints the share
classified as the requested digit. Then one JSON line.
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

from diffusion_lit.commands import generate_images, load_checkpoint, parse_labels
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


def score(ckpt_path: str, guidance: list[float], num_samples: int, steps: int, eta: float, seed: int, precision: str,
          grid: str | None) -> None:
    module, checkpoint = load_checkpoint(ckpt_path)
    net = classifier()
    classes = module.num_classes
    labels = parse_labels("all", num_samples, classes) if classes else None  # balanced over the classes
    results = {"ckpt_path": ckpt_path, "global_step": checkpoint["global_step"], "num_samples": num_samples,
               "steps": steps, "eta": eta, "seed": seed, "precision": precision}
    for w in guidance if classes else [1.0]:
        start = time.time()
        images = generate_images(module, num_samples, seed, 250, precision=precision, labels=labels, guidance_scale=w,
                                 steps=steps, eta=eta)
        with torch.no_grad():
            confidence, predicted = net(images).softmax(1).max(1)
        confident = confidence > 0.9
        r = {"confident_share": confident.float().mean().item(),
             "confident_per_class": torch.bincount(predicted[confident], minlength=10).tolist()}
        head = f"w = {w:g}: " if classes else ""
        print(f"{head}{r['confident_share']:.1%} of {num_samples} samples classified with confidence > 0.9; "
              "those per digit:")
        print(histogram(r["confident_per_class"]))
        if classes:
            hit = predicted == labels
            r |= {"requested_share": hit.float().mean().item(),
                  "confident_requested_share": (hit & confident).float().mean().item(),
                  "requested_share_per_class": [round(hit[labels == c].float().mean().item(), 3) for c in range(classes)]}
            print(f"{head}{r['requested_share']:.1%} classified as the requested digit "
                  f"({r['confident_requested_share']:.1%} with confidence > 0.9); per digit {r['requested_share_per_class']}")
        results[f"w={w:g}" if classes else "unconditional"] = r | {"seconds": round(time.time() - start, 1)}
        if grid:
            print(f"wrote the first 64 samples to {save_images(images[:64], grid)}")
            grid = None  # of the first guidance scale only
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
    s.add_argument("--guidance", default="1", help="conditional models: guidance scales, comma-separated")
    s.add_argument("--num_samples", type=int, default=1000, help="samples per guidance scale (balanced over classes)")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--precision", default="bf16-mixed", help="sampling precision: 32-true or bf16-mixed")
    s.add_argument("--grid", help="save the first 64 samples (of the first guidance scale) as this PNG grid")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.command == "train":
        train(args.data, args.epochs, args.seed)
    else:
        score(args.ckpt_path, [float(w) for w in args.guidance.split(",")], args.num_samples, args.steps, args.eta,
              args.seed, args.precision, args.grid)
