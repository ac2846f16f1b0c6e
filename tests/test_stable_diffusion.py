"""Stable Diffusion fine-tuning on a tiny SD pipeline built from configs and saved with save_pretrained (nothing is
downloaded): the UNet behind our contract, our DDIM against StableDiffusionPipeline, LoRA (only the adapters train,
are saved, resume exactly, and load into diffusers), full fine-tuning's export, the memory switches, the errors."""

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from diffusion_lit.data.datamodule import DiffusionDataModule  # noqa: E402
from diffusion_lit.model.schedulers import process_of  # noqa: E402
from diffusion_lit.core.errors import UserError  # noqa: E402
from diffusion_lit.data.images import to_uint8  # noqa: E402
from diffusion_lit.sampling.samplers import sample  # noqa: E402
from diffusion_lit.model.process import VP  # noqa: E402
from diffusion_lit.data.sources import ImageFolder  # noqa: E402
from diffusion_lit.model.stable_diffusion import PretrainedUNet, StableDiffusionModule  # noqa: E402

from test_cli import REPO, cli  # noqa: E402
from test_text import write_tiny_clip  # noqa: E402

PROMPT = "a red square"


def write_tiny_sd(folder: Path, prediction: str = "epsilon") -> Path:
    """SD 1.x's pipeline in miniature: a two-level UNet2DConditionModel with cross-attention, a 2x-downsampling
    AutoencoderKL, a two-layer CLIP text model, and SD's PNDM scheduler config (scaled-linear betas)."""
    write_tiny_clip(folder / "clip")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                                        prediction_type=prediction)
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
        text_encoder=transformers.CLIPTextModel.from_pretrained(str(folder / "clip" / "text_encoder")),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(folder / "clip" / "tokenizer")))
    pipe.save_pretrained(str(folder / "sd"))
    shutil.rmtree(folder / "clip")
    return folder / "sd"


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """8 RGB 16x16 images of a red or a blue square, captioned in a metadata.jsonl."""
    root = tmp_path_factory.mktemp("captioned")
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


