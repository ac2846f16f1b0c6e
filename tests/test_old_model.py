"""Checkpoints and command lines of the flat-flag layout: upgraded to the parts where read, refused in one line where
typed, and never loaded into the wrong process (the process's buffers are not saved, so nothing else would tell)."""

import pytest
import torch

from diffusion_lit.core.errors import UserError
from diffusion_lit.model.old_model import recorded_process, upgrade_hparams, upgrade_state_dict
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.process import VP, Flow

from conftest import tiny_unet
from test_cli import REPO, cli
from test_errors import assert_clean_failure

OLD = REPO / "tests" / "data" / "eps_ddpm_v1.ckpt"  # written by `fit` at commit ebebde6


def test_old_hyperparameters_become_parts():
    hparams = torch.load(OLD, weights_only=True)["hyper_parameters"]
    new = upgrade_hparams(hparams)
    assert new["process"] == {"class_path": "diffusion_lit.model.process.VP",
                              "init_args": {"schedule": "cosine", "timesteps": 100}}
    assert new["conditioning"] == {"class_path": "diffusion_lit.model.conditioning.Labels", "init_args": {"p_uncond": 0.1}}
    assert new["latent"] is None and new["objective"]["init_args"]["prediction"] is None
    assert not {"conditional", "schedule", "timesteps", "compile", "channels_last", "inference_mode"} & set(new)
    assert upgrade_hparams(new) is new  # the parts' layout is left as it is
    flat = {"net": {}, "process": "flow", "flow_shift": 3.0, "text_encoder": "bytes", "text_width": 64,
            "max_prompt_length": 24, "autoencoder": "/x.ckpt", "latent_scale": 0.5, "cache_latents": True}
    parts = upgrade_hparams(flat)
    assert parts["process"]["init_args"] == {"shift": 3.0}
    encoder = parts["conditioning"]["init_args"]["encoder"]
    assert encoder["init_args"] == {"width": 64, "depth": 2, "heads": 2, "max_length": 24}
    assert parts["latent"]["init_args"] == {"autoencoder": "/x.ckpt", "scale": 0.5, "cache": True}
    assert recorded_process({"hyper_parameters": flat}) == ({"process": "flow"}, "v")


def test_moved_weights_are_renamed():
    state = {"text_encoder.embed.weight": 1, "text_ema.module.embed.weight": 2, "latent_scale": 3, "net.w": 4}
    upgrade_state_dict(state)
    assert state == {"conditioning.encoder.embed.weight": 1, "conditioning.ema.module.embed.weight": 2,
                     "latent.scale": 3, "net.w": 4}


def test_a_checkpoint_never_loads_into_another_process():
    checkpoint = torch.load(OLD, weights_only=True)  # VP cosine 100, eps
    for process in (Flow(), VP("linear", 100), VP("cosine", 1000)):
        module = DiffusionModule(net=tiny_unet, image_size=28, channels=1, process=process)
        with pytest.raises(UserError, match="trained with the process"):
            module.on_load_checkpoint(dict(checkpoint))
    module = DiffusionModule(net=tiny_unet, image_size=28, channels=1, process=VP("cosine", 100))
    module.on_load_checkpoint(dict(checkpoint))  # its own process passes


def test_resuming_under_another_process_is_refused(tmp_path):
    args = ["--config", REPO / "configs/tiny_cpu.yaml", "--data.batch_size", 8, "--trainer.callbacks", "[]",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", tmp_path / "runs"]
    assert cli("fit", *args, "--model.process", "Flow", "--trainer.max_steps", 1).returncode == 0
    refused = cli("fit", *args, "--trainer.max_steps", 2, "--ckpt_path", "last")  # the config says VP
    assert_clean_failure(refused, "trained with the process {'process': 'flow'}", "--model.process")
    same = cli("fit", *args, "--model.process", "Flow", "--trainer.max_steps", 2, "--ckpt_path", "last")
    assert same.returncode == 0, same.stderr


@pytest.mark.parametrize("flag, value, new", [("--model.process", "flow", "--model.process Flow"),
                                              ("--model.text_encoder", "bytes", "--model.conditioning Prompts"),
                                              ("--model.autoencoder", "x.ckpt", "--model.latent Latent"),
                                              ("--model.compile", "true", "diffusion_lit.training.speed.Accelerate"),
                                              ("--model.init_from", "dir", "diffusion_lit.training.init_from.InitFrom")])
def test_old_flags_are_refused_with_the_new_spelling(flag, value, new):
    result = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", flag, value, "--print_config")
    assert_clean_failure(result, f"{flag} is an option of older diffusion_lit", new)
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_old_config_file_is_refused_with_the_new_spelling(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text((REPO / "configs/tiny_cpu.yaml").read_text().replace("model:\n", "model:\n  conditional: true\n"))
    result = cli("fit", "--config", config, "--print_config")
    assert_clean_failure(result, "model.conditional is a setting of older diffusion_lit", "--model.conditioning Labels")


def test_flat_sampler_settings_of_the_callbacks_are_refused_with_the_grouped_spelling(tmp_path):
    flag = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--trainer.callbacks.init_args.steps", 3,
               "--print_config")
    assert_clean_failure(flag, "--trainer.callbacks.init_args.sampling.steps")
    config = tmp_path / "old.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: diffusion_lit.training.callbacks.FID\n"
                      "      init_args: {steps: 3, guidance_scale: 2.0}\n")
    old = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--config", config, "--print_config")
    assert_clean_failure(old, "FID takes its sampler settings grouped now", "sampling: {steps: ..., guidance_scale: ...}")
