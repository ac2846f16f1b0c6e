"""Training and sampling speed, and peak memory, of a config's network, side by side with diffusers' UNet2DModel
built to the same plan (within 10% of our parameter count), on the same batch, dtype and device.

    pip install -e ".[bench]" -c constraints.txt
    python benchmarks/bench.py --quick                 # under a minute on 2 CPU cores
    python benchmarks/bench.py                         # configs/mnist.yaml and configs/cifar10.yaml
    python benchmarks/bench.py --configs configs/mnist_cpu.yaml --precision bf16-mixed --channels_last
    python benchmarks/bench.py --device cuda --settings ladder   # float32, bf16-mixed, + channels_last, + compile

Training is one optimizer step as `fit` takes it (draw t and noise, the loss, backward, Adam, the EMA update;
gradient clipping left out); sampling times a few denoising steps of DDIM and of DDPM and extrapolates to 50 DDIM
steps and T DDPM steps (each step is one network call, so the cost per step does not depend on the count). Every
number is the median of --repeats timed runs after --warmup untimed ones. Class-conditional configs are timed
without their class embedding (a negligible share of the work). The training step's FLOPs are counted once per
network by torch.utils.flop_counter (the matrix products, convolutions and attention of the forward and backward
pass, 2 per multiply-add; on a CPU and a GPU alike), and the FLOP/s a setting reaches are given as a share of
--peak_tflops (990: an H200's dense bf16 peak). Each (config, network, setting) runs in its own process on a CPU, so
the peak RSS is its own; on a GPU each (config, network) runs its settings one after the other in one process (the
most allocated is reset between them), sparing the interpreter's start. Prints a table, then one JSON line.
"""

import argparse
import gc
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
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion_lit.data.datamodule import from_config
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.sampling.samplers import ddim_sample, ddpm_sample
from diffusion_lit.model.process import VP
from diffusion_lit.core.precision import autocast
from diffusion_lit.training.speed import Accelerate
from diffusion_lit.nets.unet import UNet

NETWORKS = ("ours", "diffusers")
# The settings of `--settings ladder`, each adding one switch to the one before.
LADDER = ("32-true", "bf16-mixed", "bf16-mixed+channels_last", "bf16-mixed+channels_last+compile")
H200_DENSE_BF16_TFLOPS = 990.0  # the datasheet's dense (not sparse) bf16 tensor-core peak of an H200 SXM


def parse_setting(setting: str) -> dict:
    """`bf16-mixed+channels_last+compile` -> {precision: bf16-mixed, channels_last: True, compile: True}."""
    precision, *switches = setting.split("+")
    if precision not in ("32-true", "bf16-mixed") or not set(switches) <= {"channels_last", "compile"}:
        raise SystemExit(f"a setting is a precision (32-true, bf16-mixed) and optional +channels_last, +compile; "
                         f"got {setting!r}")
    return {"precision": precision, "channels_last": "channels_last" in switches, "compile": "compile" in switches}


def setting_name(args) -> str:
    return "+".join([args.precision] + ["channels_last"] * args.channels_last + ["compile"] * args.compile)


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


