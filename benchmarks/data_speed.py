"""Is the loader or the network the limit? Images per second of each data source's train loader (an image folder,
its Hugging Face copy, its litdata streaming copy) at 0, 2 and 4 DataLoader workers, beside the images per second of
a training step of a config's network (configs/cifar10.yaml's UNet), at batch 128.

    pip install -e ".[data,bench]" -c constraints.txt
    python benchmarks/data_speed.py --count 600 --batches 3 --out /tmp/ds_small    # 80 s on 2 CPU cores (the step)
    python benchmarks/data_speed.py --out data/speed                                # 100,000 images

The images are generated once into --out (32x32 RGB PNGs, smooth colour fields with noise, CIFAR-10's size and
about its PNG size, in 10 class sub-folders), with the Hugging Face copy (a `save_to_disk` folder, the PNG bytes
inside, as a dataset from the Hub holds them) and the streaming copy (`data optimize`'s chunks) beside them; a later
run reuses all three. Each loader is the one `fit` trains from (`DiffusionDataModule.train_dataloader()`, random
flips on); each cell times --batches batches (epochs restart as training restarts them) after --warmup untimed
ones, which start the workers. The training step is the one `benchmarks/bench.py` times (draw t and noise, the loss,
backward, Adam, the EMA update), float32, median of --step_repeats.
"""

import argparse
import multiprocessing
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from tqdm.auto import tqdm

from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.data.hf_data import HFDataset
from diffusion_lit.data.sources import ImageFolder
from diffusion_lit.commands.optimize import optimize
from diffusion_lit.data.streaming import Streaming

sys.path.insert(0, str(Path(__file__).parent))
import bench  # build and time the config's network as bench.py does

SOURCES = ("folder", "hf", "streaming")
CLASSES = 10
SIZE = 32
CHUNK = 500  # images per generating task
DONE = ".complete"  # written last, with the count: a folder without it is half-written