def pipeline(folder: Path, lora: Path | None = None):
    """diffusers' own StableDiffusionPipeline from a folder, with DDIM on trailing timesteps (our --spacing trailing:
    the last step lands on x0) and the LoRA adapters of `lora` loaded."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                         set_alpha_to_one=True, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def fit_args(tmp_path: Path, sd: Path, images: Path, name: str, *extra, frozen: str = "float32") -> list:
    """configs/sd_lora.yaml on the tiny pipeline and 16x16 images, on the CPU, the frozen weights in `frozen`."""
    return ["fit", "--config", REPO / "configs" / "sd_lora.yaml", "--model.pretrained", sd,
            "--data.source.root", images,
            "--data.image_size", 16, "--data.batch_size", 4, "--data.num_workers", 0, "--data.val_fraction", 0,
            "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.max_steps", 4,
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks.init_args.sampling.steps", 2,
            "--trainer.logger.init_args.save_dir", tmp_path / "runs", "--trainer.logger.init_args.name", name,
            "--checkpoint.every_n_train_steps", 2, "--model.frozen_dtype", frozen,
            "--model.optimizer.init_args.lr", 1e-2, *extra]


def test_the_pipelines_unet_behind_our_contract_is_that_unet(sd):
    net = PretrainedUNet(4, 8, 0, 32, folder=str(sd))
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(sd / "unet"), local_files_only=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([999, 10]), torch.randn(2, 16, 32)
    with torch.no_grad():  # the same module on the same inputs: the same numbers
        assert torch.equal(net(x, t, y), unet(x, t, encoder_hidden_states=y).sample)


def test_the_scheduler_config_sets_the_process(sd):
    config = json.loads((sd / "scheduler" / "scheduler_config.json").read_text())
    assert process_of(config) == {"process": "vp", "schedule": "scaled_linear", "timesteps": 1000,
                                  "prediction": "eps"}
    assert process_of({**config, "prediction_type": "v_prediction"})["prediction"] == "v"
    with pytest.raises(UserError, match="scaled_linear from 0.001 to 0.02"):
        process_of({**config, "beta_start": 0.001, "beta_end": 0.02})
    with pytest.raises(UserError, match="zero terminal SNR"):
        process_of({**config, "rescale_betas_zero_snr": True})
    ours = VP("scaled_linear").betas
    theirs = diffusers.DDPMScheduler.from_config(config).betas
    # diffusers squares a float32 linspace, ours a float64 one rounded to float32: the last bit apart
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert ours[0].item() == pytest.approx(0.00085) and ours[-1].item() == pytest.approx(0.012)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_our_ddim_with_guidance_draws_what_stable_diffusion_pipeline_draws(tmp_path, prediction):
    folder = write_tiny_sd(tmp_path, prediction)
    module = StableDiffusionModule(str(folder), image_size=16).eval()
    assert module.objective.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with module.sampling() as net:
        y = module.conditioning.condition([PROMPT, PROMPT])
        ours = sample(net, module.process, x_T, steps=5, spacing="trailing", labels=y, guidance_scale=4.0,
                      **module.sampler_kwargs())
        ours_images = (module.latent.decode(ours) / 2 + 0.5).clamp(0, 1)
    pipe = pipeline(folder)
    theirs = pipe(PROMPT, num_images_per_prompt=2, latents=x_T.clone(), num_inference_steps=5, guidance_scale=4.0,
                  output_type="latent").images
    theirs_images = pipe(PROMPT, num_images_per_prompt=2, latents=x_T.clone(), num_inference_steps=5,
                         guidance_scale=4.0, output_type="pt").images
    # The same five float32 DDIM steps, guided alike; diffusers keeps ᾱ as a float32 cumulative product where ours is
    # computed in float64 and rounded (a relative 1e-6 apart), which 5 steps carry into the latents' last digits.
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours_images, theirs_images, rtol=0, atol=1e-4)


def trained_and_frozen(module: StableDiffusionModule) -> dict:
    """Every tensor of the model, the frozen pretrained ones too (the state dict leaves those out)."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_lora_trains_the_adapters_alone_and_lowers_the_loss(sd, captioned):
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(0)
    data = DiffusionDataModule(ImageFolder(str(captioned)), image_size=16, channels=3, batch_size=8, num_workers=0,
                               val_fraction=0, captions=True)
    module = StableDiffusionModule(str(sd), image_size=16, lora_rank=4,
                                   optimizer=partial(torch.optim.AdamW, lr=1e-2))
    assert module.ema is None  # off by default with LoRA
    data.setup("fit")
    images, captions = next(iter(torch.utils.data.DataLoader(data.train_set, batch_size=8)))

    def fixed_loss() -> float:  # the same t and noise before and after: it moves only when the weights do
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            x0, y = module.latent.encode(images, generator), module.conditioning.condition(list(captions))
            return module.objective.loss(module.net, module.process, x0.repeat(8, 1, 1, 1), y.repeat(8, 1, 1),
                                         generator).item()

    before, weights = fixed_loss(), trained_and_frozen(module)
    Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False).fit(module, data)
    after, trained = fixed_loss(), trained_and_frozen(module)
    assert after < 0.95 * before, (before, after)
    changed = {name for name in weights if not torch.equal(weights[name], trained[name])}
    assert changed and all(".lora_" in name for name in changed)
    assert len(changed) == len([n for n in weights if ".lora_B." in n or ".lora_A." in n])  # every adapter moved


