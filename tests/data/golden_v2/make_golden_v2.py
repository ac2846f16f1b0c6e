"""Writes the golden_v2 fixtures beside this file with the code of commit b882802 (before the refactor of the model
into process / objective / conditioning / latent parts). Run it only against that code:

    git worktree add /tmp/golden b882802 && cd /tmp/golden
    PYTHONPATH=$PWD python tests/data/golden_v2/make_golden_v2.py

Every checkpoint is written by a real `python -m diffusion_lit fit` of a tiny model for 4 steps (the latent model's
autoencoder by `fit` for 40), in a temporary folder that is deleted afterwards, so the absolute paths the checkpoints
record no longer exist; the samples beside each are drawn by `python -m diffusion_lit sample` from the copies here,
the moved autoencoder / pipeline folder given with `--autoencoder`, as tests/test_golden.py draws them again.
Each `<name>_samples.pt` holds {"commit", "commands": [{"name", "args", "images", "stdout"}]}: `args` are the words
after `python -m diffusion_lit`, with "{here}" for this folder and "{out}" for the .npz written; `images` the uint8
NHWC array it wrote (arr_0); `stdout` the line `sample` printed (for information).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
COMMIT = "b882802"

# The UNet of every pixel and latent model here (about 42K parameters): tests/conftest.py's tiny_unet at 8 channels.
TINY_NET = ["--model.net.init_args.base_channels", 8, "--model.net.init_args.norm_groups", 4]
# A real fit, kept short: 4 Adam steps at 3e-2 without warm-up, so that every weight (the zero-initialised output
# convolutions and cross-attention included) has moved far enough for the label, the prompt and the guide to change
# the images by many grey levels (at 1e-2 another prompt changed the text model's images by one grey level), and the
# EMA differs from the initial weights; no callbacks, no validation.
SHORT_FIT = ["--trainer.max_steps", 4, "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
             "--model.warmup_steps", 0, "--model.optimizer.init_args.lr", 3e-2]
GUIDE = {"class_path": "diffusion_lit.guidance.Guide",
         "init_args": {"ema_decay": 0.9,
                       "net": {"class_path": "diffusion_lit.unet.UNet",
                               "init_args": {"base_channels": 4, "channel_mult": [1], "num_res_blocks": 1,
                                             "attention_resolutions": [], "dropout": 0.0, "norm_groups": 4}}}}


def diffusion_lit(*args, cwd: Path = REPO) -> str:
    """`python -m diffusion_lit *args` with 2 threads (as the tests run); its stdout; fails loudly."""
    words = [str(a) for a in args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "diffusion_lit", *words], cwd=cwd, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"python -m diffusion_lit {' '.join(words)} failed:\n{result.stderr}")
    return result.stdout


def write_image_folder(root: Path, n_per_class: int, size: int, classes=("a", "b")) -> Path:
    """tests/conftest.py's images: grayscale PNGs, class i a bright square in corner i plus noise."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 40, (size, size))
            img[c * size // 2 : (c + 1) * size // 2, : size // 2] = 255
            Image.fromarray(img.astype(np.uint8), "L").save(root / name / f"{i:03d}.png")
    return root


def write_captioned_rgb(root: Path) -> Path:
    """tests/test_stable_diffusion.py's 8 RGB 16x16 images of a red or a blue square, in a metadata.jsonl."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        color = ("red", "blue")[i % 2]
        image = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
        image[4:12, 4:12, 0 if color == "red" else 2] = 255
        Image.fromarray(image).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {color} square"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return root


def write_tiny_sd(folder: Path) -> Path:
    """SD 1.x's pipeline in miniature (tests/test_stable_diffusion.py's write_tiny_sd at half the widths): a two-level
    UNet2DConditionModel with cross-attention, a 2x-downsampling AutoencoderKL, a two-layer CLIP text model whose
    tokenizer reads the 256 byte characters, SD's PNDM scheduler config (scaled-linear betas, eps prediction)."""
    import diffusers
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    config = transformers.CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=512,
                                         eos_token_id=513, pad_token_id=513)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(config)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                                        prediction_type="epsilon")
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.save_pretrained(str(folder / "sd"))
    return folder / "sd"


def fit_tiny(tmp: Path, name: str, images: Path, *extra) -> Path:
    """configs/tiny_cpu.yaml on a folder of images, the tiny UNet, 4 steps; the run's last.ckpt."""
    diffusion_lit("fit", "--config", "configs/tiny_cpu.yaml", "--data.dataset", "folder", "--data.root", images,
                  "--data.batch_size", 8, "--trainer.logger.init_args.save_dir", tmp / "runs",
                  "--trainer.logger.init_args.name", name, *TINY_NET, *SHORT_FIT, *extra)
    return tmp / "runs" / name / "checkpoints" / "last.ckpt"


