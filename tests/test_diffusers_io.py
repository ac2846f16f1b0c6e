"""Models that leave and enter as diffusers pipelines: our UNet as UNet2DModel and back, the schedulers, `export`
read by diffusers' own DDPMPipeline, and the `InitFrom` callback."""

from functools import partial

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline, UNet2DModel

from diffusion_lit.io.diffusers_io import from_diffusers, load_unet_weights, to_diffusers, unet2d_config
from diffusion_lit.model.schedulers import process_of, scheduler_for
from diffusion_lit.core.errors import UserError
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.objective import Objective
from diffusion_lit.model.process import VP, Flow
from diffusion_lit.sampling.samplers import ddim_sample
from diffusion_lit.nets.unet import UNet

from conftest import tiny_unet, write_image_folder
from test_cli import REPO, cli

# The shipped configs' plans, narrower (16 channels) for speed, structure unchanged: mnist.yaml (1,2,2, attention at
# 14x14, 28x28), cifar10.yaml (1,2,2,2, attention at 16x16, 32x32), and the DDPM paper's own variant of the latter
# (GroupNorm eps 1e-6, TensorFlow's downsampling padding, timestep frequencies shifted by one) as on the Hub.
PLANS = {
    "mnist": dict(in_channels=1, image_size=28, channel_mult=(1, 2, 2), attention_resolutions=(14,)),
    "cifar10": dict(in_channels=3, image_size=32, channel_mult=(1, 2, 2, 2), attention_resolutions=(16,)),
    "ddpm_paper": dict(in_channels=3, image_size=32, channel_mult=(1, 2, 2, 2), attention_resolutions=(16,),
                       norm_eps=1e-6, downsample_padding=0, freq_shift=1),
}
# float32 on both sides, the same arithmetic in another order (our attention's one 1x1 convolution against three
# linear layers, convolution kernels chosen per shape): agreement to 1e-4 of outputs of size ~1 says the same network.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # away from the zero init, so every layer reaches the output
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def inputs(plan: dict, num_classes: int):
    x = torch.randn(2, plan["in_channels"], plan["image_size"], plan["image_size"])
    return x, torch.tensor([3, 801]), (torch.tensor([1, 4]) if num_classes else None)


@pytest.mark.parametrize("num_classes", [0, 10], ids=["unconditional", "conditional"])
@pytest.mark.parametrize("name", list(PLANS))
def test_our_unet_exports_to_a_unet2dmodel_that_computes_the_same(name, num_classes):
    plan = PLANS[name]
    ours = perturbed(UNet(num_classes=num_classes, base_channels=16, num_res_blocks=2, dropout=0.0, norm_groups=8,
                          **plan))
    theirs = UNet2DModel(**unet2d_config(ours)).eval()
    theirs.load_state_dict(to_diffusers(ours, ours.state_dict()))  # strict: every tensor mapped, none left over
    x, t, y = inputs(plan, num_classes)
    with torch.no_grad():
        expected = ours(x, t, y)
        assert expected.abs().mean() > 0.1
        torch.testing.assert_close(theirs(x, t, class_labels=y).sample, expected, **TOLERANCE)
    back = UNet(num_classes=num_classes, base_channels=16, num_res_blocks=2, dropout=0.0, norm_groups=8, **plan)
    back.load_state_dict(from_diffusers(back, theirs.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize("num_classes", [0, 10], ids=["unconditional", "conditional"])
def test_a_unet2dmodel_folder_initialises_our_unet(tmp_path, num_classes):
    plan = PLANS["ddpm_paper"]
    make = partial(UNet, num_classes=num_classes, base_channels=16, num_res_blocks=2, dropout=0.0, norm_groups=8, **plan)
    theirs = perturbed(UNet2DModel(**unet2d_config(make())), seed=1)  # random weights of diffusers' own
    theirs.save_pretrained(tmp_path / "unet")
    ours = make().eval()
    assert load_unet_weights(ours, str(tmp_path)) is None  # no scheduler beside it
    x, t, y = inputs(plan, num_classes)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), theirs(x, t, class_labels=y).sample, **TOLERANCE)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_the_exported_scheduler_has_our_betas_exactly(kind, prediction):
    module = DiffusionModule(tiny_unet, image_size=8, channels=1, process=VP(kind), objective=Objective(prediction))
    scheduler = scheduler_for(module)
    assert torch.equal(scheduler.betas.float(), module.process.betas)  # else the export refuses
    said = process_of(dict(scheduler.config, _class_name=type(scheduler).__name__))
    assert said == {"process": "vp", "schedule": kind, "timesteps": 1000, "prediction": prediction}
    flow = scheduler_for(DiffusionModule(tiny_unet, image_size=8, channels=1, process=Flow(3.0)))
    assert type(flow).__name__ == "FlowMatchEulerDiscreteScheduler" and flow.config.shift == 3.0
    with pytest.raises(UserError, match="only v-prediction flow models export"):
        scheduler_for(DiffusionModule(tiny_unet, image_size=8, channels=1, process=Flow(),
                                      objective=Objective("x0")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), n_per_class=8, size=8)


def fit(tmp_path, images, name: str, *extra) -> "Path":  # noqa: F821
    result = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml",
                 "--data.source", "ImageFolder", "--data.source.root", images,
                 "--data.batch_size", 8, "--trainer.max_steps", 1, "--trainer.callbacks", "[]",
                 "--trainer.logger.init_args.save_dir", tmp_path / "runs", "--trainer.logger.init_args.name", name,
                 *extra)
    assert result.returncode == 0, result.stderr
    return tmp_path / "runs" / name / "checkpoints" / "last.ckpt"


