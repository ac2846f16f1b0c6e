"""A network class of "the user's own package", for the tests of which classes a checkpoint may name."""

from diffusion_lit.nets.unet import UNet


class MyUNet(UNet):
    """The UNet under another name (the same weights), as a user's own subclass would be."""