def train_flops(module: DiffusionModule, x0: torch.Tensor) -> int:
    """FLOPs of one training step's forward and backward pass (the model's, and its guide's where it has one), as
    torch.utils.flop_counter counts them: matrix products, convolutions and attention, 2 per multiply-add. Attention
    runs as its plain matrix products here, which the counter sees on every device (it has no rule for the fused CPU
    kernel that some inputs get)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss = module.objective.loss(module.net, module.process, x0)
        if module.guide is not None:
            loss = loss + module.objective.loss(module.guide.net, module.process, x0)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(args, cfg: dict) -> dict:
    """One (config, network, setting) in this process."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    module, batch_size = build(cfg, args.network)
    batch_size = args.batch_size or batch_size
    module.to(device)
    hp = module.hparams
    x0 = torch.rand(batch_size, hp.channels, hp.image_size, hp.image_size, device=device) * 2 - 1
    flops = train_flops(module, x0)  # before compile: the counter sees the eager operations
    # What `fit` does with the Accelerate callback (it reads the trainer's device for compile).
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=device))
    Accelerate(channels_last=args.channels_last, compile=args.compile).setup(trainer, module, "fit")
    optimizer = module.configure_optimizers()["optimizer"]

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

    warmup = max(args.warmup, 3) if args.compile else args.warmup  # compile's guards can recompile once more
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_s, first_train_s = timed(train_step, device, warmup, args.repeats)
    train_memory = peak_memory(device)
    guide = {}
    if module.guide is not None:  # what the guide trained beside the model costs: its share of the step
        alone_s, _ = timed(lambda: train_step(guide=False), device, warmup, args.repeats)
        guide = {"guide_params": sum(p.numel() for p in module.guide.net.parameters()),
                 "guide_share_of_step": 1 - alone_s / train_s}

    k = args.sample_steps
    x_T = torch.randn_like(x0)
    # each DDPM step costs the same whatever T is (and whatever the process: a flow model's is timed on VP's)
    few_ddpm_steps = VP(getattr(module.process, "kind", "linear"), k).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with module.sampling(args.precision) as model:
        ddim_s, first_ddim_s = timed(lambda: ddim_sample(model, module.process, x_T, steps=k), device, warmup,
                                     args.repeats)
        ddpm_s, _ = timed(lambda: ddpm_sample(model, few_ddpm_steps, x_T), device, warmup, args.repeats)
    peak_tflops = getattr(args, "peak_tflops", None) or H200_DENSE_BF16_TFLOPS
    return {
        "config": args.config,
        "network": args.network,
        "setting": setting_name(args),
        "params": sum(p.numel() for p in module.net.parameters()),
        "batch_size": batch_size,
        "train_img_s": batch_size / train_s,
        "train_gflop_per_img": flops / batch_size / 1e9,
        "train_tflop_s": flops / train_s / 1e12,
        "peak_share": flops / train_s / 1e12 / peak_tflops,  # of --peak_tflops
        "peak_tflops": peak_tflops,
        "ddim50_img_s": batch_size / (50 * ddim_s / k),
        "ddpm_img_s": batch_size / (module.process.timesteps * ddpm_s / k),
        "ddpm_steps": module.process.timesteps,
        "peak_train_mib": train_memory,
        "peak_sample_mib": peak_memory(device),
        "first_train_step_s": first_train_s,  # with --compile: the compilation
        "first_ddim_run_s": first_ddim_s,
        **guide,
    }


def table(rows: list[dict], device: str, show_peak: bool) -> str:
    memory = "peak RSS" if device == "cpu" else "peak alloc"
    peak = f"% of {rows[0]['peak_tflops']:.0f}" if rows and show_peak else ""
    header = (f"{'config':<18}{'network':<11}{'setting':<34}{'params':>8}{'batch':>7}{'train img/s':>13}"
              f"{'DDIM-50 img/s':>15}{'DDPM img/s':>12}{memory + ' MiB':>16}{'TFLOP/s':>9}{peak:>10}")
    lines = [header]
    for r in rows:
        lines.append(
            f"{Path(r['config']).name:<18}{r['network']:<11}{r['setting']:<34}{r['params'] / 1e6:>7.2f}M"
            f"{r['batch_size']:>7}{r['train_img_s']:>13.1f}{r['ddim50_img_s']:>15.2f}{r['ddpm_img_s']:>12.3f}"
            f"{max(r['peak_train_mib'], r['peak_sample_mib']):>16.0f}{r['train_tflop_s']:>9.2f}"
            + (f"{100 * r['peak_share']:>9.1f}%" if show_peak else "")
        )
    found = {(r["config"], r["network"], r["setting"]): r for r in rows}
    for (config, network, setting), ours in found.items():
        theirs = found.get((config, "diffusers", setting))
        if network == "ours" and theirs:
            lines.append(
                f"{Path(config).name}, {setting}: ours/diffusers speed: training "
                f"{ours['train_img_s'] / theirs['train_img_s']:.2f}, sampling "
                f"{ours['ddim50_img_s'] / theirs['ddim50_img_s']:.2f}; parameters "
                f"{ours['params'] / theirs['params']:.3f}"
            )
    for config in dict.fromkeys(r["config"] for r in rows):
        best = {network: max((r for r in rows if r["config"] == config and r["network"] == network),
                             key=lambda r: r["train_img_s"], default=None) for network in NETWORKS}
        if all(best.values()):
            ours, theirs = best["ours"], best["diffusers"]
            lines.append(
                f"{Path(config).name}, each network at its best: training ours {ours['train_img_s']:.1f} img/s "
                f"({ours['setting']}), diffusers {theirs['train_img_s']:.1f} ({theirs['setting']}): "
                f"{ours['train_img_s'] / theirs['train_img_s']:.2f}x; {ours['train_gflop_per_img']:.2f} GFLOP per "
                f"image per training step"
            )
    return "\n".join(lines)


