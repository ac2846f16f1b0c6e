"""Training and sampling speed, and peak memory, of a config's network, side by side with diffusers' UNet2DModel
built to the same plan (within 10% of our parameter count), on the same batch, dtype and device.

    pip install -e ".[bench]" -c constraints.txt
    python benchmarks/bench.py --quick                 # under a minute on 2 CPU cores
    python benchmarks/bench.py                         # configs/mnist.yaml and configs/cifar10.yaml
    python benchmarks/bench.py --configs configs/mnist_cpu.yaml --precision bf16-mixed --channels_last

Training is one optimizer step as `fit` takes it (draw t and noise, the loss, backward, Adam, the EMA update;
gradient clipping left out); sampling times a few denoising steps of DDIM and of DDPM and extrapolates to 50 DDIM
steps and T DDPM steps (each step is one network call, so the cost per step does not depend on the count). Every
number is the median of --repeats timed runs after --warmup untimed ones. Class-conditional configs are timed
without their class embedding (a negligible share of the work). Each (config, network) pair runs in its
own process, so the peak memory (RSS on the CPU, the most allocated on a GPU) is its own. Prints a table, then one
JSON line.
"""

import argparse
import inspect
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from jsonargparse import ArgumentParser
from torch import nn

from diffusion_lit.data import from_config
from diffusion_lit.module import DiffusionModule
from diffusion_lit.sampling import ddim_sample, ddpm_sample
from diffusion_lit.process import VP
from diffusion_lit.speed import Accelerate, autocast
from diffusion_lit.unet import UNet

NETWORKS = ("ours", "diffusers")


class DiffusersEps(nn.Module):
    """diffusers' UNet2DModel behind our denoiser contract, eps = net(x_t, t, y)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_t, t, y=None):
        return self.unet(x_t, t).sample


def diffusers_twin(unet_args: dict, in_channels: int, image_size: int) -> nn.Module:
    """UNet2DModel with our UNet's plan: the same levels, widths, blocks per level, attention sizes (single-head),
    norm groups, dropout and time-embedding width."""
    from diffusers import UNet2DModel  # the `bench` extra

    args = {name: p.default for name, p in inspect.signature(UNet).parameters.items() if name not in ("in_channels", "image_size")}
    args |= unet_args
    resolutions = [image_size // 2**i for i in range(len(args["channel_mult"]))]
    attention = [res in args["attention_resolutions"] for res in resolutions]
    unet = UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(args["base_channels"] * m for m in args["channel_mult"]),
        layers_per_block=args["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=None,  # one head per attention block, as ours
        norm_num_groups=args["norm_groups"],
        dropout=args["dropout"],
    )
    return DiffusersEps(unet)


def build(cfg: dict, network: str) -> tuple[DiffusionModule, int]:
    """A config's DiffusionModule, unconditional, with our network or the diffusers one; and the config's batch
    size. (The fast paths, channels_last and compile, are `Accelerate`'s: `measure` applies them.)"""
    data = from_config(cfg.get("data", {}))
    model_cfg = cfg.get("model", {}) | {"image_size": data.image_size, "channels": data.channels, "conditioning": None}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DiffusionModule, "model")
    module = parser.instantiate_classes(parser.parse_object({"model": model_cfg})).model
    if network == "diffusers":
        net_cfg = model_cfg.get("net", {})
        if not str(net_cfg.get("class_path", "UNet")).endswith("UNet"):
            raise SystemExit("diffusers' twin is built for UNet configs only")
        unet_args = net_cfg.get("init_args", {})
        module = DiffusionModule(**{**module.hparams, "net": lambda c, s, k: diffusers_twin(unet_args, c, s)})
    return module, data.hparams.batch_size


