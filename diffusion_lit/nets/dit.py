"""DiT (Peebles & Xie 2023): a transformer denoiser over image patches, eps = dit(x_t, t, y), y class labels or
text features (attended to after each block's self-attention, as PixArt-alpha does)."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lit.core.errors import UserError
from diffusion_lit.nets.unet import CrossAttention, null_labels, split_times, text_context, timestep_embedding, zero_init


def sincos_2d(grid_size: int, dim: int) -> Tensor:
    """Fixed 2D sine-cosine position embeddings [grid_size², dim]: half the channels for rows, half for columns."""
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    parts = [f(pos.flatten()[:, None] * freqs) for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention and MLP, each scaled, shifted and gated by the condition (adaLN-Zero): the identity at init."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, context_dim: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 6 * dim)))
        if context_dim:  # cross-attention to the text, starting as the identity
            self.cross_norm = nn.LayerNorm(dim, eps=1e-6)
            self.cross = CrossAttention(dim, context_dim, num_heads)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        b, n, d = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1[:, None] * self.proj(attn)
        if context is not None:
            x = x + self.cross.attend(self.cross_norm(x), context)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Diffusion transformer: patchify, transformer blocks conditioned on timestep (+ class), unpatchify.

    Same contract as the UNet: the first three arguments come from the data and the model (linked by the CLI).

    Args:
        in_channels: image channels.
        image_size: image height and width; a multiple of patch_size.
        num_classes: 0 for an unconditional network; otherwise label num_classes is the "null" class.
        patch_size: side of the square patches that become tokens.
        hidden_size: token width.
        depth: transformer blocks.
        num_heads: attention heads; hidden_size must be divisible by it (and by 4, for the position embedding).
        mlp_ratio: MLP width as a multiple of hidden_size.
        context_dim: width of the text features y [B, L, context_dim] (set by the model when it has a text encoder;
            0: none).
        interval_input: take two times per image, t [B, 2]: the time and an interval's length t - r (set by the
            model when its objective needs it: MeanFlow), the second embedded by a network of its own and added.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int = 0,
        patch_size: int = 2,
        hidden_size: int = 256,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        context_dim: int = 0,
        interval_input: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise UserError(f"image_size {image_size} is not a multiple of patch_size {patch_size}: change one of them")
        if hidden_size % num_heads or hidden_size % 4:
            raise UserError(f"hidden_size {hidden_size} must be divisible by num_heads ({num_heads}) and by 4")
        self.in_channels, self.patch_size, self.hidden_size = in_channels, patch_size, hidden_size
        self.num_classes, self.context_dim = num_classes, context_dim
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(self.grid, hidden_size), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        # Only a network that takes an interval has this layer: the others keep their parameters and names.
        self.interval_mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
                                          ) if interval_input else None
        self.class_emb = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(hidden_size, 2 * hidden_size)))
        self.out = zero_init(nn.Linear(hidden_size, patch_size * patch_size * in_channels))

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        b, c, h, w = x_t.shape
        x = self.patch_embed(x_t).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D]
        t, interval = split_times(t, self.interval_mlp is not None)
        cond = self.time_mlp(timestep_embedding(t, self.hidden_size).to(x_t.dtype))
        if interval is not None:
            cond = cond + self.interval_mlp(timestep_embedding(interval, self.hidden_size).to(x_t.dtype))
        if self.class_emb is not None:
            cond = cond + self.class_emb(null_labels(self.num_classes, t) if y is None else y)
        context = text_context(self.context_dim, y)
        for block in self.blocks:
            x = block(x, cond, context)
        shift, scale = self.ada_out(cond).chunk(2, dim=1)
        x = self.out(modulate(self.norm_out(x), shift, scale))  # [B, N, p*p*C]
        p, g = self.patch_size, self.grid
        return x.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