def run_child(args, config: str, network: str, settings: list[str]) -> list[dict]:
    """Measures (config, network) at each setting in a child process: the settings it measured before it failed or
    ran out of time."""
    child = [sys.executable, __file__, "--config", config, "--network", network, "--device", args.device,
             "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--sample_steps", str(args.sample_steps),
             "--peak_tflops", str(args.peak_tflops), "--settings", *settings]
    child += ["--batch_size", str(args.batch_size)] if args.batch_size else []
    try:
        done = subprocess.run(child, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired as late:
        out = late.stdout.decode() if isinstance(late.stdout, bytes) else late.stdout or ""
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        print(f"{config} / {network}: {len(rows)} of {len(settings)} settings measured within --child_timeout "
              f"{args.child_timeout:.0f} s", file=sys.stderr)
        return rows
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode:
        print(f"{config} / {network} failed after {len(rows)} of {len(settings)} settings:\n"
              f"{done.stderr.strip()[-2000:]}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/mnist.yaml", "configs/cifar10.yaml"])
    parser.add_argument("--batch_size", type=int, help="default: each config's data.batch_size (--quick: 8)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both networks (the compilation shows in first_*_s, not in the medians)")
    parser.add_argument("--settings", nargs="+", metavar="SETTING",
                        help="several settings, each a precision with optional +channels_last and +compile "
                             "(bf16-mixed+channels_last), or `ladder`: " + ", ".join(LADDER) + " (default: the one "
                             "that --precision, --channels_last and --compile give)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak_tflops", "--peak-tflops", type=float,
                        help=f"the device's peak TFLOP/s, for the share the training step reaches (default on a GPU: "
                             f"{H200_DENSE_BF16_TFLOPS:.0f}, an H200's dense bf16 peak)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (more with --compile)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample_steps", type=int, default=10, help="denoising steps timed per sampling run")
    parser.add_argument("--child_timeout", type=float, help="seconds a (config, network) may take before it is "
                                                            "given up, the others still measured")
    parser.add_argument("--rows_out", help="also append each result to this file as one JSON line, as it comes")
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 warm-up, 2 repeats, 1 denoising step")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # set in the child processes
    parser.add_argument("--network", choices=NETWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch_size = args.batch_size or 8
        args.warmup, args.repeats, args.sample_steps = 1, 2, 1
    show_peak = args.peak_tflops is not None or args.device != "cpu"
    args.peak_tflops = args.peak_tflops or H200_DENSE_BF16_TFLOPS
    settings = list(LADDER) if args.settings == ["ladder"] else args.settings or [setting_name(args)]
    for setting in settings:
        parse_setting(setting)  # refused here, before any child starts
    if args.network:  # a child: one JSON line per setting, each measured in a fresh model
        cfg = yaml.safe_load(Path(args.config).read_text())
        for setting in settings:
            print(json.dumps(measure(argparse.Namespace(**{**vars(args), **parse_setting(setting)}), cfg)), flush=True)
            gc.collect()
            if args.device.startswith("cuda"):
                torch._dynamo.reset()  # compiled graphs hold their own memory
                torch.cuda.empty_cache()
        return

    rows, failed = [], False
    groups = [[setting] for setting in settings] if args.device == "cpu" else [settings]  # RSS is per process
    for config in args.configs:
        for network in NETWORKS:
            for group in groups:
                got = run_child(args, config, network, group)
                failed |= len(got) < len(group)
                rows += got
                if args.rows_out:
                    with open(args.rows_out, "a") as f:
                        f.writelines(json.dumps(row) + "\n" for row in got)
                print(f"measured {config} / {network} / {', '.join(group)}", file=sys.stderr)
    summary = {"device": args.device, "threads": torch.get_num_threads(), "warmup": args.warmup,
               "repeats": args.repeats}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        summary["gpu"] = torch.cuda.get_device_name(args.device)
    print(", ".join(f"{k}={v}" for k, v in summary.items()) + f"; median of {args.repeats} after {args.warmup} "
          "warm-up; float32 as PyTorch runs it by default (on a GPU: convolutions in TF32, matrix products not)")
    print(table(rows, args.device, show_peak))
    for row in rows:
        if "guide_share_of_step" in row:
            print(f"{row['config']} / {row['network']} / {row['setting']}: its guide ({row['guide_params']:,} "
                  f"parameters) takes {100 * row['guide_share_of_step']:.0f}% of a training step")
    print(json.dumps({**summary, "results": rows}))
    if failed:
        sys.exit("some measurements failed or ran out of time: see above")


if __name__ == "__main__":
    main()
