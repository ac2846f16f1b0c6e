"""diffusers at the border: our UNet as diffusers' `UNet2DModel` and back (one table of tensor names), for a
pipeline folder that `DiffusionPipeline.from_pretrained` loads (`export`), and the weights of a `UNet2DModel` folder
loaded into our UNet (`InitFrom`); our processes as diffusers' schedulers are `diffusion_lit.model.schedulers`.

Both networks are DDPM's UNet; `UNet2DModel` expresses ours with `flip_sin_to_cos` and `freq_shift` (the
timestep embedding's order and frequencies), `downsample_padding`, `norm_eps` and single-head attention
(`attention_head_dim=None`), all of which our UNet takes too. Our attention keeps q, k and v in one 1x1
convolution; diffusers keeps three linear layers: the table splits and joins them.
"""

import inspect
from pathlib import Path

import torch
from torch import Tensor

from diffusion_lit.core.errors import UserError
from diffusion_lit.core.files import read_json
from diffusion_lit.core.optional import need
from diffusion_lit.core.trust import from_pretrained
from diffusion_lit.nets.unet import AttnBlock, Downsample, ResBlock, UNet, Upsample

RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
          "skip": "conv_shortcut"}
# UNet2DModel settings and the UNet option that sets each (for the message naming a mismatch)
NET = "model.net.init_args."
OPTIONS = {"in_channels": "--data.channels", "out_channels": "--data.channels", "sample_size": "--data.image_size",
           "block_out_channels": f"--{NET}base_channels and --{NET}channel_mult", "layers_per_block":
           f"--{NET}num_res_blocks", "down_block_types": f"--{NET}attention_resolutions", "up_block_types":
           f"--{NET}attention_resolutions", "norm_num_groups": f"--{NET}norm_groups", "norm_eps": f"--{NET}norm_eps",
           "downsample_padding": f"--{NET}downsample_padding", "flip_sin_to_cos": f"--{NET}flip_sin_to_cos",
           "freq_shift": f"--{NET}freq_shift", "num_class_embeds": "--model.conditioning Labels on data with that many classes"}


