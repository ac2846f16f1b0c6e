"""Refusals whose advice must not invite running a file that came with a checkpoint, and guidance that a MeanFlow
model has folded in already, which a sampler's guidance would stack on without a word."""

import builtins

import pytest
import torch

from diffusion_lit.model.conditioning import Labels
from diffusion_lit.core.errors import UserError
from diffusion_lit.io.loading import load_checkpoint
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.objective import MeanFlow
from diffusion_lit.model.process import Flow
from diffusion_lit.sampling.settings import Sampling
from diffusion_lit.nets.text import CLIPText

from conftest import tiny_unet
from test_cli import REPO, cli
from test_meanflow import assert_one_error_line, fit
from test_text import write_tiny_clip
from test_trust import crafted

OLD = REPO / "tests" / "data" / "eps_ddpm_v1.ckpt"  # a small checkpoint whose net is diffusion_lit.UNet


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A checkpoint in a folder that also holds a module and a package whose import leaves a marker, run from that
    folder as `python -m` runs (the current folder on sys.path)."""
    folder, marker = tmp_path / "download", tmp_path / "ran"
    (folder / "shipped_pkg").mkdir(parents=True)
    run = f"open({str(marker)!r}, 'w').close()\n"
    (folder / "shipped_net.py").write_text(run + "from diffusion_lit.nets.unet import UNet\nclass Net(UNet):\n    pass\n")
    (folder / "shipped_pkg" / "__init__.py").write_text(run)
    (folder / "shipped_pkg" / "nets.py").write_text(run)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    net = torch.load(OLD, weights_only=True)["hyper_parameters"]["net"]
    return folder, marker, lambda name: crafted(OLD, folder / "model.ckpt", net={**net, "class_path": name})


@pytest.mark.parametrize("name,file", [("shipped_net.Net", "shipped_net.py"),
                                       ("shipped_pkg.nets.Net", "shipped_pkg/__init__.py")])
def test_the_refusal_says_which_file_beside_the_checkpoint_would_run_and_runs_none(shipped, name, file):
    folder, marker, ckpt = shipped
    with pytest.raises(UserError) as refused:
        load_checkpoint(str(ckpt(name)))
    line = str(refused.value)
    assert f"imported from {(folder / file).resolve()}, a file beside the checkpoint" in line, line
    assert "never trust a file that came with a checkpoint" in line and line.endswith(f"--trust_class {name}")
    assert "\n" not in line and not marker.exists()  # found, not imported: not even the package's __init__.py


def test_the_command_line_refuses_in_one_line_before_importing(shipped, tmp_path):
    folder, marker, ckpt = shipped
    result = cli("sample", "--ckpt_path", ckpt("shipped_net.Net"), "--out", tmp_path / "x.png", cwd=folder)
    assert_one_error_line(result, "shipped_net.py, a file beside the checkpoint", "--trust_class shipped_net.Net")
    assert not marker.exists()


def test_a_trusted_class_still_says_where_it_is_imported_from(shipped, capsys):
    folder, marker, ckpt = shipped
    module, _ = load_checkpoint(str(ckpt("shipped_net.Net")), ["shipped_net.Net"])
    assert type(module.net).__name__ == "Net" and marker.exists()
    assert f"importing it from {(folder / 'shipped_net.py').resolve()}, a file beside the checkpoint" in (
        capsys.readouterr().err)


def test_the_refusal_names_an_installed_module_or_none_at_all(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = torch.load(OLD, weights_only=True)["hyper_parameters"]["net"]
    with pytest.raises(UserError, match=r"imported from .*collections.*; if it is a class of your own that you trust, "
                                        r"name it on the command line: --trust_class collections.OrderedDict$"):
        load_checkpoint(str(crafted(OLD, tmp_path / "a.ckpt", net={**net, "class_path": "collections.OrderedDict"})))
    with pytest.raises(UserError, match=r"No module 'nowhere_at_all' is on the path .* --trust_class nowhere_at_all.Net$"):
        load_checkpoint(str(crafted(OLD, tmp_path / "b.ckpt", net={**net, "class_path": "nowhere_at_all.Net"})))
    (tmp_path / "local_net.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "runs").mkdir()  # the checkpoint elsewhere, the module in the current folder
    with pytest.raises(UserError, match="local_net.py, a file under the current folder"):
        load_checkpoint(str(crafted(OLD, tmp_path / "runs" / "c.ckpt", net={**net, "class_path": "local_net.Net"})))


def test_a_module_beside_the_checkpoint_but_not_importable_from_here_is_warned_of(shipped, tmp_path, monkeypatch):
    """Run from another folder, the module that came with the checkpoint does not import; the advice must still not
    invite running it (as "run from its folder" would)."""
    folder, marker, ckpt = shipped
    path = ckpt("shipped_net.Net")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(folder)])
    monkeypatch.delitem(sys.modules, "shipped_net", raising=False)  # as a new process has it
    with pytest.raises(UserError) as refused:
        load_checkpoint(str(path))
    line = str(refused.value)
    assert f"A file {(folder / 'shipped_net.py').resolve()} lies beside the checkpoint" in line, line
    assert "never trust a file that came with a checkpoint" in line and not marker.exists()


def test_the_classes_a_config_trusts_that_are_allowed_anyway_say_nothing(capsys):
    """A resume trusts the config's own class paths: diffusion_lit's classes among them are allowed anyway, and
    importing them is not news (no line per class on every resume)."""
    from diffusion_lit.core.trust import check_hparams

    hparams = {"net": {"class_path": "diffusion_lit.nets.unet.UNet"}, "optimizer": {"class_path": "torch.optim.Adam"},
               "process": {"class_path": "diffusion_lit.process.VP"}}  # an old place: allowed as the new one
    check_hparams(hparams, ["diffusion_lit.nets.unet.UNet", "torch.optim.Adam", "diffusion_lit.process.VP"])
    assert capsys.readouterr().err == ""


def test_a_pickled_clip_folder_is_refused_with_what_to_do_not_torchs_advice(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tiny_clip(tmp_path / "clip")
    folder = tmp_path / "clip" / "text_encoder"
    state = transformers.CLIPTextModel.from_pretrained(str(folder)).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": builtins.print}, folder / "pytorch_model.bin")  # a pickle naming a callable
    with pytest.raises(UserError) as refused:
        CLIPText(str(tmp_path / "clip"))
    line = str(refused.value)
    assert f"{folder / 'pytorch_model.bin'} is a pickle that holds more than tensors" in line, line
    assert "Re-running" not in line and "likely succeed" not in line and "\n" not in line and "\x1b" not in line

    # The code it gives, run where the folder is trusted (as the test trusts its own), converts it.
    code = line[line.index("transformers.CLIPTextModel"):]
    eval(code, {"transformers": transformers, "torch": torch})
    assert (folder / "model.safetensors").is_file() and CLIPText(str(tmp_path / "clip")).width == 32


# --- guidance folded into a MeanFlow model ------------------------------------------------------------------------

def folded(guidance_scale: float = 2.0, guidance_mix: float = 0.0) -> DiffusionModule:
    return DiffusionModule(tiny_unet, image_size=8, channels=1, num_classes=2, conditioning=Labels(), process=Flow(),
                           objective=MeanFlow(guidance_scale=guidance_scale, guidance_mix=guidance_mix))


def test_sampler_guidance_on_folded_guidance_is_refused_unless_stacked():
    settings = Sampling(sampler="meanflow", steps=1, guidance_scale=3.0)
    with pytest.raises(UserError, match=r"guidance folded into it \(trained with MeanFlow's guidance_scale 2, "
                                        r"guidance_mix 0: its samples are guided as at scale 2\).*--stack_guidance true"):
        settings.for_model(folded(), False, "SampleGrid")  # the callbacks' way in
    with pytest.raises(UserError, match=r"guidance_scale 1.5, guidance_mix 0.5: its samples are guided as at scale 3\)"):
        # the effective scale omega / (1 - kappa)
        settings.check_model(folded(1.5, 0.5), False)
    Sampling(sampler="meanflow", steps=1, guidance_scale=3.0, stack_guidance=True).check_model(folded(), False)
    Sampling(sampler="meanflow", steps=1).check_model(folded(), False)  # its own guidance alone
    Sampling(sampler="meanflow", steps=1, guidance_scale=3.0).check_model(folded(1.0), False)  # nothing folded in
    assert "stack_guidance" not in Sampling(stack_guidance=True).kwargs()  # not a sampler's argument


def test_sample_and_evaluate_refuse_to_stack_guidance_without_being_asked(tmp_path):
    assert fit(tmp_path, "folded", "--model.conditioning", "Labels", "--model.objective.guidance_scale", 2,
               "--trainer.max_steps", 1).returncode == 0
    ckpt = tmp_path / "runs" / "folded" / "checkpoints" / "last.ckpt"
    args = ["--ckpt_path", ckpt, "--sampler", "meanflow", "--steps", 1, "--guidance_scale", 3]
    out = tmp_path / "x.png"
    phrases = ("guidance_scale 3: this MeanFlow model has guidance folded into it", "guided as at scale 2",
               "--stack_guidance true")
    assert_one_error_line(cli("sample", *args, "--labels", "all", "--num_samples", 4, "--out", out), *phrases)
    assert not out.exists()
    assert_one_error_line(cli("evaluate", *args, "--feature_extractor", "features.TinyFeatures"), *phrases)
    stacked = cli("sample", *args, "--labels", "all", "--num_samples", 4, "--out", out, "--stack_guidance", "true")
    assert stacked.returncode == 0 and out.is_file(), stacked.stderr[-3000:]
    assert "(2 network evaluations per image;" in stacked.stdout


# --- a diffusers folder's pickled weights ---------------------------------------------------------------------------

def pickled(folder):
    """`folder`'s diffusion_pytorch_model.safetensors replaced by diffusers' pickled name for the weights, a pickle
    that also names a callable."""
    from safetensors.torch import load_file

    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({**state, "extra": builtins.print}, folder / "diffusion_pytorch_model.bin")


def autoencoder_folder(tmp_path):
    from diffusion_lit.model.autoencoder import load_autoencoder

    diffusers = pytest.importorskip("diffusers")
    diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=4).save_pretrained(tmp_path / "vae")
    return tmp_path / "vae", "autoencoder", lambda: load_autoencoder(str(tmp_path / "vae"))


def unet2d_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffusion_lit.io.diffusers_io import load_unet_weights, unet2d_config

    net = tiny_unet(1, 8, 0)
    diffusers.UNet2DModel(**unet2d_config(net)).save_pretrained(tmp_path / "unet")
    return tmp_path / "unet", "InitFrom", lambda: load_unet_weights(net, str(tmp_path / "unet"))


def sd_folder(part):
    def build(tmp_path):
        from test_stable_diffusion import write_tiny_sd  # skipped without diffusers, transformers or peft

        from diffusion_lit.model.stable_diffusion import StableDiffusionModule

        sd = write_tiny_sd(tmp_path)
        return sd / part, "pretrained" if part == "unet" else "autoencoder", lambda: StableDiffusionModule(str(sd))
    return build


@pytest.mark.parametrize("build", [autoencoder_folder, unet2d_folder, sd_folder("unet"), sd_folder("vae")],
                         ids=["autoencoder", "InitFrom", "sd_unet", "sd_vae"])
def test_a_pickled_diffusers_folder_is_refused_with_what_to_do(tmp_path, build):
    folder, begins, load = build(tmp_path)
    pickled(folder)
    with pytest.raises(UserError) as refused:
        load()
    line = str(refused.value)
    assert line.startswith(begins), line  # whose folder: diffusers' own line says only "Unable to load weights"
    assert f"{folder / 'diffusion_pytorch_model.bin'} is a pickle that holds more than tensors" in line, line
    assert "weights_only set to False" not in line and "likely succeed" not in line and "Unable to load" not in line
    assert "\n" not in line and "\x1b" not in line

    # The code it gives, run where the folder is trusted (as the test trusts its own), converts it.
    exec(line[line.index("import diffusers, torch; "):], {})
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    load()
