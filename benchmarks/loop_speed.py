"""The whole training loop against its bare step: `fit --config CONFIG` for --seconds, with the config's callbacks,
its optimizer steps per second (a callback's clock, from step --warmup_steps to the last) against the steps per
second of the bare training step that benchmarks/bench.py times (the loss, backward, Adam, the EMA update, on one
batch already on the device), back to back; and, on a GPU, every host-device synchronization a fit step makes.

    python benchmarks/loop_speed.py --config configs/cifar10.yaml --seconds 120 --out OUT \\
        -- --data.source ShippedDigits --data.image_size 32 --data.channels 3

Arguments after `--` go to `fit` as they are, and to the bare step's model and data where they name `model.` or
`data.` settings. The bare step is timed twice: back to back with one synchronization at the end (what the device can
do), and synchronized after every step (what a loop that waits for each step's result gets). The fit's run folder
(its checkpoint and events) goes to --workdir, not to --out. Writes OUT/loop.json and prints a summary.
"""

import argparse
import collections
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench, and this file as `loop_speed` for the callback

BENCHMARKS = Path(__file__).resolve().parent


class StepTimer(Callback):
    """Times the optimizer steps of a `fit` from step `warmup_steps` on and writes {steps, seconds, steps_per_s} to
    `out` when training ends; on a GPU it lists the host-device synchronizations of the `sync_debug_steps` steps
    before the timed ones (torch.cuda's sync debug mode: each one's file and line)."""

    def __init__(self, out: str, warmup_steps: int = 20, sync_debug_steps: int = 3) -> None:
        self.out, self.warmup_steps, self.sync_debug_steps = out, warmup_steps, sync_debug_steps
        self.start = self.end = None
        self.last_step, self.caught, self.recorder = -1, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.last_step:  # once per optimizer step
            return
        self.last_step, now = step, time.perf_counter()
        debug_from = self.warmup_steps - self.sync_debug_steps
        if pl_module.device.type == "cuda" and self.sync_debug_steps and step in (debug_from, self.warmup_steps):
            if step == debug_from:  # steps debug_from + 1 ... warmup_steps
                self.recorder = warnings.catch_warnings(record=True)
                self.caught = self.recorder.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            else:
                torch.cuda.set_sync_debug_mode("default")
                self.recorder.__exit__(None, None, None)
                now = time.perf_counter()
        if step == self.warmup_steps:
            self.start = (step, now)
        if self.start is not None:
            self.end = (step, now)

    def on_train_end(self, trainer, pl_module) -> None:
        timed = self.start is not None and self.end[0] > self.start[0]
        steps, seconds = (self.end[0] - self.start[0], self.end[1] - self.start[1]) if timed else (0, 0.0)
        where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in self.caught
                                    if "synchronizing" in str(w.message))
        result = {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds if timed else None,
                  "first_timed_step": self.start[0] if timed else None, "last_step": trainer.global_step,
                  "syncs_per_step": {k: v / self.sync_debug_steps for k, v in where.most_common()}}
        Path(self.out).write_text(json.dumps(result))


def overrides(words: list[str]) -> dict:
    """`--data.image_size 32 --model.net.init_args.base_channels 32` -> nested settings for the bare step's model and
    data; a bare source name (`--data.source ShippedDigits`) becomes its class_path."""
    found: dict = {}
    for key, value in zip(words[::2], words[1::2]):
        path = key.removeprefix("--").split(".")
        if path[0] not in ("data", "model"):
            continue
        value = yaml.safe_load(value)
        if path == ["data", "source"] and isinstance(value, str):
            value = {"class_path": value if "." in value else f"diffusion_lit.data.sources.{value}"}
        node = found
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return found


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        replace = not isinstance(value, dict) or key == "source"  # a new source drops the old one's init_args
        out[key] = value if replace else merged(base.get(key) or {}, value)
    return out


