import pytest
import torch
import yaml

from diffusion_lit.errors import UserError
from diffusion_lit.unet import UNet, timestep_embedding

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