def state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_a_lora_checkpoint_holds_the_adapters_and_resumes_exactly(tmp_path, sd, captioned):
    run = partial(fit_args, tmp_path, sd, captioned, frozen="bfloat16")  # the config's bf16, and an EMA
    assert cli(*run("straight", "--model.ema", "true")).returncode == 0
    result = cli(*run("resumed", "--model.ema", "true", "--trainer.max_steps", 2))
    assert result.returncode == 0, result.stderr
    result = cli(*run("resumed", "--model.ema", "true", "--ckpt_path", "last"))
    assert result.returncode == 0, result.stderr

    straight = state(tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt")
    resumed = state(tmp_path / "runs" / "resumed" / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == 4
    net_keys = [k for k in straight["state_dict"] if k.startswith(("net.", "ema.module."))]
    assert net_keys and all(".lora_" in k for k in net_keys)  # the adapters and their EMA, not the frozen UNet
    assert set(straight["state_dict"]) == {*net_keys, "latent.scale", "ema.n_averaged"}
    adapters = sum(t.numel() for t in straight["state_dict"].values())
    unet = sum(p.numel() for p in diffusers.UNet2DConditionModel.from_pretrained(str(sd / "unet")).parameters())
    assert adapters < unet / 10
    for key, value in straight["state_dict"].items():  # the same code twice on this machine: the same bits
        assert torch.equal(value, resumed["state_dict"][key]), key
    moments = (run["optimizer_states"][0]["state"].values() for run in (straight, resumed))
    for a, b in zip(*moments):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_diffusers_loads_the_export_and_draws_what_our_sample_draws(tmp_path, sd, captioned, kind):
    extra = (["--model.lora_alpha", 8, "--model.cache_latents", "true"] if kind == "lora" else
             ["--model.lora_rank", "null", "--model.optimizer.init_args.lr", 1e-3])  # full: with its EMA
    result = cli(*fit_args(tmp_path, sd, captioned, kind, *extra))
    assert result.returncode == 0, result.stderr
    ckpt, out = tmp_path / "runs" / kind / "checkpoints" / "last.ckpt", tmp_path / "export"
    result = cli("export", "--ckpt_path", ckpt, "--out", out)
    assert result.returncode == 0, result.stderr
    assert (out / "README.md").is_file()
    result = cli("sample", "--ckpt_path", ckpt, "--prompt", PROMPT, "--num_samples", 2, "--steps", 5,
                 "--spacing", "trailing", "--guidance_scale", 4, "--seed", 0, "--out", tmp_path / "ours.npz")
    assert result.returncode == 0, result.stderr
    ours = np.load(tmp_path / "ours.npz")["arr_0"].astype(int)  # uint8 NHWC

    if kind == "lora":
        assert (out / "pytorch_lora_weights.safetensors").is_file()
        pipe = pipeline(sd, lora=out)
    else:
        assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        pipe = pipeline(out)
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # what `sample --seed 0` drew first

    def draw(pipe) -> np.ndarray:
        images = pipe(PROMPT, num_images_per_prompt=2, latents=x_T.clone(), num_inference_steps=5,
                      guidance_scale=4.0, output_type="pt").images
        return to_uint8(images * 2 - 1).permute(0, 2, 3, 1).numpy().astype(int)

    theirs, original = draw(pipe), draw(pipeline(sd))
    # Rounded to 8 bits after the same float32 steps (see the DDIM test): at most one grey level apart.
    assert np.abs(theirs - ours).max() <= 1
    assert np.abs(original - ours).max() > 4  # and the fine-tune changed the pictures


def test_gradient_checkpointing_bf16_and_cached_text_change_little(sd, captioned):
    data = DiffusionDataModule(ImageFolder(str(captioned)), image_size=16, channels=3, batch_size=8, num_workers=0,
                               val_fraction=0, captions=True)
    data.setup("fit")
    images, captions = next(iter(torch.utils.data.DataLoader(data.train_set, batch_size=8)))

    def loss_and_grads(**switches) -> tuple[float, list]:
        module = StableDiffusionModule(str(sd), image_size=16, lora_rank=4, **switches).train()
        for p in module.trained_parameters():  # LoRA's B starts at 0: move it, so the gradients reach every weight
            torch.nn.init.normal_(p, std=0.1)
        x0 = module.latent.encode(images, torch.Generator().manual_seed(0))
        y = module.conditioning.condition(list(captions), ema=False)
        loss = module.objective.loss(module.net, module.process, x0, y, torch.Generator().manual_seed(1))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in module.trained_parameters()], module

    torch.manual_seed(0)
    plain, plain_grads, _ = loss_and_grads()
    torch.manual_seed(0)
    checkpointed, grads, _ = loss_and_grads(gradient_checkpointing=True)
    assert checkpointed == plain  # the activations are recomputed by the same kernels
    for a, b in zip(plain_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.manual_seed(0)
    cached, grads, module = loss_and_grads(cache_text=True)
    assert set(module.conditioning.text_cache) == set(captions)
    encoded = []
    module.conditioning.frozen["encoder"].register_forward_hook(lambda m, args, out: encoded.append(len(args[0])))
    module.conditioning.condition(["a red square", "a green square", "a red square"], ema=False)
    assert encoded == [1]  # the one caption not seen before
    # The captions were encoded once each instead of as a batch of 8: the features are equal to float32 rounding.
    assert cached == pytest.approx(plain, rel=1e-5)
    torch.manual_seed(0)
    half, grads, module = loss_and_grads(frozen_dtype="bfloat16")
    assert module.latent.vae.dtype == module.net.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.trained_parameters())
    # bf16 keeps 8 bits of mantissa (a relative 0.4%) in every frozen weight and activation of the VAE, the text
    # encoder and the UNet: the loss moves by about that, the gradients a little more.
    assert half == pytest.approx(plain, rel=3e-2)
    cosine = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]),
                                                   torch.cat([g.flatten() for g in plain_grads]), dim=0)
    assert cosine > 0.95