def bare_steps_per_s(cfg: dict, device: torch.device, precision: str, steps: int, warmup: int) -> dict:
    """The bare training step's rate: back to back (one synchronization at the end), and synchronized each step."""
    import bench
    from diffusion_lit.core.precision import autocast

    torch.manual_seed(0)
    module, batch_size = bench.build(cfg, "ours")
    module.to(device).train()
    optimizer = module.configure_optimizers()["optimizer"]
    hp = module.hparams
    x0 = torch.rand(batch_size, hp.channels, hp.image_size, hp.image_size, device=device) * 2 - 1

    def step() -> None:
        with autocast(device, precision):
            loss = module.objective.loss(module.net, module.process, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        module.ema.update_parameters(module.net)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    rates = {}
    for name, each in (("back_to_back", False), ("synchronized_each_step", True)):
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
            if each:
                sync()
        sync()
        rates[name] = steps / (time.perf_counter() - start)
    return {"batch_size": batch_size, "params": sum(p.numel() for p in module.net.parameters()), **rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10.yaml")
    parser.add_argument("--seconds", type=float, default=120.0, help="fit's max_time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", help="default: the config's trainer.precision, or 32-true")
    parser.add_argument("--warmup_steps", type=int, default=20, help="fit steps before the timed ones")
    parser.add_argument("--bare_steps", type=int, default=50, help="bare steps timed, after --warmup_steps more")
    parser.add_argument("--sync_debug_steps", type=int, default=3, help="fit steps (GPU) whose syncs are listed")
    parser.add_argument("--out", required=True, help="folder for loop.json")
    parser.add_argument("--workdir", help="folder for the fit's run (default: a temporary one)")
    args, fit_args = parser.parse_known_args()
    fit_args = [word for word in fit_args if word != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="loop_speed_"))
    device = torch.device(args.device)
    cfg = yaml.safe_load(Path(args.config).read_text())
    precision = args.precision or str(cfg.get("trainer", {}).get("precision") or "32-true")

    bare = bare_steps_per_s(merged(cfg, overrides(fit_args)), device, precision, args.bare_steps, args.warmup_steps)
    print(f"bare step ({bare['params'] / 1e6:.2f}M parameters, batch {bare['batch_size']}, {precision}): "
          f"{bare['back_to_back']:.2f} steps/s back to back, {bare['synchronized_each_step']:.2f} synchronized each "
          "step", flush=True)

    from diffusion_lit.cli import main as diffusion_lit

    timer = {"class_path": "loop_speed.StepTimer",
             "init_args": {"out": str(workdir / "fit_steps.json"), "warmup_steps": args.warmup_steps,
                           "sync_debug_steps": args.sync_debug_steps}}
    seconds = int(args.seconds)
    argv = ["fit", "--config", args.config, *fit_args,
            "--trainer.accelerator", "cuda" if device.type == "cuda" else "cpu", "--trainer.devices", "1",
            "--trainer.precision", precision, "--trainer.max_time",
            f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}",
            "--trainer.logger.init_args.save_dir", str(workdir / "runs"), "--trainer.logger.init_args.name", "loop",
            "--fresh_run", "true", f"--trainer.callbacks+={json.dumps(timer)}"]
    print("fit " + " ".join(argv[1:]), flush=True)
    started = time.perf_counter()
    try:
        diffusion_lit(argv)
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise
    fit = json.loads((workdir / "fit_steps.json").read_text())
    fit["wall_s"] = time.perf_counter() - started  # the whole command: setup, the run, the end's grid and checkpoint
    ratio = fit["steps_per_s"] / bare["back_to_back"] if fit["steps_per_s"] else None
    result = {"config": args.config, "device": str(device), "precision": precision, "fit_args": fit_args,
              "bare": bare, "fit": fit, "fit_over_bare": ratio}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    (out / "loop.json").write_text(json.dumps(result, indent=1))
    print(f"fit: {fit['steps_per_s'] or 0:.2f} steps/s over steps {fit['first_timed_step']}-{fit['last_step']} "
          f"({fit['seconds']:.1f} s); the bare step: {bare['back_to_back']:.2f}; fit/bare "
          f"{'n/a' if ratio is None else f'{ratio:.3f}'} (the target: at least 0.9)")
    if fit["syncs_per_step"]:
        print("host-device synchronizations per fit step, by file and line: " +
              ", ".join(f"{where} {count:g}" for where, count in fit["syncs_per_step"].items()))


if __name__ == "__main__":
    main()
