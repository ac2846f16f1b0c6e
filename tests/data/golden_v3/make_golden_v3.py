"""Writes the golden_v3 fixtures beside this file with the code of the commit before the package moved into
subpackages (tests/data/golden_v3/README.md names it): checkpoints whose hyperparameters name the parts by their
class paths of then (`diffusion_lit.process.Flow`, `diffusion_lit.objective.MeanFlow`, `diffusion_lit.guidance.Guide`,
`diffusion_lit.sources.ImageFolder`, ...), and the images `sample` drew from them. Run it only against that code:

    git worktree add /tmp/golden <commit> && cd /tmp/golden
    PYTHONPATH=$PWD python tests/data/golden_v3/make_golden_v3.py

The samples file has golden_v2's shape (tests/test_golden.py draws both): {"commit", "commands": [{"name", "args",
"images", "stdout"}]}, "{here}" standing for this folder and "{out}" for the .npz written.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE.parent / "golden_v2"))
from make_golden_v2 import SHORT_FIT, TINY_NET, diffusion_lit, write_image_folder  # noqa: E402  (the same fit)

COMMIT = os.environ.get("GOLDEN_COMMIT", "")
GUIDE = {"class_path": "diffusion_lit.guidance.Guide",
         "init_args": {"ema_decay": 0.9,
                       "net": {"class_path": "diffusion_lit.unet.UNet",
                               "init_args": {"base_channels": 4, "channel_mult": [1], "num_res_blocks": 1,
                                             "attention_resolutions": [], "dropout": 0.0, "norm_groups": 4}}}}


def fit_tiny(tmp: Path, name: str, images: Path, *extra) -> Path:
    """configs/tiny_cpu.yaml on a folder of images (an ImageFolder source), the tiny UNet, 4 steps."""
    diffusion_lit("fit", "--config", "configs/tiny_cpu.yaml", "--data.source", "diffusion_lit.sources.ImageFolder",
                  "--data.source.root", images, "--data.batch_size", 8, "--trainer.logger.init_args.save_dir",
                  tmp / "runs", "--trainer.logger.init_args.name", name, *TINY_NET, *SHORT_FIT, *extra)
    return tmp / "runs" / name / "checkpoints" / "last.ckpt"


def draw(name: str, commands: dict[str, list]) -> None:
    """Each command's samples, drawn from the files here, into <name>_samples.pt."""
    stored = []
    with tempfile.TemporaryDirectory() as out_dir:
        for label, args in commands.items():
            words = [str(a) for a in args]
            out = Path(out_dir) / f"{label}.npz"
            stdout = diffusion_lit(*[w.replace("{here}", str(HERE)).replace("{out}", str(out)) for w in words],
                                   cwd=Path(out_dir))
            images = np.load(out)["arr_0"]
            inside = ((images > 0) & (images < 255)).mean()
            assert images.std() > 5 and inside > 0.2, (name, label, images.std(), inside)
            stored.append({"name": label, "args": words, "images": torch.from_numpy(images),
                           "stdout": stdout.strip().splitlines()[-1]})
            print(f"{name} {label}: {images.shape}, std {images.std():.1f}, {inside:.0%} inside (0, 255)")
    torch.save({"commit": COMMIT, "commands": stored}, HERE / f"{name}_samples.pt")


def main() -> None:
    import diffusion_lit as package

    assert Path(package.__file__).resolve().is_relative_to(REPO), f"not this checkout's code: {package.__file__}"
    assert COMMIT, "set GOLDEN_COMMIT to the commit whose code writes these"
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        pixels = write_image_folder(tmp / "pixels", n_per_class=8, size=8)
        # 1. MeanFlow on a rectified flow, class-conditional, guidance folded into training (scale 2).
        meanflow = fit_tiny(tmp, "meanflow_labels", pixels, "--model.process", "diffusion_lit.process.Flow",
                            "--model.objective", "diffusion_lit.objective.MeanFlow",
                            "--model.objective.init_args.guidance_scale", 2,
                            "--model.conditioning", "diffusion_lit.conditioning.Labels")
        shutil.copy(meanflow, HERE / "meanflow_labels.ckpt")
        # 2. VP eps with autoguidance's guide trained beside it (model.guide).
        guided = fit_tiny(tmp, "vp_guide", pixels, "--model.guide", json.dumps(GUIDE),
                          "--model.optimizer.init_args.lr", 1e-2)
        shutil.copy(guided, HERE / "vp_guide.ckpt")

    meanflow_ckpt = ["sample", "--ckpt_path", "{here}/meanflow_labels.ckpt"]
    draw("meanflow_labels", {
        "one_step": [*meanflow_ckpt, "--num_samples", 4, "--labels", "0,1,0,1", "--sampler", "meanflow", "--steps", 1,
                     "--seed", 0, "--out", "{out}"],
        "two_steps": [*meanflow_ckpt, "--num_samples", 2, "--labels", "1,0", "--sampler", "meanflow", "--steps", 2,
                      "--seed", 1, "--out", "{out}"],
    })
    guided_ckpt = ["sample", "--ckpt_path", "{here}/vp_guide.ckpt"]
    draw("vp_guide", {
        "ddim_autoguided": [*guided_ckpt, "--num_samples", 3, "--guidance_scale", 2, "--sampler", "ddim", "--steps", 4,
                            "--seed", 0, "--out", "{out}"],
        "dpmpp_2m": [*guided_ckpt, "--num_samples", 2, "--sampler", "dpmpp_2m", "--steps", 4, "--seed", 1,
                     "--out", "{out}"],
        "euler_autoguided": [*guided_ckpt, "--num_samples", 2, "--guidance_scale", 1.5, "--sampler", "euler",
                             "--steps", 4, "--seed", 2, "--out", "{out}"],
    })


if __name__ == "__main__":
    main()
