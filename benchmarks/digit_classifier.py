"""The digit judge (`diffusion_lit.data.digits.DigitJudge`): train it on the shipped digits, or score a checkpoint with it.

    python benchmarks/digit_classifier.py train      # writes diffusion_lit/assets/digit_judge.pt (shipped; ~1 min)
    python benchmarks/digit_classifier.py score --ckpt_path runs/mnist_cpu/checkpoints/last.ckpt --guidance 1,1.25

`train` fits the judge on 9,000 of the 10,000 shipped digits (with small random shifts, rotations and scalings) and
reports its accuracy on the 1,000 it never saw. `score` draws --num_samples samples from a checkpoint (DDIM, --steps,
--eta) and prints the share that the judge gives some digit with confidence above 0.9, with a histogram of those
digits; for a conditional model it does so per guidance scale, with the labels balanced over the classes, and also
prints the share classified as the requested digit. Then one JSON line.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from diffusion_lit.commands.sample import generate_images, parse_labels
from diffusion_lit.io.loading import load_checkpoint
from diffusion_lit.data.digits import CONFIDENT, JUDGE_WEIGHTS, DigitJudge, ShippedDigits, held_out
from diffusion_lit.data.images import save_images

def train(epochs: int, seed: int) -> None:
    torch.manual_seed(seed)  # the held-out digits are fixed (`held_out`); the seed sets the initial weights
    augment = transforms.Compose([transforms.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1)), transforms.ToTensor()])
    train_set, test_set = ShippedDigits(augment), ShippedDigits(transforms.ToTensor())
    test_indices = held_out(len(train_set))
    train_indices = sorted(set(range(len(train_set))) - set(test_indices))
    train_loader = DataLoader(Subset(train_set, train_indices), batch_size=64, shuffle=True)
    test_loader = DataLoader(Subset(test_set, test_indices), batch_size=500)
    net = DigitJudge(pretrained=False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * len(train_loader))
    start = time.time()
    for epoch in range(epochs):
        net.train()
        for x, y in train_loader:
            loss = F.cross_entropy(net.classify(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        net.eval()
        with torch.no_grad():
            correct = sum((net.classify(x).argmax(1) == y).sum().item() for x, y in test_loader)
        print(f"epoch {epoch + 1}: held-out accuracy {correct / len(test_indices):.4f} ({time.time() - start:.0f} s)")
    torch.save(net.state_dict(), JUDGE_WEIGHTS)
    print(f"wrote {JUDGE_WEIGHTS} ({JUDGE_WEIGHTS.stat().st_size / 1024:.0f} KiB)")


def histogram(counts: list[int]) -> str:
    """One text bar per class: `3 |#######      112`."""
    top = max(counts) or 1
    return "\n".join(f"  {c} |{'#' * round(40 * n / top):<40} {n}" for c, n in enumerate(counts))


def score(ckpt_path: str, guidance: list[float], num_samples: int, steps: int, eta: float, seed: int, precision: str,
          grid: str | None) -> None:
    module, checkpoint = load_checkpoint(ckpt_path)
    judge = DigitJudge()
    classes = module.conditioning.num_classes
    labels = parse_labels("all", num_samples, classes) if classes else None  # balanced over the classes
    results = {"ckpt_path": ckpt_path, "global_step": checkpoint["global_step"], "num_samples": num_samples,
               "steps": steps, "eta": eta, "seed": seed, "precision": precision}
    for w in guidance if classes else [1.0]:
        start = time.time()
        images = generate_images(module, num_samples, seed, 250, precision=precision, labels=labels, guidance_scale=w,
                                 steps=steps, eta=eta)
        with torch.no_grad():
            confidence, predicted = judge.classify(images.float() / 255).softmax(1).max(1)
        confident = confidence > CONFIDENT
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
    t = commands.add_parser("train", help="train the judge on the shipped digits (writes the package's weights)")
    t.add_argument("--epochs", type=int, default=15)
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
        train(args.epochs, args.seed)
    else:
        score(args.ckpt_path, [float(w) for w in args.guidance.split(",")], args.num_samples, args.steps, args.eta,
              args.seed, args.precision, args.grid)
