"""diffusers at the border: our UNet as diffusers' `UNet2DModel` and back (one table of tensor names), our processes
as diffusers' schedulers, a pipeline folder that `DiffusionPipeline.from_pretrained` loads (`export`), and the
weights of a `UNet2DModel` folder loaded into our UNet (`InitFrom`).

Both networks are DDPM's UNet; `UNet2DModel` expresses ours with `flip_sin_to_cos` and `freq_shift` (the
timestep embedding's order and frequencies), `downsample_padding`, `norm_eps` and single-head attention
(`attention_head_dim=None`), all of which our UNet takes too. Our attention keeps q, k and v in one 1x1
convolution; diffusers keeps three linear layers: the table splits and joins them.
"""

import inspect
import json
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch import Tensor

from diffusion_lit.errors import UserError, reason, say
from diffusion_lit.loading import start_from_checkpoint
from diffusion_lit.process import VP
from diffusion_lit.schedule import cosine_betas, linear_betas, scaled_linear_betas
from diffusion_lit.text import need
from diffusion_lit.trust import diffusers_pickle_refusal, refused_pickle
from diffusion_lit.unet import AttnBlock, Downsample, ResBlock, UNet, Upsample

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # ours -> diffusers' prediction_type
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


def scheduler_for(module):
    """The diffusers scheduler of a model's process and prediction, with the same betas as ours (checked), or a
    UserError for what diffusers' schedulers cannot express."""
    diffusers = need("diffusers")
    schedule, prediction, kind = module.process, module.objective.prediction, module.process.spec()["process"]
    if kind not in ("vp", "flow"):
        raise UserError(f"a {type(schedule).__name__} process has no diffusers scheduler: export writes VP and flow "
                        "models only")
    if kind == "flow":
        if prediction != "v":
            raise UserError(f"a flow model predicting {prediction} has no diffusers scheduler (FlowMatch schedulers "
                            "take the velocity): only v-prediction flow models export")
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=schedule.timesteps, shift=schedule.shift)
    # diffusers' linear betas are a float32 linspace, ours a float64 one rounded to float32: a last bit apart at
    # some t. Written out as trained_betas they are ours exactly (beta_schedule then only names them).
    betas = {"linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                        "trained_betas": schedule.betas.cpu().tolist()},
             "cosine": {"beta_schedule": "squaredcos_cap_v2"},
             "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                               "trained_betas": schedule.betas.cpu().tolist()}}[schedule.kind]
    # DDIM on `trailing` timesteps is our `--spacing trailing`; the last step lands on x0 (set_alpha_to_one).
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=schedule.timesteps, prediction_type=PREDICTION_TYPES[
        prediction], clip_sample=True, clip_sample_range=1.0, variance_type="fixed_small", timestep_spacing="trailing",
        **betas)
    if not torch.equal(scheduler.betas.float(), schedule.betas.cpu()):
        gap = (scheduler.betas.float() - schedule.betas.cpu()).abs().max().item()
        raise UserError(f"diffusers' {betas['beta_schedule']} betas differ from this model's by up to {gap:.2g}: "
                        "no exact scheduler for it, so nothing was exported")
    return scheduler


def process_of(scheduler_config: dict) -> dict:
    """What a diffusers scheduler config says of the process: our `process`, `schedule`, `timesteps` and
    `prediction` (a UserError for one we cannot train)."""
    name = scheduler_config.get("_class_name", "")
    if name.startswith("FlowMatch"):
        return {"process": "flow", "prediction": "v"}
    if scheduler_config.get("rescale_betas_zero_snr"):
        raise UserError("the scheduler rescales its betas to zero terminal SNR (rescale_betas_zero_snr), a schedule "
                        "diffusion_lit does not train with")
    kinds = {"linear": "linear", "squaredcos_cap_v2": "cosine", "scaled_linear": "scaled_linear"}
    ends = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}  # the (beta_start, beta_end) we train with
    kind = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("trained_betas") is not None:  # which of our schedules they are, if any
        given = torch.tensor(scheduler_config["trained_betas"], dtype=torch.float64)
        timesteps = len(given)
        kind = next((name for name, ours in (("linear", linear_betas(timesteps)),
                                             ("squaredcos_cap_v2", cosine_betas(timesteps)),
                                             ("scaled_linear", scaled_linear_betas(timesteps)))
                     if torch.allclose(given, ours, rtol=1e-6, atol=0)), "trained_betas")
    elif kind in ends and (scheduler_config.get("beta_start", 1e-4 if kind == "linear" else None),
                           scheduler_config.get("beta_end", 0.02 if kind == "linear" else None)) != ends[kind]:
        kind = f"{kind} from {scheduler_config.get('beta_start')} to {scheduler_config.get('beta_end')}"
    if kind not in kinds:
        raise UserError(f"the scheduler's betas ({kind}) are not a schedule diffusion_lit trains with (DDPM's linear "
                        "1e-4 to 0.02, cosine, or Stable Diffusion's scaled_linear 0.00085 to 0.012)")
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}.get(scheduler_config.get("prediction_type", "epsilon"))
    if prediction is None:
        raise UserError(f"prediction_type {scheduler_config.get('prediction_type')!r} is not one of ours "
                        f"({', '.join(PREDICTION_TYPES.values())})")
    timesteps = (len(scheduler_config["trained_betas"]) if scheduler_config.get("trained_betas") is not None
                 else scheduler_config.get("num_train_timesteps", 1000))
    return {"process": "vp", "schedule": kinds[kind], "timesteps": timesteps, "prediction": prediction}


