"""What DDP's "Grad strides do not match bucket view strides" warning cost: a DDP training step (one process) of a
config's network, with the attention block as it was before the fix (its 1x1 projection fed the transposed,
channels-last attention output, so the projection's weight gradient came back in channels-last strides) and as it is.
For each: the parameters whose gradient strides differ from their own (DDP warns once of those), and the step's median
time; and, for comparison, the step with no gradient copied at all (DDP's gradient_as_bucket_view: the gradients are
views of its buckets, where by default, Lightning's too, each is copied into its bucket after the backward pass).

    python benchmarks/ddp_strides.py --config configs/cifar10.yaml --device cuda
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusion_lit.core.precision import autocast  # noqa: E402
from diffusion_lit.nets.unet import AttnBlock  # noqa: E402


def before_the_fix(self, x):
    """AttnBlock.forward as it was: the projection's input is the attention output transposed (channels-last)."""
    b, c, h, w = x.shape
    q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
    out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def measure(cfg: dict, device: torch.device, precision: str, batch_size: int | None, repeats: int,
            bucket_view: bool = False) -> dict:
    import bench

    torch.manual_seed(0)
    module, size = bench.build(cfg, "ours")
    ids = [device.index or 0] if device.type == "cuda" else None
    net = DistributedDataParallel(module.net.to(device), device_ids=ids, gradient_as_bucket_view=bucket_view)
    hp = module.hparams
    x = torch.randn(batch_size or size, hp.channels, hp.image_size, hp.image_size, device=device)
    t = torch.randint(0, 1000, (len(x),), device=device)
    times = []
    for _ in range(3 + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(device, precision):
            loss = net(x, t).float().square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    mismatched = [name for name, p in net.module.named_parameters() if p.grad.stride() != p.stride()]
    return {"step_ms": 1000 * statistics.median(times[3:]), "batch_size": len(x), "mismatched_grads": mismatched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, help="default: the config's")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = yaml.safe_load(Path(args.config).read_text())
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1), rank=0,
                            world_size=1)
    fixed, rows = AttnBlock.forward, []
    try:
        for precision in args.precisions:
            for variant, forward, bucket_view in (("before the fix", before_the_fix, False),
                                                  ("as it is", fixed, False), ("+ bucket views", fixed, True)):
                AttnBlock.forward = forward
                rows.append({"precision": precision, "attention": variant,
                             **measure(cfg, device, precision, args.batch_size, args.repeats, bucket_view)})
    finally:
        AttnBlock.forward = fixed
        dist.destroy_process_group()
    for row in rows:
        print(f"{row['precision']:<11} {row['attention']:<15} DDP step (forward + backward + all-reduce, batch "
              f"{row['batch_size']}) {row['step_ms']:8.2f} ms; gradients in other strides than their weight's: "
              f"{len(row['mismatched_grads'])} ({', '.join(row['mismatched_grads'][:3])}"
              f"{', ...' if len(row['mismatched_grads']) > 3 else ''})")
    print(json.dumps({"config": args.config, "device": str(device), "rows": rows}))


if __name__ == "__main__":
    main()
