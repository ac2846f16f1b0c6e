"""Quality against network evaluations: every solver at several budgets of network evaluations per sample (NFE),
scored by the digit judge (FID on its features against the shipped digits, the share of confident digits and, for
a conditional checkpoint, of digits classified as asked), with the sampling time per image.

    python benchmarks/solver_table.py --ckpt_path runs/mnist_cpu_uncond/checkpoints/last.ckpt
    python benchmarks/solver_table.py --ckpt_path runs/mnist_cpu/checkpoints/last.ckpt --guidance_scale 1.25

A budget is spent as the solver spends it: Heun makes 2N - 1 calls on N levels, and guidance (w not 0 or 1) runs
two passes per call, so a budget of 10 is 5 levels of a guided sampler. Prints one Markdown row per run as it
finishes (run it alone: the times are wall-clock), then the JSON of every run.
"""

import argparse
import json
import time

import torch

from diffusion_lit.commands.sample import generate_images, parse_labels
from diffusion_lit.commands.evaluate import checkpoint_data, checkpoint_reference, score
from diffusion_lit.io.loading import load_checkpoint, set_flow_shift
from diffusion_lit.training.metrics import ImageFeatures
from diffusion_lit.sampling.samplers import network_evaluations

SOLVERS = ["ddim", "ddim@1", "euler", "heun", "dpmpp_2m", "heun:karras", "dpmpp_2m:karras"]


def steps_for(sampler: str, budget: int, guided: bool) -> int:
    """The most levels (steps) whose network evaluations fit in the budget."""
    fits = [n for n in range(1, budget + 1) if network_evaluations(sampler, n, 1000, 2.0, guided) <= budget]
    return max(fits, default=1)  # each sampler says what its steps cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--solvers", default=",".join(SOLVERS),
                        help="sampler[:spacing][@eta] (ddim@1: DDIM with eta 1), separated by commas")
    parser.add_argument("--nfe", default="5,10,15,20,50", help="budgets of network evaluations per sample")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--flow_shift", type=float, help="a flow model's sampling shift (default: its own)")
    args = parser.parse_args()

    module, checkpoint = load_checkpoint(args.ckpt_path)
    set_flow_shift(module, args.flow_shift)
    features = ImageFeatures("digits").to(module.device)
    real = checkpoint_reference(features, checkpoint_data(checkpoint), 10000, 500, "~/.cache/diffusion_lit/fid")
    labels = parse_labels("all", args.num_samples, module.conditioning.num_classes) if module.conditioning.num_classes else None
    guided = labels is not None and args.guidance_scale not in (0.0, 1.0)
    print(f"{args.ckpt_path}: step {checkpoint['global_step']}, {module.process}, {module.objective.prediction}, "
          f"{args.num_samples} samples" + (f", guidance {args.guidance_scale}" if labels is not None else ""))
    print("| solver | NFE | FID (judge) | confident | as asked | ms / image |")
    print("|---|---|---|---|---|---|")
    rows = []
    for solver in args.solvers.split(","):
        solver_spacing, _, eta = solver.partition("@")
        sampler, _, spacing = solver_spacing.partition(":")
        for budget in (int(b) for b in args.nfe.split(",")):
            steps = steps_for(sampler, budget, guided)
            nfe = network_evaluations(sampler, steps, module.process.timesteps, args.guidance_scale, labels is not None)
            start = time.perf_counter()
            images = generate_images(module, args.num_samples, 0, args.batch_size, precision=args.precision,
                                     labels=labels, guidance_scale=args.guidance_scale, sampler=sampler,
                                     steps=steps, spacing=spacing or "linspace", eta=float(eta or 0))
            ms = 1000 * (time.perf_counter() - start) / args.num_samples
            scores = score(features, images, real, labels)
            row = {"solver": solver, "steps": steps, "nfe": nfe, "ms_per_image": round(ms, 1), **scores}
            rows.append(row)
            asked = f"{scores['requested_share']:.1%}" if "requested_share" in scores else "-"
            print(f"| {solver} | {nfe} | {scores['fid']:.2f} | {scores['confident_share']:.1%} | {asked} | {ms:.0f} |",
                  flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
