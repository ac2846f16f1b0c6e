"""What the power-function EMA costs (docs/ema.md): the training step with it against the same step with the
constant-decay EMA (interleaved rounds, the same batch), and the time to rebuild a width from snapshots of a
config's network (random weights, the sizes and count that matter).

    python benchmarks/ema_cost.py --config configs/mnist_cpu.yaml --batch_size 64 --steps 30 --rounds 4
    python benchmarks/ema_cost.py --config configs/cifar10.yaml --rebuild_only --snapshots 20

Prints JSON lines: ms per step of each EMA and their ratio; the snapshots' size on disk and the seconds to rebuild.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_lit.model.ema import PowerEMA  # noqa: E402
from diffusion_lit.model.module import DiffusionModule  # noqa: E402
from diffusion_lit.model.snapshots import Rebuilt, Snapshots  # noqa: E402
from diffusion_lit.nets.unet import UNet  # noqa: E402


def build(config: str, ema_decay, image_size: int, channels: int) -> DiffusionModule:
    settings = yaml.safe_load(Path(config).read_text())["model"]["net"]["init_args"]
    return DiffusionModule(net=lambda c, s, k: UNet(c, s, k, **settings), image_size=image_size, channels=channels,
                           ema_decay=ema_decay)


def step_times(args) -> None:
    torch.manual_seed(0)
    x0 = torch.rand(args.batch_size, args.channels, args.image_size, args.image_size) * 2 - 1
    models = {"constant": build(args.config, 0.999, args.image_size, args.channels),
              "power": build(args.config, PowerEMA([0.05, 0.10]), args.image_size, args.channels)}
    models["power"].net.load_state_dict(models["constant"].net.state_dict())
    optimizers = {k: torch.optim.Adam(m.net.parameters(), lr=1e-4) for k, m in models.items()}

    def step(name: str) -> None:
        m, opt = models[name], optimizers[name]
        opt.zero_grad(set_to_none=True)
        m.objective.loss(m.net, m.process, x0, None).backward()
        opt.step()
        m.ema.update_parameters(m.net)

    seconds = {k: 0.0 for k in models}
    for name in models:  # warm-up
        for _ in range(3):
            step(name)
    for _ in range(args.rounds):
        for name in models:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            seconds[name] += time.perf_counter() - start
    per_step = {k: 1000 * v / (args.rounds * args.steps) for k, v in seconds.items()}
    ema_only = {}
    for name, m in models.items():
        start = time.perf_counter()
        for _ in range(50):
            m.ema.update_parameters(m.net)
        ema_only[name] = 1000 * (time.perf_counter() - start) / 50
    print(json.dumps({"config": args.config, "batch_size": args.batch_size, "ms_per_step": per_step,
                      "power_over_constant": per_step["power"] / per_step["constant"],
                      "ms_per_ema_update": ema_only}))


def rebuild_time(args) -> None:
    module = build(args.config, PowerEMA([0.05, 0.10], snapshot_every=1, keep=args.snapshots),
                   args.image_size, args.channels)
    params = sum(p.numel() for p in module.net.parameters())
    with tempfile.TemporaryDirectory() as folder:
        snapshots = Snapshots(module.hparams.ema_decay)
        snapshots.run, snapshots.folder = "bench", folder
        for i in range(1, args.snapshots + 1):
            module.ema.update_parameters(module.net)
            module.ema.n_averaged.fill_(args.steps_apart * i)  # as if steps_apart updates had passed
            snapshots.write(SimpleNamespace(global_step=args.steps_apart * i, is_global_zero=True), module)
        size = sum(p.stat().st_size for p in Path(folder).glob("*.pt"))
        last = args.steps_apart * args.snapshots
        checkpoint = {"ema_snapshots": {"run": "bench", "folder": folder}, "global_step": last}
        start = time.perf_counter()
        said = Rebuilt(module, checkpoint, Path(folder) / "last.ckpt").apply(0.08)
        seconds = time.perf_counter() - start
    print(json.dumps({"config": args.config, "parameters": params, "snapshots": args.snapshots,
                      "mb_per_snapshot": size / args.snapshots / 1e6, "rebuild_seconds": seconds, "said": said}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist_cpu.yaml")
    parser.add_argument("--image_size", type=int, default=None, help="default: 28 for MNIST configs, 32 otherwise")
    parser.add_argument("--channels", type=int, default=None, help="default: 1 for MNIST configs, 3 otherwise")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of each EMA")
    parser.add_argument("--snapshots", type=int, default=20)
    parser.add_argument("--steps_apart", type=int, default=40000, help="optimizer steps between snapshots")
    parser.add_argument("--rebuild_only", action="store_true")
    args = parser.parse_args()
    mnist = "mnist" in Path(args.config).name
    args.image_size = args.image_size or (28 if mnist else 32)
    args.channels = args.channels or (1 if mnist else 3)
    if not args.rebuild_only:
        step_times(args)
    rebuild_time(args)


if __name__ == "__main__":
    main()
