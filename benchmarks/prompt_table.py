"""Does a text model draw the digit a prompt asks for? Samples per prompt for sets of prompts ("zero" ... "nine",
"0" ... "9", and phrasings the captioned digits never use), judged by the digit judge: the share classified as the
digit asked for, the share it is confident about, and the judge-FID of all the set's samples.

    python benchmarks/prompt_table.py --ckpt_path runs/digits_text_cpu/checkpoints/last.ckpt

Prints one Markdown row per prompt set and sampler setting, then the JSON of every row.
"""

import argparse
import json
import time

import torch

from diffusion_lit.commands.sample import generate_images
from diffusion_lit.commands.evaluate import checkpoint_data, checkpoint_reference, score
from diffusion_lit.io.loading import load_checkpoint
from diffusion_lit.data.digits import WORDS
from diffusion_lit.training.metrics import ImageFeatures
from diffusion_lit.sampling.samplers import network_evaluations

PROMPT_SETS = {  # name -> the prompt for digit d
    "words": lambda d: WORDS[d],
    "digits": lambda d: str(d),
    "unseen: number {word}": lambda d: f"number {WORDS[d]}",
    "unseen: a picture of a {digit}": lambda d: f"a picture of a {d}",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--per_prompt", type=int, default=100, help="samples per prompt")
    parser.add_argument("--settings", default="ddim:10@1:1.5",
                        help="sampler:steps@eta:guidance, separated by commas (ddim:10@1:1.5: DDIM, 10 steps, eta 1, "
                             "guidance 1.5)")
    parser.add_argument("--sets", default=",".join(PROMPT_SETS), help="prompt sets, separated by commas")
    parser.add_argument("--batch_size", type=int, default=250)
    args = parser.parse_args()

    module, checkpoint = load_checkpoint(args.ckpt_path)
    features = ImageFeatures("digits").to(module.device)
    real = checkpoint_reference(features, checkpoint_data(checkpoint), 10000, 500, "~/.cache/diffusion_lit/fid")
    print(f"{args.ckpt_path}: step {checkpoint['global_step']}, {args.per_prompt} samples per prompt")
    print("| prompts | sampler | NFE | as asked | confident | judge FID | ms/image |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for setting in args.settings.split(","):
        head, guidance = setting.rsplit(":", 1)
        sampler_steps, eta = head.split("@")
        sampler, steps = sampler_steps.split(":")
        kwargs = {"sampler": sampler, "steps": int(steps), "eta": float(eta), "guidance_scale": float(guidance)}
        nfe = network_evaluations(sampler, int(steps), module.process.timesteps, float(guidance), True)
        for name in args.sets.split(","):
            digits = torch.arange(10).repeat_interleave(args.per_prompt)
            prompts = [PROMPT_SETS[name](int(d)) for d in digits]
            start = time.perf_counter()
            images = generate_images(module, len(prompts), 0, args.batch_size, labels=prompts, **kwargs)
            ms = 1000 * (time.perf_counter() - start) / len(prompts)
            scores = score(features, images, real, digits, args.batch_size)
            row = {"prompts": name, "setting": setting, "nfe": nfe, **scores, "ms_per_image": ms}
            rows.append(row)
            print(f"| {name} | {setting} | {nfe} | {scores['requested_share']:.1%} | {scores['confident_share']:.1%} "
                  f"| {scores['fid']:.2f} | {ms:.0f} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