def perturb_checkpoint(path) -> None:
    """Moves the weights away from the zero init (one step leaves the output layer near zero)."""
    checkpoint = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    for key, value in checkpoint["state_dict"].items():
        if value.is_floating_point() and (key.startswith("ema.module.") or key.startswith("net.")):
            value.add_(torch.randn_like(value) * 0.05)
    torch.save(checkpoint, path)


@pytest.mark.parametrize("schedule, prediction", [("linear", "eps"), ("linear", "v"), ("cosine", "eps")])
def test_diffusers_ddpm_pipeline_draws_what_our_sampler_draws(tmp_path, images, schedule, prediction):
    ckpt = fit(tmp_path, images, "run", "--model.process", "VP", "--model.process.schedule", schedule,
               "--model.objective.prediction", prediction)
    perturb_checkpoint(ckpt)
    out = tmp_path / "pipeline"
    result = cli("export", "--ckpt_path", ckpt, "--out", out)
    assert result.returncode == 0, result.stderr
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (out / "README.md").is_file()
    assert type(DiffusionPipeline.from_pretrained(out, local_files_only=True)) is DDPMPipeline  # a real client

    pipe = DDPMPipeline.from_pretrained(out, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                  output_type="np").images
    module = DiffusionModule.load_from_checkpoint(ckpt, weights_only=True)
    x_T = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))  # what the pipeline drew first
    with module.sampling() as net:
        x0 = ddim_sample(net, module.process, x_T, steps=5, spacing="trailing", prediction=prediction)
    ours = (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    # The same five DDIM steps in float32; diffusers keeps ᾱ as a float32 cumulative product where ours is
    # computed in float64 and rounded, a relative 1e-6 apart. 1e-4 on [0, 1] images is far below a grey level.
    assert np.abs(ours).mean() > 0.05
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)


def test_export_refuses_what_diffusers_cannot_express(tmp_path, images):
    dit = fit(tmp_path, images, "dit", "--model.net", "diffusion_lit.nets.dit.DiT", "--model.net.init_args.patch_size", 2,
              "--model.net.init_args.hidden_size", 32, "--model.net.init_args.depth", 1, "--model.net.init_args.num_heads", 2)
    text = fit(tmp_path, images, "text", "--model.conditioning", "Prompts", "--model.conditioning.encoder",
               "ByteTextEncoder", "--model.conditioning.encoder.width", 16, "--model.conditioning.encoder.depth", 1,
               "--data.source", "ShippedDigits", "--data.captions", "true")
    flow_x0 = fit(tmp_path, images, "flow_x0", "--model.process", "Flow", "--model.objective.prediction", "x0")
    for ckpt, why in ((dit, "DiT denoiser has no diffusers counterpart"), (text, "a text model's UNet"),
                      (flow_x0, "only v-prediction flow models export")):
        out = tmp_path / f"out_{ckpt.parent.parent.name}"
        result = cli("export", "--ckpt_path", ckpt, "--out", out)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert lines[-1].startswith("error:") and why in lines[-1]
        assert not out.exists() and not list(tmp_path.glob(".out_*"))  # no folder left, whole or partial


def test_init_from_refuses_a_mismatch_a_missing_folder_and_a_folder_without_weights(tmp_path, images):
    plan = unet2d_config(tiny_unet(1, 8, 0))  # the run's UNet below: tiny_cpu's, 16 channels
    UNet2DModel(**plan | {"block_out_channels": [32, 64]}).save_pretrained(tmp_path / "wide")
    (tmp_path / "empty").mkdir()
    UNet2DModel(**plan).save_config(tmp_path / "no_weights")  # the right plan, but only its config.json
    net = ["--model.net.init_args.base_channels", 16, "--model.net.init_args.norm_groups", 8,
           "--model.net.init_args.dropout", 0.0]
    cases = [("wide", "block_out_channels is [32, 64] there and [16, 32] here"), ("nowhere", "no such folder"),
             ("empty", "no config.json"), ("no_weights", "its weights could not be read")]
    for folder, why in cases:
        result = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml",
                     "--data.source", "ImageFolder", "--data.source.root",
                     images, "--data.batch_size", 8, "--trainer.max_steps", 1, "--trainer.callbacks", "[]",
                     "--trainer.callbacks+=diffusion_lit.training.init_from.InitFrom", "--trainer.callbacks.path",
                     tmp_path / folder, "--trainer.logger.init_args.save_dir", tmp_path / "runs",
                     "--trainer.logger.init_args.name", folder, *net)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert lines[-1].startswith("error: InitFrom") and why in lines[-1], lines[-1]


def test_fit_starts_from_an_exported_pipeline(tmp_path, images):
    ckpt = fit(tmp_path, images, "first")
    perturb_checkpoint(ckpt)
    assert cli("export", "--ckpt_path", ckpt, "--out", tmp_path / "pipe").returncode == 0
    wrong = fit_from(tmp_path, images, "wrong", "--model.objective.prediction", "v")
    assert wrong.returncode == 2 and "its scheduler says prediction 'eps'" in wrong.stderr
    result = fit_from(tmp_path, images, "second")
    assert result.returncode == 0, result.stderr
    assert "InitFrom: the UNet starts from" in result.stderr


def fit_from(tmp_path, images, name, *extra):
    return cli("fit", "--config", REPO / "configs/tiny_cpu.yaml",
               "--data.source", "ImageFolder", "--data.source.root", images,
               "--data.batch_size", 8, "--trainer.max_steps", 1, "--trainer.callbacks", "[]",
               "--trainer.callbacks+=diffusion_lit.training.init_from.InitFrom", "--trainer.callbacks.path",
               tmp_path / "pipe", "--trainer.logger.init_args.save_dir", tmp_path / "runs",
               "--trainer.logger.init_args.name", name, *extra)
