"""Denoising diffusion models trained and sampled with PyTorch Lightning."""

from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.process import VP, Flow
from diffusion_lit.nets.unet import UNet

__all__ = ["DiffusionDataModule", "DiffusionModule", "Flow", "UNet", "VP"]
