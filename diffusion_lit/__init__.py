"""Denoising diffusion models trained and sampled with PyTorch Lightning."""

from diffusion_lit.data import DiffusionDataModule
from diffusion_lit.module import DiffusionModule
from diffusion_lit.process import VP, Flow
from diffusion_lit.unet import UNet

__all__ = ["DiffusionDataModule", "DiffusionModule", "Flow", "UNet", "VP"]
