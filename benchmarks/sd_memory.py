"""What Stable Diffusion fine-tuning holds in memory: the weights (frozen and trained, at their precision); the
gradients, AdamW's two moments and the EMA (full fine-tuning's default) of the trained ones; and the activations a
training step keeps for its backward pass (every tensor autograd saves but the weights, each once). For full
fine-tuning and for LoRA, with and without gradient checkpointing and bf16 frozen weights.

    python benchmarks/sd_memory.py                      # measured: the tests' tiny pipeline on 16x16 images
    python benchmarks/sd_memory.py --pretrained SD_FOLDER --image_size 512
    python benchmarks/sd_memory.py --sd15               # estimated: SD 1.5's plan on the meta device

With --sd15 nothing is downloaded or allocated: SD 1.5's UNet, VAE and CLIP text model are built from their
published configurations on PyTorch's meta device, which has shapes but no data; the parameter counts are exact
and the activations are what autograd would save for that plan, an estimate of a GPU's use that leaves out its
allocator's overhead, the CUDA context and the temporary buffers of each kernel. Attention runs as PyTorch's math
kernel there, which keeps every attention map for the backward pass; the flash and memory-efficient kernels a GPU
picks keep far less, so the activations are an upper bound. Prints a table, then one JSON line.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from diffusion_lit.core.files import size_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def saved_bytes(step, weights: list[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for the backward pass while `step()` runs, each storage once, leaving out
    the `weights` (and views of them: a layer saves its weight too, which the weights' column already counts)."""
    seen, total = {id(w) for w in weights}, 0

    def pack(tensor):
        nonlocal total
        base = tensor if tensor._base is None else tensor._base  # a view counts as the tensor it views
        # meta tensors have no storage to tell them apart: their (base's) identity serves
        key = (tensor.untyped_storage().data_ptr(), tensor.device.type) if tensor.device.type != "meta" else id(base)
        if key not in seen and id(base) not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return total


def account(unet, vae, text, lora_rank: int | None, frozen: torch.dtype, checkpointing: bool, latent: tuple,
            context: tuple) -> dict:
    """The memory of one setting, in bytes: weights, gradients and optimizer state, activations."""
    from diffusion_lit.model.stable_diffusion import SD_TARGETS, add_lora

    if lora_rank is not None:
        add_lora(unet, lora_rank, lora_rank, SD_TARGETS)
    trained = [p for p in unet.parameters() if p.requires_grad] if lora_rank is not None else list(unet.parameters())
    for module in (vae, text, *([unet] if lora_rank is not None else [])):
        for p in module.parameters():
            if not p.requires_grad or module is not unet:
                p.data = p.data.to(frozen)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    device = next(unet.parameters()).device
    x = torch.randn(*latent, device=device, dtype=unet.conv_in.weight.dtype)
    y = torch.randn(*context, device=device, dtype=unet.conv_in.weight.dtype)
    t = torch.full((latent[0],), 500, device=device)
    weights = sum(p.numel() * p.element_size() for m in (unet, vae, text) for p in m.parameters())
    trained_bytes = sum(p.numel() * 4 for p in trained)
    return {"trained_parameters": sum(p.numel() for p in trained), "weights": weights,
            "gradients": trained_bytes, "adamw": 2 * trained_bytes, "ema": trained_bytes if lora_rank is None else 0,
            "activations": saved_bytes(lambda: unet(x, t, encoder_hidden_states=y).sample.float().pow(2).mean(),
                                       list(unet.parameters()))}


def build(args):
    """(unet, vae, text encoder) builders and the latent and text-feature shapes of one training batch."""
    import diffusers
    import transformers

    if args.sd15:
        def parts():
            with torch.device("meta"):
                return (diffusers.UNet2DConditionModel(**SD15_UNET), diffusers.AutoencoderKL(**SD15_VAE),
                        transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT)))
        size, width, length = args.image_size // 8, 768, 77
        return parts, (args.batch_size, 4, size, size), (args.batch_size, length, width), "SD 1.5 (estimated)"
    folder = args.pretrained
    if folder is None:
        from test_stable_diffusion import write_tiny_sd

        folder = write_tiny_sd(Path(tempfile.mkdtemp()))

    def parts():
        return (diffusers.UNet2DConditionModel.from_pretrained(str(Path(folder) / "unet")),
                diffusers.AutoencoderKL.from_pretrained(str(Path(folder) / "vae")),
                transformers.CLIPTextModel.from_pretrained(str(Path(folder) / "text_encoder")))
    unet, vae, text = parts()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = args.image_size // factor
    latent = (args.batch_size, unet.config.in_channels, size, size)
    context = (args.batch_size, text.config.max_position_embeddings, text.config.hidden_size)
    return parts, latent, context, f"{folder} (measured)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", help="a local SD pipeline folder (default: the tests' tiny one)")
    parser.add_argument("--sd15", action="store_true", help="estimate SD 1.5's on the meta device")
    parser.add_argument("--image_size", type=int, default=None, help="default: 16, or 512 with --sd15")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--lora_rank", type=int, default=4)
    args = parser.parse_args()
    args.image_size = args.image_size or (512 if args.sd15 else 16)
    parts, latent, context, name = build(args)
    settings = [("full, float32", None, torch.float32, False),
                ("full, float32, checkpointing", None, torch.float32, True),
                (f"LoRA {args.lora_rank}, float32", args.lora_rank, torch.float32, False),
                (f"LoRA {args.lora_rank}, bf16 frozen", args.lora_rank, torch.bfloat16, False),
                (f"LoRA {args.lora_rank}, bf16 frozen, checkpointing", args.lora_rank, torch.bfloat16, True)]
    print(f"{name}: batch {args.batch_size} of {args.image_size}x{args.image_size} images, latents {latent[1:]}")
    print("| setting | trained parameters | weights | gradients, AdamW, EMA | activations | total |")
    print("|---|---|---|---|---|---|")
    rows = []
    for label, rank, frozen, checkpointing in settings:
        row = {"setting": label, **account(*parts(), rank, frozen, checkpointing, latent, context)}
        state = row["gradients"] + row["adamw"] + row["ema"]
        total = row["weights"] + state + row["activations"]
        rows.append({**row, "total": total})
        print(f"| {label} | {row['trained_parameters']:,} | {size_text(row['weights'])} | {size_text(state)} | "
              f"{size_text(row['activations'])} | {size_text(total)} |", flush=True)
    print(json.dumps({"model": name, "image_size": args.image_size, "batch_size": args.batch_size, "rows": rows}))


if __name__ == "__main__":
    main()
