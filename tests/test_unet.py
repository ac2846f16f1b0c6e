import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

from diffusion_lit.core.errors import UserError
from diffusion_lit.training.speed import Accelerate
from diffusion_lit.nets.unet import UNet, timestep_embedding

from conftest import tiny_unet


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_output_shape_equals_input_shape(channels, size):
    net = UNet(channels, size, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(size // 2,))
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_cifar10_config_parameter_count():
    with open("configs/cifar10.yaml") as f:
        init_args = yaml.safe_load(f)["model"]["net"]["init_args"]
    count = sum(p.numel() for p in UNet(3, 32, **init_args).parameters())
    assert abs(count - 35.7e6) / 35.7e6 < 0.01, count


def test_timestep_embedding_distinguishes_steps():
    emb = timestep_embedding(torch.arange(1000), 64)
    assert emb.shape == (1000, 64)
    assert torch.cdist(emb, emb).add(torch.eye(1000)).min() > 0.1


def test_output_depends_on_t_and_is_zero_at_init():
    net = tiny_unet(1, 8)
    x = torch.randn(2, 1, 8, 8)
    assert net(x, torch.tensor([0, 1])).abs().max() == 0  # the output conv starts at zero, as in DDPM
    for p in net.parameters():  # undo the zero init so t can reach the output
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    a, b = net(x, torch.tensor([0, 0])), net(x, torch.tensor([500, 500]))
    assert not torch.allclose(a, b)


def test_image_size_the_network_cannot_take():
    with pytest.raises(UserError, match="cannot be halved"):
        UNet(1, 28, channel_mult=(1, 2, 2, 2))


def attention_unet() -> UNet:
    torch.manual_seed(0)
    return tiny_unet(1, 8, attention_resolutions=(4,))


@pytest.mark.parametrize("channels_last", [False, True], ids=["plain", "channels_last"])
def test_every_gradient_has_its_weights_strides(channels_last):
    """DDP copies each gradient into a bucket laid out as its parameter, and warns ("Grad strides do not match bucket
    view strides") when the strides differ, even in a dimension of size 1. The attention's output, transposed, was
    channels-last, so its 1x1 projection's weight gradient came back in channels-last strides."""
    net = attention_unet()
    if channels_last:  # what the Accelerate callback does
        Accelerate(channels_last=True).setup(None, SimpleNamespace(net=net, ema=None), "fit")
    net(torch.randn(2, 1, 8, 8), torch.tensor([1, 500])).square().mean().backward()
    assert [(name, p.stride(), p.grad.stride()) for name, p in net.named_parameters()
            if p.grad.stride() != p.stride()] == []


def test_a_ddp_step_warns_of_no_gradient_strides(tmp_path):
    """One DDP step of a one-process gloo group, in this process (DDP's reducer warns once per process)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        net = DistributedDataParallel(attention_unet())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            net(torch.randn(2, 1, 8, 8), torch.tensor([1, 500])).square().mean().backward()
    finally:
        dist.destroy_process_group()
    assert not [w for w in caught if "Grad strides" in str(w.message)]
