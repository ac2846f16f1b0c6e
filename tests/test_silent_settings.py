"""Settings that used to be taken without a word (a sampler that ignores them, a guide that is the model itself, a
resume with nothing left to train), and messages that named the wrong cause: each is one `error:` line now, or
one notice where the run can go on."""

import os
import shutil

import pytest
import torch

from conftest import write_image_folder
from test_cli import REPO, cli
from test_hard_edges import assert_one_error_line

diffusers = pytest.importorskip("diffusers")


class Opens:
    """Unpickled, it would create the file `path` (as a crafted checkpoint's os.system would run a command)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-step `fit` runs on 8x8 images: pixels, a class model, a latent model (a tiny diffusers autoencoder of one
    channel, and one of three channels beside it); a garbage file and a crafted pickle."""
    tmp = tmp_path_factory.mktemp("silent")
    images = write_image_folder(tmp / "images", n_per_class=8, size=8)
    for channels in (1, 3):
        torch.manual_seed(0)
        diffusers.AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=2,
                                block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                scaling_factor=0.5).save_pretrained(tmp / f"vae{channels}")
    fit_args = ["--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "ImageFolder", "--data.source.root",
                images, "--data.batch_size", 8, "--trainer.enable_progress_bar", "false",
                "--trainer.logger.init_args.save_dir", tmp / "runs"]

    def fit(name, *extra):
        result = cli("fit", *fit_args, "--trainer.max_steps", 1, "--trainer.callbacks", "[]",
                     "--trainer.logger.init_args.name", name, *extra)
        assert result.returncode == 0, result.stderr
        return tmp / "runs" / name / "checkpoints" / "last.ckpt"

    ckpt = {"pixel": fit("pixel"), "class": fit("class", "--model.conditioning", "Labels"),
            "latent": fit("latent", "--model.latent", "Latent", "--model.latent.autoencoder", tmp / "vae1"),
            "latent_rgb": fit("latent_rgb", "--data.channels", 3, "--model.latent", "Latent",
                              "--model.latent.autoencoder", tmp / "vae3")}
    ckpt["copy"] = tmp / "copy.ckpt"  # the class model's weights in another file
    shutil.copy(ckpt["class"], ckpt["copy"])
    (tmp / "garbage.ckpt").write_bytes(b"garbage")
    torch.save({"state_dict": {}, "global_step": 3, "hyper_parameters": Opens(tmp / "opened")}, tmp / "crafted.ckpt")
    return tmp, ckpt, fit_args


def sample(runs, model, *args):
    tmp, ckpt, _ = runs
    steps = [] if "ddpm" in args else ["--steps", 2]  # ddpm takes none
    return cli("sample", "--ckpt_path", ckpt[model], "--num_samples", 2, *steps, "--out", tmp / "x.npz", *args)


