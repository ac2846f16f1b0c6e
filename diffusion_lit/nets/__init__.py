"""The networks: `net(x_t, t, cond) -> prediction`, knowing nothing of the process: the DDPM UNet (`unet`), DiT
(`dit`), the text encoders (`text`: a byte-level one trained with the denoiser, CLIP from a local folder) and the
wrapper that keeps pretrained parts out of checkpoints (`frozen`). May import `core` only."""
