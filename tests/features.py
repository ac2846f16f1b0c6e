"""A small, fixed feature network for FID tests: float images in [0, 1] -> 32-d features (no download)."""

import torch
from torch import nn


class TinyFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        generator = torch.Generator().manual_seed(0)  # the same weights in every process
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.zero_()
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(1, keepdim=True)  # grayscale or RGB alike
        return self.pool(torch.relu(self.conv(x))).flatten(1)


class PooledPixels(nn.Module):
    """A feature network without parameters: 4x4 average-pooled pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1)