@pytest.mark.parametrize("model, args, phrases", [
    ("pixel", ["--sampler", "ddpm", "--steps", 0], ["steps must be at least 1, got 0", "leave steps out"]),
    ("pixel", ["--sampler", "ddpm", "--steps", -3], ["steps must be at least 1, got -3"]),
    ("pixel", ["--sampler", "ddpm", "--steps", 20], ["sampler ddpm always walks all 1000 timesteps", "sampler ddim"]),
    ("pixel", ["--sampler", "ddpm", "--eta", 0.3], ["eta 0.3: sampler ddpm", "takes no eta", "ddim with eta 0.3"]),
    ("pixel", ["--sampler", "euler", "--eta", 0.5], ["sampler euler", "takes no eta", "ddim with eta 0.5"]),
    ("pixel", ["--sampler", "heun", "--eta", 1], ["sampler heun", "takes no eta"]),
    ("pixel", ["--sampler", "dpmpp_2m", "--eta", 1], ["sampler dpmpp_2m", "takes no eta"]),
    ("class", ["--guidance_scale", 1e6, "--labels", "0,1"], ["guidance_scale must lie in [0, 20], got 1e+06",
                                                             "saturate"]),
    ("class", ["--guidance_scale", -1, "--labels", "0,1"], ["guidance_scale must lie in [0, 20], got -1",
                                                            "0 is the weak side alone", "away from the condition"]),
    ("pixel", ["--guide_condition", "null"], ["guide_condition null", "this model is unconditional"]),
    ("class", ["--guide_condition", "null", "--labels", "0,1"], ["guide_condition null", "there is no guide"]),
    ("class", ["--guide_ckpt", "class", "--guidance_scale", 2, "--labels", "0,1"],
     ["holds this model's own weights", "twice the cost"]),
    ("class", ["--guide_ckpt", "copy", "--guidance_scale", 2, "--labels", "0,1"],
     ["copy.ckpt holds this model's own weights", "earlier or smaller run"]),
    ("pixel", ["--prompt", "a", "--prompts", "prompts.txt"], ["--prompt and --prompts: give one of the two"]),
], ids=["ddpm-steps-0", "ddpm-steps-negative", "ddpm-steps", "ddpm-eta", "euler-eta", "heun-eta", "dpmpp-eta",
        "scale-huge", "scale-negative", "null-unconditional", "null-without-guide", "guide-same-file",
        "guide-same-weights", "prompt-and-prompts"])
def test_a_setting_the_run_would_ignore_or_misuse_is_refused(runs, model, args, phrases):
    tmp, ckpt, _ = runs
    (tmp / "prompts.txt").write_text("b\n")
    args = [ckpt.get(a, tmp / a if a == "prompts.txt" else a) if isinstance(a, str) else a for a in args]
    assert_one_error_line(sample(runs, model, *args), *phrases)
    assert not (tmp / "x.npz").exists()


def test_the_model_as_its_own_guide_at_the_null_label_is_cfg_said_in_one_line(runs):
    result = sample(runs, "class", "--guide_ckpt", runs[1]["class"], "--guide_condition", "null",
                    "--guidance_scale", 2, "--labels", "0,1")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "holds this model's own weights" in line]
    assert len(notes) == 1 and "classifier-free guidance" in notes[0], result.stderr


def test_evaluate_checks_the_same_settings(runs):
    tmp, ckpt, _ = runs
    result = cli("evaluate", "--ckpt_path", ckpt["pixel"], "--sampler", "heun", "--eta", 1, "--num_samples", 2,
                 "--feature_extractor", "digits", "--real", tmp / "images")
    assert_one_error_line(result, "sampler heun", "takes no eta")


@pytest.mark.parametrize("sampling, phrases", [
    ('{sampler: euler, eta: 1.0}', ["sampler euler", "takes no eta"]),
    ('{guide_condition: "null"}', ["guide_condition null", "unconditional"]),  # a bare null would be YAML's None
], ids=["eta", "guide-condition"])
def test_the_sample_grid_checks_them_before_the_first_step(runs, sampling, phrases):
    tmp, _, fit_args = runs
    result = cli("fit", *fit_args, "--trainer.max_steps", 1, "--trainer.logger.init_args.name", "grid",
                 "--trainer.callbacks.init_args.sampling", sampling)
    assert_one_error_line(result, *phrases)
    assert not (tmp / "runs" / "grid" / "checkpoints").exists()


@pytest.mark.parametrize("model, guide, phrase", [
    ("latent", "pixel", "the guide is a pixel model and this model a latent model"),
    ("pixel", "latent", "the guide is a latent model and this model a pixel model"),
], ids=["pixel-guide", "latent-guide"])
def test_a_guide_of_the_other_space_is_named_as_such(runs, model, guide, phrase):
    result = sample(runs, model, "--guide_ckpt", runs[1][guide], "--guidance_scale", 2)
    line = assert_one_error_line(result, "--guide_ckpt", phrase)
    assert "cannot be halved" not in line and "--autoencoder" not in line


