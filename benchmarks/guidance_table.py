"""Guidance settings against quality: for one checkpoint, each run's guide (none, the model's own, or a guide
checkpoint), guidance scale, interval and sampler, scored by the digit judge on the same samples budget (FID on its
features, the confident share and, for a conditional model, the share classified as asked), with the network
evaluations per image counted as they were made (the guide's apart) and the sampling time per image.

    python benchmarks/guidance_table.py --ckpt_path runs/mnist_cpu_uncond/checkpoints/last.ckpt \\
        --run "sampler=ddim steps=20 eta=1" \\
        --run "guide=runs/mnist_cpu_uncond/checkpoints/step00000500.ckpt w=2 sampler=ddim steps=10 eta=1" \\
        --run "guide=own w=2 interval=0.3,20 sampler=dpmpp_2m steps=14"

A run is `key=value` words: guide (none, own: the guide trained beside the model, or a checkpoint), weak (same:
the guide sees each sample's condition, or null: the null one), w, interval
(LO,HI in sigma / alpha), sampler, steps, eta. Prints one Markdown row per run as it finishes (run it alone: the
times are wall-clock), then the JSON of every run.
"""

import argparse
import json
import time


from diffusion_lit.commands.sample import generate_images, parse_labels
from diffusion_lit.commands.evaluate import checkpoint_data, checkpoint_reference, score
from diffusion_lit.io.loading import load_checkpoint, load_guide
from diffusion_lit.model.guidance import Evaluations
from diffusion_lit.training.metrics import ImageFeatures


def parse_run(text: str) -> dict:
    run = {"guide": "none", "weak": "same", "w": "1", "interval": None, "sampler": "ddim", "steps": "20", "eta": "0"}
    for word in text.split():
        key, _, value = word.partition("=")
        if key not in run:
            raise SystemExit(f"unknown key {key!r} in run {text!r}: use {', '.join(run)}")
        run[key] = value
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--run", action="append", required=True, help="one run's settings (see above); repeat")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--seed", type=int, default=0, help="the noise's seed: another one checks a choice made on 0")
    parser.add_argument("--autoencoder", help="for a latent model whose autoencoder moved: its new place")
    args = parser.parse_args()

    module, checkpoint = load_checkpoint(args.ckpt_path, autoencoder=args.autoencoder)
    features = ImageFeatures("digits").to(module.device)
    real = checkpoint_reference(features, checkpoint_data(checkpoint), 10000, 500, "~/.cache/diffusion_lit/fid")
    labels = parse_labels("all", args.num_samples, module.conditioning.num_classes) if module.conditioning.num_classes else None
    print(f"{args.ckpt_path}: step {checkpoint['global_step']}, {module.process}, {module.objective.prediction}, "
          f"{args.num_samples} samples")
    print("| guide | guide's condition | w | interval | sampler | NFE (model + guide) | FID (judge) | confident | "
          "as asked | ms / image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows, own = [], module.guide
    for text in args.run:
        run = parse_run(text)
        module.guide = own if run["guide"] == "own" else None
        guide = load_guide(run["guide"], module) if run["guide"] not in ("none", "own") else None
        if run["guide"] == "own" and own is None:
            raise SystemExit(f"{args.ckpt_path} has no guide of its own (model.guide)")
        interval = tuple(float(v) for v in run["interval"].split(",")) if run["interval"] else None
        counts, start = Evaluations(), time.perf_counter()
        images = generate_images(module, args.num_samples, args.seed, args.batch_size, precision=args.precision,
                                 labels=labels, guidance_scale=float(run["w"]), sampler=run["sampler"],
                                 steps=int(run["steps"]), eta=float(run["eta"]), guide=guide, counts=counts,
                                 guidance_interval=interval, guide_condition=run["weak"])
        ms = 1000 * (time.perf_counter() - start) / args.num_samples
        model_calls, guide_calls = counts.per_image()
        scores = score(features, images, real, labels)
        rows.append({**run, "model_nfe": model_calls, "guide_nfe": guide_calls, "ms_per_image": round(ms, 1),
                     **scores})
        asked = f"{scores['requested_share']:.1%}" if "requested_share" in scores else "-"
        sampler = f"{run['sampler']} {run['steps']}" + (f", eta {run['eta']}" if float(run["eta"]) else "")
        print(f"| {run['guide']} | {run['weak']} | {run['w']} | {run['interval'] or '-'} | {sampler} | "
              f"{model_calls + guide_calls:g} ({model_calls:g} + {guide_calls:g}) | {scores['fid']:.2f} | "
              f"{scores['confident_share']:.1%} | {asked} | {ms:.0f} |", flush=True)
    module.guide = own
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
