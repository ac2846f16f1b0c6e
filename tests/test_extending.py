"""A process defined outside the package (tests/my_process.py, as docs/extending.md writes one) trains, samples with
every solver, resumes exactly and is refused by export with one line, without a change to diffusion_lit."""

import torch

from diffusion_lit.io.loading import load_checkpoint
from diffusion_lit.sampling.samplers import sample

from test_cli import REPO, cli
from test_errors import assert_clean_failure

STEPS = 4


def fit(tmp_path, name: str, steps: int, *more):
    return cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--model.process", "my_process.VE",
               "--model.process.sigma_max", 10.0, "--data.batch_size", 8, "--trainer.max_steps", steps,
               "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
               "--trainer.logger.init_args.save_dir", tmp_path / "runs", "--trainer.logger.init_args.name", name,
               "--checkpoint.every_n_train_steps", 2, *more)


def test_a_process_of_ones_own_trains_samples_resumes_and_is_refused_by_export(tmp_path):
    assert fit(tmp_path, "straight", STEPS).returncode == 0
    assert fit(tmp_path, "resumed", STEPS // 2).returncode == 0
    resumed = fit(tmp_path, "resumed", STEPS, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr
    straight_ckpt = tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt"
    resumed_ckpt = tmp_path / "runs" / "resumed" / "checkpoints" / "last.ckpt"
    a, b = (torch.load(p, weights_only=True) for p in (straight_ckpt, resumed_ckpt))
    assert a["global_step"] == b["global_step"] == STEPS and a["process_spec"]["process"] == "ve"
    for key in a["state_dict"]:  # the same code twice on one machine: bit for bit
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key

    # The checkpoint names the user's class: trusted on the command line, it loads, and every solver samples it.
    module, _ = load_checkpoint(str(straight_ckpt), ["my_process.VE"])
    assert type(module.process).__name__ == "VE" and module.objective.prediction == "x0"
    x_T = torch.randn(2, *module.shape, generator=torch.Generator().manual_seed(0)) * 10.0
    with module.sampling() as net:
        for sampler in ("ddim", "euler", "heun", "dpmpp_2m"):
            x = sample(net, module.process, x_T, sampler, steps=4, prediction="x0")
            assert x.shape == x_T.shape and torch.isfinite(x).all() and x.abs().max() <= 1.0 + 1e-6, sampler
    assert_clean_failure(cli("sample", "--ckpt_path", straight_ckpt, "--trust_class", "my_process.VE",
                             "--sampler", "ddpm", "--out", tmp_path / "x.png"), "sampler ddpm", "VE")
    drawn = cli("sample", "--ckpt_path", straight_ckpt, "--trust_class", "my_process.VE", "--num_samples", 2,
                "--steps", 3, "--out", tmp_path / "x.png")
    assert drawn.returncode == 0 and (tmp_path / "x.png").is_file(), drawn.stderr
    untrusted = cli("sample", "--ckpt_path", straight_ckpt, "--out", tmp_path / "y.png")
    assert_clean_failure(untrusted, "'my_process.VE'", "--trust_class my_process.VE")
    refused = cli("export", "--ckpt_path", straight_ckpt, "--trust_class", "my_process.VE", "--out", tmp_path / "pipe")
    assert_clean_failure(refused, "a VE process has no diffusers scheduler")
    assert not (tmp_path / "pipe").exists()