def cpu() -> str:
    """The CPU's model name and the vector flags that decide float32 and bf16 speed."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: lscpu is not there either
        pass
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16") if f in flags] + sorted(f for f in flags if f.startswith("amx"))
    return f"{name}, {os.cpu_count()} cores; flags: {' '.join(wanted) or 'none of avx2/avx512f/avx512_bf16/amx'}"


def draw(index: int) -> Image.Image:
    """Image `index`: a smooth random colour field (bilinear from 4x4) with pixel noise, the same every run."""
    rng = np.random.default_rng(index)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB")
    field = np.asarray(coarse.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.int16)
    noisy = field + rng.integers(-12, 13, field.shape, dtype=np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB")


def write_chunk(task: tuple[str, int, int]) -> int:
    """Writes images start..stop-1 into their class sub-folders of `folder`; returns how many."""
    folder, start, stop = task
    for i in range(start, stop):
        draw(i).save(Path(folder) / f"class{i % CLASSES}" / f"{i:06d}.png")
    return stop - start


def complete(folder: Path, count: int) -> bool:
    """Whether `folder` holds a finished copy of `count` images; an error when it holds another count."""
    if not (folder / DONE).is_file():
        return False
    held = int((folder / DONE).read_text())
    if held != count:
        sys.exit(f"error: {folder} holds {held:,} images, not --count {count:,}: give another --out, or "
                 f"--count {held}")
    return True


def finish(partial: Path, folder: Path, count: int) -> None:
    """Marks a written copy finished and moves it into place."""
    (partial / DONE).write_text(str(count))
    partial.rename(folder)


def images(out: Path, count: int) -> Path:
    """The folder of `count` generated PNGs under `out`, written (in parallel, with a progress bar) if missing."""
    folder = out / "images"
    if complete(folder, count):
        return folder
    partial = out / "images.partial"  # an interrupted run's files are written again
    for c in range(CLASSES):
        (partial / f"class{c}").mkdir(parents=True, exist_ok=True)
    tasks = [(str(partial), start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
    with multiprocessing.Pool(os.cpu_count()) as pool, tqdm(total=count, desc="generating PNGs", unit=" img") as bar:
        for n in pool.imap_unordered(write_chunk, tasks):
            bar.update(n)
    finish(partial, folder, count)
    return folder


def hf_copy(out: Path, folder: Path, count: int) -> Path:
    """The images as a Hugging Face `save_to_disk` folder (PNG bytes embedded, labels a ClassLabel), written if
    missing."""
    import datasets  # the `data` extra

    copy = out / "hf"
    if complete(copy, count):
        return copy
    files = sorted(folder.rglob("*.png"))
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    rows = {"image": [{"bytes": p.read_bytes(), "path": p.name} for p in tqdm(files, "reading PNGs for the HF copy")],
            "label": [classes.index(p.parent.name) for p in files]}
    partial = out / "hf.partial"
    shutil.rmtree(partial, ignore_errors=True)
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(partial))
    finish(partial, copy, count)
    return copy


def streaming_copy(out: Path, source, count: int) -> Path:
    """The images as litdata chunks (`data optimize`), written if missing."""
    copy = out / "streaming"
    if complete(copy, count):
        return copy
    shutil.rmtree(copy, ignore_errors=True)  # optimize moves a finished copy into place; only the mark is missing
    optimize(source, str(copy), num_workers=os.cpu_count())
    (copy / DONE).write_text(str(count))
    return copy


def loader_speed(source, workers: int, warmup: int, batches: int, seconds: float) -> tuple[float, int]:
    """Images per second of the train loader `fit` builds for `source` at batch 128, and the batches timed: --batches
    after `warmup` untimed ones, stopping early past `seconds`. Epochs restart as training restarts them."""
    data = DiffusionDataModule(source, batch_size=128, num_workers=workers)
    data.setup()
    loader = data.train_dataloader()
    batch_iter, images, timed, start = iter(loader), 0, 0, 0.0
    for k in range(warmup + batches):
        if k == warmup:
            start = time.perf_counter()
        try:
            x, _ = next(batch_iter)
        except StopIteration:
            batch_iter = iter(loader)
            x, _ = next(batch_iter)
        if k >= warmup:
            images, timed = images + len(x), timed + 1
            if time.perf_counter() - start > seconds:
                break
    elapsed = time.perf_counter() - start
    # Stop the workers now, as the project's exit handler does (`loaders.stop_workers`): left to the cyclic GC (the
    # data module holds the loader), the index queues can go before the stop message is sent, and the workers, which
    # ignore torch's SIGTERM fallback (`leave_signals_to_main`), live on and hang the exit.
    iterator = getattr(loader, "_iterator", None)  # where persistent workers live
    iterator = batch_iter if iterator is None else iterator
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    data.train_loader = None
    return images / elapsed, timed


def step_speed(config: str, batch_size: int, device: str, warmup: int, repeats: int) -> float:
    """Images per second of one float32 training step of the config's network, as benchmarks/bench.py times it
    (without its sampling measurements, which would double this script's longest part)."""
    torch.manual_seed(0)
    device = torch.device(device)
    module, _ = bench.build(yaml.safe_load(Path(config).read_text()), "ours")
    module.to(device)
    optimizer = module.configure_optimizers()["optimizer"]
    hp = module.hparams
    x0 = torch.rand(batch_size, hp.channels, hp.image_size, hp.image_size, device=device) * 2 - 1

    def train_step():
        loss = module.objective.loss(module.net, module.process, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        module.ema.update_parameters(module.net)

    seconds, _ = bench.timed(train_step, device, warmup, repeats)
    return batch_size / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000, help="images to generate (default 100,000)")
    parser.add_argument("--out", default="data/speed", help="where the images and their copies live (reused)")
    parser.add_argument("--workers", default="0,2,4", help="DataLoader worker counts, comma-separated")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    parser.add_argument("--batches", type=int, default=200, help="timed batches of 128 per cell (at most --seconds)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (they start the workers)")
    parser.add_argument("--seconds", type=float, default=10.0, help="stop a cell's timing early past this")
    parser.add_argument("--config", default="configs/cifar10.yaml", help="the network whose training step is timed")
    parser.add_argument("--step_batch", type=int, default=128, help="the training step's batch (0: no step)")
    parser.add_argument("--step_repeats", type=int, default=2, help="timed training steps (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="where the training step runs")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    sources = args.sources.split(",")
    if unknown := set(sources) - set(SOURCES):
        parser.error(f"--sources: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SOURCES)}")
    if args.count < 128 * 1.06:  # 5% goes to validation; a loader needs a full batch of 128
        parser.error("--count must be at least 136 (one training batch of 128 after the 5% validation split)")

    print(f"CPU: {cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = ImageFolder(str(images(out, args.count)))
    built = {"folder": lambda: folder,  # each copy made (or found) when its turn comes
             "hf": lambda: HFDataset(str(hf_copy(out, Path(folder.root), args.count))),
             "streaming": lambda: Streaming(str(streaming_copy(out, folder, args.count)))}

    rows = []
    for name in sources:
        source = built[name]()
        for w in workers:
            img_s, timed = loader_speed(source, w, args.warmup, args.batches, args.seconds)
            rows.append((name, w, img_s, timed))
            print(f"measured {name} at {w} workers: {img_s:,.0f} img/s", file=sys.stderr, flush=True)
    step = None
    if args.step_batch:
        step = step_speed(args.config, args.step_batch, args.device, 1, args.step_repeats)

    print(f"{args.count:,} PNGs of {SIZE}x{SIZE} RGB in {out}; batch 128, {args.warmup} warm-up batches")
    print(f"{'source':<11}{'workers':>8}{'img/s':>10}{'batches':>9}")
    for name, w, img_s, timed in rows:
        print(f"{name:<11}{w:>8}{img_s:>10,.0f}{timed:>9}")
    if step is None:
        return
    print(f"training step ({args.config}, batch {args.step_batch}, float32, {args.device}): {step:,.1f} img/s")
    for name in sources:
        best = max((r for r in rows if r[0] == name), key=lambda r: r[2])
        ratio = best[2] / step
        verdict = "network-bound" if ratio >= 1 else "loader-bound"
        print(f"{name}: {verdict}: its loader at {best[1]} workers gives {best[2]:,.0f} img/s, "
              f"{ratio:,.1f}x what the training step takes")
    if args.device == "cpu":
        print("(training on this CPU, the loader's workers and the step share its cores: a loader far ahead of the "
              "step still takes some of the step's time)")


if __name__ == "__main__":
    main()