def test_bad_pretrained_folders_and_lora_settings_are_one_error_line(tmp_path, sd, captioned):
    wrong_unet = tmp_path / "wrong"
    shutil.copytree(sd, wrong_unet)
    config = json.loads((wrong_unet / "unet" / "config.json").read_text())
    (wrong_unet / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    sdxl, mixed = tmp_path / "sdxl", tmp_path / "mixed"
    for folder, change in ((sdxl, {"addition_embed_type": "text_time"}), (mixed, {"cross_attention_dim": 64})):
        shutil.copytree(sd, folder)
        (folder / "unet" / "config.json").write_text(json.dumps({**config, **change}))
    cases = {
        "not a Stable Diffusion pipeline folder": ["--model.pretrained", captioned],
        "SDXL's pooled text": ["--model.pretrained", sdxl],
        "mixes parts of different models": ["--model.pretrained", mixed],
        "lora_alpha must be positive": ["--model.lora_alpha", 0],
        "not the UNet2DConditionModel": ["--model.pretrained", wrong_unet],
        "lora_rank must be at least 1": ["--model.lora_rank", 0],
        "name no module of the UNet": ["--model.lora_targets", "[to_q, to_nothing]"],
    }
    for message, args in cases.items():
        result = cli(*fit_args(tmp_path, sd, captioned, "bad", *args))
        assert result.returncode == 2, (message, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (message, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_a_lora_ema_averages_the_adapters_and_shares_the_frozen_weights(sd):
    module = StableDiffusionModule(str(sd), image_size=16, lora_rank=4, ema=True, ema_decay=0.5, ema_warmup=False)
    net, ema = dict(module.net.named_parameters()), dict(module.ema.module.named_parameters())
    assert net.keys() == ema.keys()
    frozen = [name for name, p in net.items() if not p.requires_grad]
    assert frozen and all(ema[name] is net[name] for name in frozen)  # one copy of the frozen weights
    for p in module.trained_parameters():
        p.data.add_(1.0)
    module.ema.update_parameters(module.net)  # the first update copies, the second averages
    for p in module.trained_parameters():
        p.data.add_(1.0)
    module.ema.update_parameters(module.net)
    for name in net:
        if name in frozen:
            continue
        torch.testing.assert_close(ema[name], net[name] - 0.5)  # 0.5 (x + 1) + 0.5 (x + 2) = (x + 2) - 0.5
    state = module.state_dict()
    assert all(".lora_" in k for k in state if k.startswith("ema.") and k != "ema.n_averaged")
    del state[next(k for k in state if k.startswith("net.") and ".lora_B." in k)]
    with pytest.raises(UserError, match="Missing key"):  # the frozen weights are filled in, a missing adapter is not
        module.load_state_dict(state)


def test_the_memory_benchmark_counts_what_each_switch_saves(capsys, monkeypatch, sd):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import sd_memory

    monkeypatch.setattr(sys, "argv", ["sd_memory.py", "--pretrained", str(sd)])
    sd_memory.main()
    rows = {row["setting"]: row for row in json.loads(capsys.readouterr().out.splitlines()[-1])["rows"]}
    full, lora = rows["full, float32"], rows["LoRA 4, float32"]
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(sd / "unet"))
    assert full["trained_parameters"] == sum(p.numel() for p in unet.parameters())
    # LoRA of rank r on a linear layer of n inputs and m outputs: r (n + m) parameters
    targets = [m for name, m in unet.named_modules() if name.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert lora["trained_parameters"] == sum(4 * (m.in_features + m.out_features) for m in targets)
    assert lora["gradients"] == 4 * lora["trained_parameters"] and full["ema"] == full["gradients"]
    assert rows["full, float32, checkpointing"]["activations"] < full["activations"]
    assert (rows["LoRA 4, bf16 frozen, checkpointing"]["activations"] < rows["LoRA 4, bf16 frozen"]["activations"]
            < lora["activations"])
    assert rows["LoRA 4, bf16 frozen"]["weights"] < 0.6 * lora["weights"]