def timed(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median seconds of `repeats` calls of fn after `warmup` more, and the seconds of the first call (with
    torch.compile: the compilation)."""
    times = []
    for _ in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:]), times[0]


def peak_memory(device: torch.device) -> float:
    """MiB: the process's peak RSS on the CPU, the most allocated since the last reset on a GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def measure(args, cfg: dict) -> dict:
    """One (config, network) pair in this process."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    module, batch_size = build(cfg, args.network)
    batch_size = args.batch_size or batch_size
    module.to(device)
    # What `fit` does with the Accelerate callback (it reads the trainer's device for compile).
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=device))
    Accelerate(channels_last=args.channels_last, compile=args.compile).setup(trainer, module, "fit")
    optimizer = module.configure_optimizers()["optimizer"]
    hp = module.hparams
    x0 = torch.rand(batch_size, hp.channels, hp.image_size, hp.image_size, device=device) * 2 - 1

    def train_step(guide: bool = True):  # with the config's guide (model.guide), as fit trains it, or without
        guide = guide and module.guide is not None
        with autocast(device, args.precision):
            loss = module.objective.loss(module.net, module.process, x0)
            if guide:
                loss = loss + module.objective.loss(module.guide.net, module.process, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        module.ema.update_parameters(module.net)
        if guide:
            module.guide.ema.update_parameters(module.guide.net)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_s, first_train_s = timed(train_step, device, args.warmup, args.repeats)
    train_memory = peak_memory(device)
    guide = {}
    if module.guide is not None:  # what the guide trained beside the model costs: its share of the step
        alone_s, _ = timed(lambda: train_step(guide=False), device, args.warmup, args.repeats)
        guide = {"guide_params": sum(p.numel() for p in module.guide.net.parameters()),
                 "guide_share_of_step": 1 - alone_s / train_s}

    k = args.sample_steps
    x_T = torch.randn_like(x0)
    # each DDPM step costs the same whatever T is (and whatever the process: a flow model's is timed on VP's)
    few_ddpm_steps = VP(getattr(module.process, "kind", "linear"), k).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with module.sampling(args.precision) as model:
        ddim_s, first_ddim_s = timed(lambda: ddim_sample(model, module.process, x_T, steps=k), device, args.warmup,
                                     args.repeats)
        ddpm_s, _ = timed(lambda: ddpm_sample(model, few_ddpm_steps, x_T), device, args.warmup, args.repeats)
    return {
        "config": args.config,
        "network": args.network,
        "params": sum(p.numel() for p in module.net.parameters()),
        "batch_size": batch_size,
        "train_img_s": batch_size / train_s,
        "ddim50_img_s": batch_size / (50 * ddim_s / k),
        "ddpm_img_s": batch_size / (module.process.timesteps * ddpm_s / k),
        "ddpm_steps": module.process.timesteps,
        "peak_train_mib": train_memory,
        "peak_sample_mib": peak_memory(device),
        "first_train_step_s": first_train_s,  # with --compile: the compilation
        "first_ddim_run_s": first_ddim_s,
        **guide,
    }


def table(rows: list[dict], device: str) -> str:
    memory = "peak RSS" if device == "cpu" else "peak alloc"
    header = (f"{'config':<22}{'network':<11}{'params':>8}{'batch':>7}{'train img/s':>13}{'DDIM-50 img/s':>15}"
              f"{'DDPM img/s':>12}{memory + ' MiB':>16}")
    lines = [header]
    for r in rows:
        lines.append(
            f"{Path(r['config']).name:<22}{r['network']:<11}{r['params'] / 1e6:>7.2f}M{r['batch_size']:>7}"
            f"{r['train_img_s']:>13.1f}{r['ddim50_img_s']:>15.2f}{r['ddpm_img_s']:>12.3f}"
            f"{max(r['peak_train_mib'], r['peak_sample_mib']):>16.0f}"
        )
    for ours, theirs in zip(rows[::2], rows[1::2]):
        lines.append(
            f"{Path(ours['config']).name}: ours/diffusers speed: training {ours['train_img_s'] / theirs['train_img_s']:.2f}, "
            f"sampling {ours['ddim50_img_s'] / theirs['ddim50_img_s']:.2f}; parameters {ours['params'] / theirs['params']:.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/mnist.yaml", "configs/cifar10.yaml"])
    parser.add_argument("--batch_size", type=int, help="default: each config's data.batch_size (--quick: 8)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both networks (the compilation shows in first_*_s, not in the medians)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (more with --compile)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample_steps", type=int, default=10, help="denoising steps timed per sampling run")
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 warm-up, 2 repeats, 1 denoising step")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # set in the child processes
    parser.add_argument("--network", choices=NETWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch_size = args.batch_size or 8
        args.warmup, args.repeats, args.sample_steps = 1, 2, 1
    if args.network:  # a child: one measurement, one JSON line
        print(json.dumps(measure(args, yaml.safe_load(Path(args.config).read_text()))))
        return

    rows = []
    for config in args.configs:
        for network in NETWORKS:
            child = [sys.executable, __file__, "--config", config, "--network", network, "--device", args.device,
                     "--precision", args.precision, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                     "--sample_steps", str(args.sample_steps)]
            child += ["--batch_size", str(args.batch_size)] if args.batch_size else []
            child += ["--channels_last"] * args.channels_last + ["--compile"] * args.compile
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{config} / {network} failed:\n{done.stderr.strip()[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"measured {config} / {network}", file=sys.stderr)
    settings = {"device": args.device, "precision": args.precision, "channels_last": args.channels_last,
                "compile": args.compile, "threads": torch.get_num_threads()}
    print(", ".join(f"{k}={v}" for k, v in settings.items()) + f"; median of {args.repeats} after {args.warmup} warm-up")
    print(table(rows, args.device))
    for row in rows:
        if "guide_share_of_step" in row:
            print(f"{row['config']} / {row['network']}: its guide ({row['guide_params']:,} parameters) takes "
                  f"{100 * row['guide_share_of_step']:.0f}% of a training step")
    print(json.dumps({**settings, "results": rows}))


if __name__ == "__main__":
    main()