def vp_of(scheduler_config: dict, what: str) -> tuple[VP, str]:
    """(the VP process, the prediction) of a pipeline's scheduler config; a UserError naming `what` for a
    flow-matching one."""
    found = process_of(scheduler_config)
    if found["process"] != "vp":
        raise UserError(f"{what}: a flow-matching scheduler; SD 1.x / 2.x's are VP schedulers")
    return VP(found["schedule"], found["timesteps"]), found["prediction"]


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
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        if refused_pickle(err):  # diffusers says only "Unable to load weights"; torch's advice: never passed on
            raise diffusers_pickle_refusal(f"InitFrom {spec}", "UNet2DModel", folder) from None
        raise UserError(f"InitFrom {spec}: its weights could not be read ({reason(err)}); a folder written by "
                        "save_pretrained holds diffusion_pytorch_model.safetensors") from None
    try:
        net.load_state_dict(from_diffusers(net, unet.state_dict()))
    except KeyError as err:
        raise UserError(f"InitFrom {spec}: the UNet2DModel has no tensor {err} that our UNet needs") from None
    scheduler = folder.parent / "scheduler" / "scheduler_config.json" if folder.name == "unet" else None
    if scheduler is not None and scheduler.is_file():
        return read_json(scheduler)
    return None


def read_json(path: Path) -> dict:
    """A diffusers config file; a UserError naming it when it cannot be read as a JSON object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} cannot be read as a diffusers config ({reason(err)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a diffusers config (a JSON object)")
    return value


class InitFrom(Callback):
    """Starts a new run from the weights of a local diffusers `UNet2DModel` (a folder written by save_pretrained, or
    a pipeline folder with `unet/`), loaded into the UNet and its EMA copy after checking that the plans match and
    that the pipeline's scheduler (when there is one) is the model's process and prediction; or from a `fit`
    checkpoint (a .ckpt file) of the same kind of model, its EMA weights, to tune it (a flow model can start a
    MeanFlow one: `loading.start_from_checkpoint`). A resumed run keeps its own weights.

    Args:
        path: the UNet2DModel or pipeline folder, or a checkpoint file.
    """

    def __init__(self, path: str) -> None:
        self.path = str(Path(path).expanduser().resolve())

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is not None:
            return
        if Path(self.path).is_file() or self.path.endswith(".ckpt"):  # a missing one is said as a checkpoint
            return start_from_checkpoint(pl_module, self.path)
        if not isinstance(pl_module.net, UNet):
            raise UserError(f"InitFrom loads a UNet2DModel into diffusion_lit's UNet; this model's net is a "
                            f"{type(pl_module.net).__name__}")
        scheduler = load_unet_weights(pl_module.net, self.path)
        if scheduler is not None:
            ours = pl_module.process.spec() | {"prediction": pl_module.objective.prediction}
            for key, value in process_of(scheduler).items():
                if ours.get(key, value) != value:
                    raise UserError(f"InitFrom {self.path}: its scheduler says {key} {value!r} and this model has "
                                    f"{ours[key]!r}: give the model that process and objective")
        if pl_module.ema is not None:
            pl_module.ema.module.load_state_dict(pl_module.net.state_dict())
        say(f"InitFrom: the UNet starts from {self.path}")