def draw(name: str, commands: dict[str, list]) -> None:
    """Each command's samples, drawn from the files here as tests/test_golden.py draws them, into <name>_samples.pt."""
    stored = []
    with tempfile.TemporaryDirectory() as out_dir:
        for label, args in commands.items():
            words = [str(a) for a in args]
            out = Path(out_dir) / f"{label}.npz"
            stdout = diffusion_lit(*[w.replace("{here}", str(HERE)).replace("{out}", str(out)) for w in words],
                                   cwd=Path(out_dir))  # from elsewhere: nothing found through the working folder
            images = np.load(out)["arr_0"]
            # A fixture that can tell a change: neither flat nor saturated to black and white.
            inside = ((images > 0) & (images < 255)).mean()
            assert images.std() > 5 and inside > 0.2, (name, label, images.std(), inside)
            stored.append({"name": label, "args": words, "images": torch.from_numpy(images),
                           "stdout": stdout.strip().splitlines()[-1]})
            print(f"{name} {label}: {images.shape}, std {images.std():.1f}, {inside:.0%} inside (0, 255);",
                  stored[-1]["stdout"])
    torch.save({"commit": COMMIT, "commands": stored}, HERE / f"{name}_samples.pt")


def main() -> None:
    import diffusion_lit as package

    assert Path(package.__file__).resolve().is_relative_to(REPO), f"not this checkout's code: {package.__file__}"
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        pixels = write_image_folder(tmp / "pixels", n_per_class=8, size=8)

        # 1. Rectified flow, v prediction, class-conditional, in the latent space of our own tiny autoencoder, trained
        # for 40 steps: after 4 its decoder all but ignored the latents (another label or guidance scale changed the
        # images by one grey level).
        latent_images = write_image_folder(tmp / "latent_images", n_per_class=8, size=16)
        diffusion_lit("fit", "--config", "configs/digits_autoencoder.yaml", "--data.dataset", "folder",
                      "--data.root", latent_images, "--data.image_size", 16, "--data.batch_size", 8,
                      "--model.block_out_channels", "[4, 8]", "--model.latent_channels", 2,
                      "--model.norm_num_groups", 2, "--trainer.max_steps", 40, "--trainer.max_time", "null",
                      "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", tmp / "runs",
                      "--trainer.logger.init_args.name", "autoencoder", "--model.optimizer.init_args.lr", 1e-2)
        autoencoder = tmp / "runs" / "autoencoder" / "checkpoints" / "last.ckpt"
        flow = fit_tiny(tmp, "flow_v_latent", latent_images, "--model.autoencoder", autoencoder,
                        "--model.process", "flow", "--model.prediction", "v", "--model.conditional", "true")
        shutil.copy(autoencoder, HERE / "flow_v_latent_autoencoder.ckpt")
        shutil.copy(flow, HERE / "flow_v_latent.ckpt")

        # 2. Text prompts through the byte-level encoder trained with the denoiser (prediction unset: the VP process's
        # own eps; tiny_cpu.yaml's cosine schedule).
        text_images = write_image_folder(tmp / "text_images", n_per_class=8, size=8)
        for i, image in enumerate(sorted(text_images.rglob("*.png"))):
            image.with_suffix(".txt").write_text(f"{image.parent.name} number {i % 3}")
        text = fit_tiny(tmp, "text_bytes", text_images, "--data.captions", "true", "--model.text_encoder", "bytes",
                        "--model.text_width", 16, "--model.text_depth", 1, "--model.max_prompt_length", 16)
        shutil.copy(text, HERE / "text_bytes.ckpt")

        # 3. An unconditional VP x0-prediction model (cosine) with autoguidance's guide trained beside it (model.guide);
        # at 1e-2 (at 3e-2 its x0 is the dark background nearly everywhere: images clipped to black).
        guided = fit_tiny(tmp, "guided", pixels, "--model.prediction", "x0", "--model.guide", json.dumps(GUIDE),
                          "--model.optimizer.init_args.lr", 1e-2)
        shutil.copy(guided, HERE / "guided.ckpt")

        # 4. LoRA on the tiny Stable Diffusion pipeline (configs/sd_lora.yaml, on the CPU in float32).
        sd = write_tiny_sd(tmp / "tiny_sd")
        captioned = write_captioned_rgb(tmp / "captioned")
        diffusion_lit("fit", "--config", "configs/sd_lora.yaml", "--model.pretrained", sd, "--data.root", captioned,
                      "--data.image_size", 16, "--data.batch_size", 4, "--data.num_workers", 0,
                      "--data.val_fraction", 0, "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
                      "--trainer.max_steps", 4, "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
                      "--trainer.logger.init_args.save_dir", tmp / "runs", "--trainer.logger.init_args.name",
                      "sd_lora", "--model.frozen_dtype", "float32", "--model.optimizer.init_args.lr", 1e-2)
        shutil.copytree(sd, HERE / "sd_lora_pipeline")
        shutil.copy(tmp / "runs" / "sd_lora" / "checkpoints" / "last.ckpt", HERE / "sd_lora.ckpt")

        # 5. VP, v prediction, cosine schedule, class-conditional, Min-SNR weighting, in pixels; T = 100 steps (DDPM's
        # ancestral sampler walks them all: 200 network passes with guidance, not 2000).
        vp = fit_tiny(tmp, "vp_v_cond", pixels, "--model.prediction", "v", "--model.schedule", "cosine",
                      "--model.conditional", "true", "--model.loss_weighting", "min_snr", "--model.timesteps", 100)
        shutil.copy(vp, HERE / "vp_v_cond.ckpt")
    # The temporary folder is gone: the paths the checkpoints recorded (autoencoder, pipeline, data) no longer exist.

    flow_ckpt = ["sample", "--ckpt_path", "{here}/flow_v_latent.ckpt", "--autoencoder",
                 "{here}/flow_v_latent_autoencoder.ckpt"]
    draw("flow_v_latent", {
        "ddim_cfg": [*flow_ckpt, "--num_samples", 4, "--labels", "0,1,0,1", "--guidance_scale", 2, "--sampler", "ddim",
                     "--steps", 4, "--seed", 0, "--out", "{out}"],
        "heun": [*flow_ckpt, "--num_samples", 3, "--labels", "1,0,1", "--sampler", "heun", "--steps", 3, "--seed", 1,
                 "--out", "{out}"],
        "euler_unconditional": [*flow_ckpt, "--num_samples", 2, "--sampler", "euler", "--steps", 4, "--seed", 2,
                                "--out", "{out}"],
    })
    text_ckpt = ["sample", "--ckpt_path", "{here}/text_bytes.ckpt"]
    draw("text_bytes", {
        "ddim_cfg": [*text_ckpt, "--num_samples", 3, "--prompt", "a number 1", "--guidance_scale", 2,
                     "--sampler", "ddim", "--steps", 4, "--seed", 0, "--out", "{out}"],
        "dpmpp_2m": [*text_ckpt, "--num_samples", 2, "--prompt", "b number 2", "--sampler", "dpmpp_2m", "--steps", 4,
                     "--seed", 1, "--out", "{out}"],
        "empty_prompt": [*text_ckpt, "--num_samples", 2, "--sampler", "ddim", "--steps", 3, "--seed", 2,
                         "--out", "{out}"],
    })
    guided_ckpt = ["sample", "--ckpt_path", "{here}/guided.ckpt"]
    draw("guided", {
        "ddim_autoguided": [*guided_ckpt, "--num_samples", 3, "--guidance_scale", 2, "--sampler", "ddim", "--steps", 4,
                            "--seed", 0, "--out", "{out}"],
        "heun_autoguided": [*guided_ckpt, "--num_samples", 2, "--guidance_scale", 1.5, "--sampler", "heun",
                            "--steps", 3, "--seed", 1, "--out", "{out}"],
        "ddim_unguided": [*guided_ckpt, "--num_samples", 2, "--sampler", "ddim", "--steps", 4, "--seed", 2,
                          "--out", "{out}"],
    })
    sd_ckpt = ["sample", "--ckpt_path", "{here}/sd_lora.ckpt", "--autoencoder", "{here}/sd_lora_pipeline"]
    draw("sd_lora", {
        "ddim_cfg": [*sd_ckpt, "--num_samples", 2, "--prompt", "a red square", "--guidance_scale", 4,
                     "--sampler", "ddim", "--steps", 3, "--seed", 0, "--out", "{out}"],
        "dpmpp_2m": [*sd_ckpt, "--num_samples", 2, "--prompt", "a blue square", "--sampler", "dpmpp_2m",
                     "--steps", 3, "--seed", 1, "--out", "{out}"],
    })
    vp_ckpt = ["sample", "--ckpt_path", "{here}/vp_v_cond.ckpt"]
    draw("vp_v_cond", {
        "ddim_cfg": [*vp_ckpt, "--num_samples", 4, "--labels", "0,1,0,1", "--guidance_scale", 2, "--sampler", "ddim",
                     "--steps", 4, "--seed", 0, "--out", "{out}"],
        "dpmpp_2m": [*vp_ckpt, "--num_samples", 2, "--labels", "1,0", "--sampler", "dpmpp_2m", "--steps", 4,
                     "--seed", 1, "--out", "{out}"],
        "ddpm_cfg": [*vp_ckpt, "--num_samples", 2, "--labels", "0,1", "--guidance_scale", 1.5, "--sampler", "ddpm",
                     "--seed", 2, "--out", "{out}"],
    })


if __name__ == "__main__":
    main()