def test_a_latent_guide_of_other_channels_is_named_as_such(runs):
    line = assert_one_error_line(sample(runs, "latent", "--guide_ckpt", runs[1]["latent_rgb"], "--guidance_scale", 2),
                                 "the guide was trained on 3-channel images and this model on 1-channel ones")
    assert "use data of" not in line


def test_a_moved_autoencoder_of_other_channels_names_the_sample_option(runs):
    tmp, ckpt, _ = runs
    line = assert_one_error_line(sample(runs, "latent", "--autoencoder", tmp / "vae3"),
                                 "takes 3-channel images", "trained on 1-channel ones", "give --autoencoder")
    assert "--data.channels" not in line and "use data of" not in line


@pytest.mark.parametrize("bad", ["garbage", "crafted"])
@pytest.mark.parametrize("where", ["sample", "guide", "evaluate", "export", "resume"])
def test_an_unreadable_checkpoint_is_never_advised_to_be_unpickled(runs, bad, where):
    tmp, ckpt, fit_args = runs
    path = tmp / f"{bad}.ckpt"
    result = {
        "sample": lambda: cli("sample", "--ckpt_path", path, "--out", tmp / "x.npz"),
        "guide": lambda: sample(runs, "pixel", "--guide_ckpt", path, "--guidance_scale", 2),
        "evaluate": lambda: cli("evaluate", "--ckpt_path", path, "--feature_extractor", "digits"),
        "export": lambda: cli("export", "--ckpt_path", path, "--out", tmp / "exported"),
        "resume": lambda: cli("fit", *fit_args, "--trainer.callbacks", "[]", "--trainer.logger.init_args.name",
                              "pixel", "--ckpt_path", path),
    }[where]()
    line = assert_one_error_line(result, str(path), "not a readable checkpoint of diffusion_lit, or it is damaged")
    assert "weights_only" not in result.stderr and "likely succeed" not in result.stderr
    assert "_use_new_zipfile_serialization" not in result.stderr
    assert ("more than tensors and plain values" in line) == (bad == "crafted" or where != "resume")
    assert not (tmp / "opened").exists()  # nothing in the file was run


EVIL = {"class_path": "os.system", "init_args": {"command": "echo pwned"}}


@pytest.mark.parametrize("source, phrase", [
    ({"class_path": "diffusion_lit.data.sources.MNIST", "init_args": {"root": "data\nerror: all is well"}},
     "not a plain path"),
    ({"class_path": EVIL}, "its source a class_path that is not an import path"),
], ids=["root-newline", "class-path-dict"])
def test_evaluate_describes_a_crafted_dataset_without_echoing_it(runs, tmp_path, source, phrase):
    _, ckpt, _ = runs
    checkpoint = torch.load(ckpt["pixel"], weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["source"] = source
    torch.save(checkpoint, tmp_path / "crafted_data.ckpt")
    result = cli("evaluate", "--ckpt_path", tmp_path / "crafted_data.ckpt", "--num_samples", 2, "--steps", 2,
                 "--feature_extractor", "digits")
    assert_one_error_line(result, "crafted or damaged checkpoint", phrase)
    assert "os.system" not in result.stderr and "all is well" not in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1


def test_a_resume_whose_max_steps_is_reached_says_how_to_continue(runs):
    tmp, ckpt, fit_args = runs
    before = os.path.getmtime(ckpt["pixel"])
    resume = ["fit", *fit_args, "--trainer.callbacks", "[]", "--trainer.logger.init_args.name", "pixel",
              "--ckpt_path", "last", "--trainer.max_steps"]
    result = cli(*resume, 0)  # below the step reached (the run saved at step 68 and given max_steps 14)
    assert_one_error_line(result, "the run is at step 1 already", "--trainer.max_steps 0",
                          "give a larger --trainer.max_steps")
    assert os.path.getmtime(ckpt["pixel"]) == before
    # The finished run started again as it was (a requeued job): said in one line, and nothing to do
    result = cli(*resume, 1)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "reached --trainer.max_steps 1 already" in line]
    assert torch.load(ckpt["pixel"], weights_only=True)["global_step"] == 1
