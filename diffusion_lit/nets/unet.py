"""The DDPM UNet (Ho et al. 2020): eps = unet(x_t, t, y), with class labels or, through cross-attention, text
features as y. It knows nothing about betas or sampling."""

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lit.core.errors import UserError


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = False,
                       freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps, [B] -> [B, dim] (Transformer positional encoding): sines then
    cosines (cosines first with flip_sin_to_cos) at frequencies max_period^(-i / (dim/2 - freq_shift)); in float32,
    or float64 for float64 times (finite differences in t need it)."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=dtype) / (half - freq_shift)
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t.to(dtype)[:, None] * freqs[None]
    waves = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    return F.pad(torch.cat(waves, dim=1), (0, dim % 2))


def split_times(t: Tensor, pair: bool) -> tuple[Tensor, Tensor | None]:
    """(t, the interval's length) for a network that takes two times (`pair`): t [B, 2] holds both, and a single
    time [B] means the interval 0 (MeanFlow's u(z, t, t) is the velocity at t). Without `pair`: (t, None)."""
    if not pair:
        return t, None
    if t.ndim == 1:
        return t, torch.zeros_like(t)
    if t.ndim != 2 or t.shape[-1] != 2:
        raise ValueError(f"this network takes a time [B] or two times per image [B, 2] (t and an interval's length "
                         f"t - r, on t's scale), got a tensor of shape {list(t.shape)}")
    return t[:, 0], t[:, 1]


def null_labels(num_classes: int, like: Tensor) -> Tensor:
    """The "null" label (index num_classes) for every item of a batch shaped like `like` [B]."""
    return torch.full(like.shape, num_classes, dtype=torch.long, device=like.device)


