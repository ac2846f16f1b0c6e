"""Class conditioning, classifier-free guidance and the DiT backbone."""

from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lit.nets.dit import DiT
from diffusion_lit.core.errors import UserError
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.sampling.samplers import ddim_sample, guided, sample
from diffusion_lit.model.conditioning import Labels
from diffusion_lit.model.process import VP

from conftest import assert_halves_its_loss, bars, tiny_unet

tiny_dit = partial(DiT, patch_size=2, hidden_size=32, depth=2, num_heads=2)


def test_labels_are_dropped_at_the_configured_rate():
    model = DiffusionModule(net=tiny_unet, image_size=8, channels=1, num_classes=10, conditioning=Labels(0.2))
    torch.manual_seed(0)
    y = torch.randint(0, 10, (100_000,))
    dropped = model.conditioning.drop(y)
    share = (dropped == 10).float().mean().item()
    assert share == pytest.approx(0.2, abs=0.005)  # 4 standard deviations of a binomial share at n = 100000
    kept = dropped != 10
    assert torch.equal(dropped[kept], y[kept])


@pytest.mark.parametrize("net", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_guidance_scale_interpolates_between_unconditional_and_conditional(net):
    torch.manual_seed(0)
    model = net(1, 8, 10)
    for p in model.parameters():  # leave the zero init so labels reach the output
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 3, 3, 9])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
        assert not torch.allclose(cond, uncond, atol=1e-3)
        torch.testing.assert_close(guided(model, y, 1.0)(x, t), cond, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(guided(model, y, 0.0)(x, t), uncond, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(guided(model, y, 3.0)(x, t), uncond + 3 * (cond - uncond), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, t), uncond)  # no labels: the null class


def test_unconditional_path_is_unchanged():
    # num_classes = 0 builds no class embedding, and the network ignores labels it has no use for.
    net = tiny_unet(1, 8, 0)
    assert net.class_emb is None and not any("class_emb" in k for k in net.state_dict())
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    assert torch.equal(net(x, t), net(x, t, torch.tensor([1, 2])))
    module = DiffusionModule(net=tiny_unet, image_size=8, channels=1, num_classes=10, conditioning=None)
    assert module.conditioning.num_classes == 0 and module.net.class_emb is None  # labelled data, unconditional model


def test_labels_or_guidance_from_an_unconditional_model_is_an_error():
    schedule, net = VP("linear", 10), tiny_unet(1, 8, 0)
    with pytest.raises(UserError, match="unconditional"):
        sample(net, schedule, torch.randn(2, 1, 8, 8), steps=2, labels=torch.tensor([1, 2]))
    with pytest.raises(UserError, match="unconditional"):
        sample(net, schedule, torch.randn(2, 1, 8, 8), steps=2, guidance_scale=3.0)
    with pytest.raises(UserError, match=r"labels must lie in \[0, 9\]"):
        sample(tiny_unet(1, 8, 10), schedule, torch.randn(2, 1, 8, 8), steps=2, labels=torch.tensor([1, 10]))


def test_guided_sampling_batches_both_passes():
    calls = []
    net = tiny_unet(1, 8, 10)
    original = net.forward
    net.forward = lambda x, t, y=None: calls.append(len(x)) or original(x, t, y)
    ddim_sample(guided(net, torch.tensor([1, 2, 3]), 2.0), VP("linear", 100), torch.randn(3, 1, 8, 8), steps=5)
    assert calls == [6] * 5  # one call of 2B per step
    calls.clear()
    ddim_sample(guided(net, torch.tensor([1, 2, 3]), 1.0), VP("linear", 100), torch.randn(3, 1, 8, 8), steps=5)
    assert calls == [3] * 5  # w = 1 needs the conditional pass alone


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_dit_maps_shapes(channels, size):
    net = DiT(channels, size, num_classes=10, patch_size=2, hidden_size=64, depth=2, num_heads=4)
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([0, 999]), torch.tensor([3, 10])).shape == x.shape
    with pytest.raises(UserError, match="multiple of patch_size"):
        DiT(channels, size, patch_size=3)


def test_dit_blocks_start_as_the_identity():
    net = DiT(1, 8, num_classes=10, patch_size=2, hidden_size=32, depth=3, num_heads=2)
    tokens, cond = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in net.blocks:
        torch.testing.assert_close(block(tokens, cond), tokens)
    assert net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).abs().max() == 0  # zero output layer, as in DiT


def test_unpatchify_inverts_patchify():
    # With an identity patch embedding, one block-free pass must put every pixel back where it came from.
    net = DiT(3, 8, patch_size=2, hidden_size=12, depth=0, num_heads=1)
    with torch.no_grad():
        net.patch_embed.weight.zero_()
        net.patch_embed.bias.zero_()
        for i in range(12):  # token channel i = pixel (c, py, px) with i = (py * 2 + px) * 3 + c
            c, py, px = i % 3, (i // 3) // 2, (i // 3) % 2
            net.patch_embed.weight[i, c, py, px] = 1
        net.pos_embed.zero_()
        net.norm_out = torch.nn.Identity()
        net.out.weight.copy_(torch.eye(12))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(net(x, torch.tensor([0, 0])), x)


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_tiny_dit_overfits_eight_images(conditional):
    loader = DataLoader(TensorDataset(bars(), torch.arange(8) % 2), batch_size=8)
    model = DiffusionModule(net=tiny_dit, image_size=8, channels=1, num_classes=2,
                            conditioning=Labels() if conditional else None,
                            optimizer=partial(torch.optim.Adam, lr=2e-3), process=VP("cosine"))
    assert_halves_its_loss(model, loader)