def unet2d_config(net: UNet) -> dict:
    """The `UNet2DModel` config of our UNet's plan; a UserError for what UNet2DModel cannot express."""
    plan = net.plan
    if plan["context_dim"]:
        raise UserError("a text model's UNet (cross-attention) has no UNet2DModel form: diffusers would need a "
                        "UNet2DConditionModel with a CLIP-style encoder, which this export does not write")
    size, mult = plan["image_size"], plan["channel_mult"]
    attention = [size // 2**i in plan["attention_resolutions"] for i in range(len(mult))]
    return {
        "sample_size": size, "in_channels": plan["in_channels"], "out_channels": plan["in_channels"],
        "block_out_channels": [plan["base_channels"] * m for m in mult], "layers_per_block": plan["num_res_blocks"],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "attention_head_dim": None, "norm_num_groups": plan["norm_groups"], "norm_eps": plan["norm_eps"],
        "dropout": plan["dropout"], "downsample_padding": plan["downsample_padding"],
        "flip_sin_to_cos": plan["flip_sin_to_cos"], "freq_shift": plan["freq_shift"],
        "num_class_embeds": plan["num_classes"] + 1 if plan["num_classes"] else None,  # + the null class
        "time_embedding_type": "positional", "act_fn": "silu", "center_input_sample": False,
        "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default", "class_embed_type": None,
        "add_attention": True, "downsample_type": "conv", "upsample_type": "conv", "time_embedding_dim": None,
        "attn_norm_num_groups": None, "mid_block_type": "UNetMidBlock2D",
    }


def name_table(net: UNet) -> list[tuple[str, str, str]]:
    """(our module, diffusers' module, kind) for every module with weights; kind is ``copy``, ``qkv`` (our one
    convolution, their to_q / to_k / to_v) or ``proj`` (a 1x1 convolution, their linear to_out.0)."""
    table = [("time_mlp.0", "time_embedding.linear_1", "copy"), ("time_mlp.2", "time_embedding.linear_2", "copy"),
             ("conv_in", "conv_in", "copy"), ("norm_out", "conv_norm_out", "copy"), ("conv_out", "conv_out", "copy")]
    if net.class_emb is not None:
        table.append(("class_emb", "class_embedding", "copy"))

    def resnet(ours: str, theirs: str, layer: ResBlock) -> None:
        table.extend((f"{ours}.{a}", f"{theirs}.{b}", "copy") for a, b in RESNET.items()
                     if a != "skip" or not isinstance(layer.skip, torch.nn.Identity))

    def attention(ours: str, theirs: str) -> None:
        table.extend([(f"{ours}.norm", f"{theirs}.group_norm", "copy"), (f"{ours}.qkv", theirs, "qkv"),
                      (f"{ours}.proj", f"{theirs}.to_out.0", "proj")])

    def block(ours: str, theirs: str, j: int, layers) -> None:
        for k, layer in enumerate(layers):
            if isinstance(layer, ResBlock):
                resnet(f"{ours}.{k}", f"{theirs}.resnets.{j}", layer)
            elif isinstance(layer, AttnBlock):
                attention(f"{ours}.{k}", f"{theirs}.attentions.{j}")
            else:
                raise UserError(f"{type(layer).__name__} has no UNet2DModel counterpart")

    for part, blocks in (("down", net.down), ("up", net.up)):
        level, j = 0, 0
        for i, layers in enumerate(blocks):
            if isinstance(layers[0], (Downsample, Upsample)):
                sampler = "downsamplers" if part == "down" else "upsamplers"
                table.append((f"{part}.{i}.0.conv", f"{part}_blocks.{level}.{sampler}.0.conv", "copy"))
                level, j = level + 1, 0
            else:
                block(f"{part}.{i}", f"{part}_blocks.{level}", j, layers)
                j += 1
    resnet("mid.0", "mid_block.resnets.0", net.mid[0])
    attention("mid.1", "mid_block.attentions.0")
    resnet("mid.2", "mid_block.resnets.1", net.mid[2])
    return table


def to_diffusers(net: UNet, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our UNet's state dict (its own keys) as a UNet2DModel's."""
    out = {}
    for ours, theirs, kind in name_table(net):
        for p in ("weight", "bias"):
            value = state[f"{ours}.{p}"]
            if kind == "qkv":
                for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                    out[f"{theirs}.{name}.{p}"] = part.flatten(1) if p == "weight" else part
            else:
                out[f"{theirs}.{p}"] = value.flatten(1) if kind == "proj" and p == "weight" else value
            if kind == "copy" and ours == "class_emb":
                break  # an embedding has no bias
    return out


def from_diffusers(net: UNet, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A UNet2DModel's state dict as our UNet's (its own keys)."""
    out = {}
    for ours, theirs, kind in name_table(net):
        for p in ("weight", "bias"):
            if kind == "qkv":
                value = torch.cat([state[f"{theirs}.{name}.{p}"] for name in ("to_q", "to_k", "to_v")])
                out[f"{ours}.{p}"] = value[:, :, None, None] if p == "weight" else value
            elif kind == "proj" and p == "weight":
                out[f"{ours}.{p}"] = state[f"{theirs}.{p}"][:, :, None, None]
            else:
                out[f"{ours}.{p}"] = state[f"{theirs}.{p}"]
            if ours == "class_emb":
                break
    return out


def unet_folder(path: Path) -> Path:
    """The folder with a UNet2DModel's config.json: the one given, or its `unet/` (a pipeline folder)."""
    if not path.is_dir():
        raise UserError(f"InitFrom {path}: no such folder; give a UNet2DModel folder or a pipeline folder with unet/")
    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise UserError(f"InitFrom {path}: no config.json there nor in unet/; give a folder written by "
                        "save_pretrained (a UNet2DModel's, or a pipeline's)")
    return folder


def load_unet_weights(net: UNet, spec: str) -> dict | None:
    """Loads a local UNet2DModel's weights (a folder, or a pipeline folder's unet/) into our UNet after checking that
    the plans match; returns its pipeline's scheduler config when there is one."""
    diffusers = need("diffusers")
    path = Path(spec).expanduser()
    folder = unet_folder(path)
    config = read_json(folder / "config.json")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"InitFrom {spec}: a {config['_class_name']}, not a UNet2DModel: only DDPM-style UNets load")
    defaults = {k: p.default for k, p in inspect.signature(diffusers.UNet2DModel.__init__).parameters.items()}
    for key, value in unet2d_config(net).items():
        if key == "dropout":
            continue  # a training setting, not the plan
        theirs = config.get(key, defaults.get(key))
        theirs = list(theirs) if isinstance(theirs, tuple) else theirs
        if theirs != value:
            option = OPTIONS.get(key)
            fix = f" (set it with {option})" if option else " (our UNet has no such variant)"
            raise UserError(f"InitFrom {spec}: the UNet's {key} is {theirs!r} there and {value!r} here{fix}; "
                            "the plans must match to load the weights")
    unet = from_pretrained(diffusers.UNet2DModel, folder, f"InitFrom {spec}", "its weights could not be read "
                           "({reason}); a folder written by save_pretrained holds diffusion_pytorch_model.safetensors")
    try:
        net.load_state_dict(from_diffusers(net, unet.state_dict()))
    except KeyError as err:
        raise UserError(f"InitFrom {spec}: the UNet2DModel has no tensor {err} that our UNet needs") from None
    scheduler = folder.parent / "scheduler" / "scheduler_config.json" if folder.name == "unet" else None
    if scheduler is not None and scheduler.is_file():
        return read_json(scheduler)
    return None