def text_context(context_dim: int, y: Tensor | None) -> Tensor | None:
    """The text features a text-conditioned network attends to (a ValueError when they are missing)."""
    if context_dim and (y is None or y.ndim != 3 or y.shape[-1] != context_dim):
        raise ValueError(f"this network attends to text features [B, L, {context_dim}]: encode the prompts (the empty "
                         "prompt for an unconditional pass) and give them as y")
    return y if context_dim else None


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias so the residual branch it ends starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map."""

    def __init__(self, ch: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        # The transposed output is laid out channels-last; in x's layout instead, or the 1x1 convolution returns its
        # weight's gradient in channels-last strides, and DDP copies it into its bucket with a warning on every run.
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w).contiguous(memory_format=layout))


class CrossAttention(nn.Module):
    """Tokens [B, N, dim] attend to text features [B, L, context_dim]; the output projection starts at zero."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = zero_init(nn.Linear(dim, dim))

    def attend(self, x: Tensor, context: Tensor) -> Tensor:
        split = lambda z: z.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731 [B, N, D] -> [B, h, N, D/h]
        q, (k, v) = split(self.q(x)), map(split, self.kv(context).chunk(2, dim=-1))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class CrossAttnBlock(CrossAttention):
    """The pixels of a feature map attend to text features (SD's cross-attention), as a residual branch."""

    def __init__(self, ch: int, context_dim: int, groups: int, head_channels: int = 32, eps: float = 1e-5) -> None:
        super().__init__(ch, context_dim, max(1, ch // head_channels) if ch % head_channels == 0 else 1)
        self.norm = nn.GroupNorm(groups, ch, eps)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        out = self.attend(self.norm(x).flatten(2).transpose(1, 2), context)  # [B, HW, C]
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """A stride-2 convolution; padding 0 pads right and bottom only (TensorFlow's "SAME", the DDPM paper's code)."""

    def __init__(self, ch: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The epsilon-prediction UNet of DDPM.

    The first three arguments come from the data and the model (the CLI links them); the rest are the architecture.

    Args:
        in_channels: image channels (1 for MNIST, 3 for CIFAR-10).
        image_size: image height and width; must halve evenly at every level but the last.
        num_classes: 0 for an unconditional network; otherwise labels 0..num_classes-1 are embedded and added to the
            timestep embedding, and label num_classes is the "null" class of classifier-free guidance.
        base_channels: channels of the first level; level i has base_channels * channel_mult[i].
        channel_mult: one multiplier per resolution level.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map sizes (e.g. 16) at which self-attention follows each block.
        dropout: dropout inside the residual blocks.
        norm_groups: GroupNorm groups; every level's channel count must be divisible by it.
        context_dim: width of the text features y [B, L, context_dim] the network attends to (set by the model when
            it has a text encoder; 0: none).
        cross_attention_resolutions: feature-map sizes at which cross-attention to the text follows each block (and
            always in the middle); by default every size but the full one.
        norm_eps: the GroupNorms' epsilon (the DDPM paper's models: 1e-6).
        downsample_padding: 1, or 0 for right-and-bottom padding (the DDPM paper's models).
        flip_sin_to_cos: the timestep embedding's cosines first.
        freq_shift: its frequencies max_period^(-i / (half - freq_shift)) (the DDPM paper's models: 1).
        interval_input: take two times per image, t [B, 2]: the time and an interval's length t - r (set by the
            model when its objective needs it: MeanFlow), the second embedded by a network of its own and added.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int = 0,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        norm_groups: int = 32,
        context_dim: int = 0,
        cross_attention_resolutions: Sequence[int] | None = None,
        norm_eps: float = 1e-5,
        downsample_padding: int = 1,
        flip_sin_to_cos: bool = False,
        freq_shift: float = 0.0,
        interval_input: bool = False,
    ) -> None:
        super().__init__()
        # The architecture, as diffusers_io reads it (UNet2DModel's config).
        self.plan = {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes,
                     "base_channels": base_channels, "channel_mult": list(channel_mult),
                     "num_res_blocks": num_res_blocks, "attention_resolutions": list(attention_resolutions),
                     "dropout": dropout, "norm_groups": norm_groups, "context_dim": context_dim, "norm_eps": norm_eps,
                     "downsample_padding": downsample_padding, "flip_sin_to_cos": flip_sin_to_cos,
                     "freq_shift": freq_shift}
        if downsample_padding not in (0, 1):
            raise UserError(f"downsample_padding must be 0 or 1, got {downsample_padding}")
        resolutions = [image_size // 2**i for i in range(len(channel_mult))]
        if image_size % 2 ** (len(channel_mult) - 1):
            raise UserError(
                f"image_size {image_size} cannot be halved {len(channel_mult) - 1} times "
                f"for channel_mult {list(channel_mult)}: use fewer levels or resize the images"
            )
        if missing := set(attention_resolutions) - set(resolutions):
            raise UserError(
                f"attention_resolutions {sorted(missing)} are not feature-map sizes of this network ({resolutions})"
            )
        cross = resolutions[1:] if cross_attention_resolutions is None else cross_attention_resolutions
        if missing := set(cross) - set(resolutions):
            raise UserError(
                f"cross_attention_resolutions {sorted(missing)} are not feature-map sizes of this network ({resolutions})"
            )
        if bad := [base_channels * m for m in channel_mult if (base_channels * m) % norm_groups]:
            raise UserError(f"channel counts {bad} are not divisible by norm_groups={norm_groups}")

        temb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        # Only a network that takes an interval has this layer: the others keep their parameters and names.
        self.interval_mlp = nn.Sequential(
            nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        ) if interval_input else None
        self.num_classes, self.context_dim = num_classes, context_dim
        self.class_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(in_ch: int, out_ch: int, res: int) -> nn.ModuleList:
            layers = [ResBlock(in_ch, out_ch, temb_dim, dropout, norm_groups, norm_eps)]
            if res in attention_resolutions:
                layers.append(AttnBlock(out_ch, norm_groups, norm_eps))
            if context_dim and res in cross:
                layers.append(CrossAttnBlock(out_ch, context_dim, norm_groups, eps=norm_eps))
            return nn.ModuleList(layers)

        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions)):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, base_channels * mult, res))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch, downsample_padding)]))
                skip_channels.append(ch)

        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, temb_dim, dropout, norm_groups, norm_eps),
                AttnBlock(ch, norm_groups, norm_eps),
                *([CrossAttnBlock(ch, context_dim, norm_groups, eps=norm_eps)] if context_dim else []),
                ResBlock(ch, ch, temb_dim, dropout, norm_groups, norm_eps),
            ]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            out_ch = base_channels * channel_mult[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skip_channels.pop(), out_ch, resolutions[level]))
                ch = out_ch
            if level > 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))

        self.norm_out = nn.GroupNorm(norm_groups, ch, norm_eps)
        self.conv_out = zero_init(nn.Conv2d(ch, in_channels, 3, padding=1))

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, temb: Tensor, context: Tensor | None) -> Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, temb)
            elif isinstance(layer, CrossAttnBlock):
                h = layer(h, context)
            else:
                h = layer(h)
        return h

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        plan = self.plan
        t, interval = split_times(t, self.interval_mlp is not None)
        embed = partial(timestep_embedding, dim=self.base_channels, flip_sin_to_cos=plan["flip_sin_to_cos"],
                        freq_shift=plan["freq_shift"])
        temb = self.time_mlp(embed(t).to(x_t.dtype))
        if interval is not None:
            temb = temb + self.interval_mlp(embed(interval).to(x_t.dtype))
        if self.class_emb is not None:
            temb = temb + self.class_emb(null_labels(self.num_classes, t) if y is None else y)
        context = text_context(self.context_dim, y)
        h = self.conv_in(x_t)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, temb, context)
            skips.append(h)
        h = self._run(self.mid, h, temb, context)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layers, h, temb, context)
        return self.conv_out(F.silu(self.norm_out(h)))
