"""A checkpoint can name only trusted classes: crafted hyperparameters never import or call anything else."""

from pathlib import Path

import pytest
import torch

from diffusion_lit.io.loading import load_checkpoint
from diffusion_lit.core.errors import UserError
from diffusion_lit.core.trust import check_hparams

from test_cli import cli
from test_errors import assert_clean_failure, checkpoints, fit_args, images  # noqa: F401 (fixtures)

MARKER_COMMAND = "touch {marker}"


def crafted(good: Path, out: Path, **changes) -> Path:
    """A copy of a good checkpoint whose hyperparameters are changed: a file that loads under weights_only=True."""
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], **changes}
    torch.save(checkpoint, out)
    return out


def test_crafted_network_runs_nothing_through_any_command(checkpoints, images, tmp_path):
    good, _ = checkpoints
    marker = tmp_path / "marker"
    evil = crafted(good, tmp_path / "evil.ckpt",
                   net={"class_path": "os.system", "init_args": {"command": f"touch {marker}"}})
    for args in (["sample", "--ckpt_path", evil, "--out", tmp_path / "x.png"],
                 ["evaluate", "--ckpt_path", evil, "--feature_extractor", "features.TinyFeatures"],
                 ["fit", *fit_args(images, tmp_path), "--ckpt_path", evil]):
        result = cli(*args)
        assert result.returncode == 2, result.stderr
        assert_clean_failure(result, "'os.system'", "refused before importing it")
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
        assert not marker.exists()


@pytest.mark.parametrize("changes", [
    {"net": {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", "MARKER"]}}},
    {"net": "os.system"},  # an import path string, which jsonargparse would import and call as the factory
    {"net": {"class_path": "diffusion_lit.cli.os.system"}},  # reaches os.system through one of our modules
    {"net": {"class_path": "collections.OrderedDict"}},  # a class, but no network
    {"optimizer": {"class_path": "os.system", "init_args": {"command": "touch MARKER"}}},
    {"net": {"class_path": "diffusion_lit.nets.unet.UNet", "init_args": {"block": {"class_path": "os.system"}}}},
    {"_instantiator": "os.system"},
    {"_class_path": "os.system"},
], ids=["popen", "string", "through-our-module", "non-module-class", "optimizer", "nested", "instantiator",
        "class-path"])
def test_crafted_variants_are_refused_before_import(checkpoints, tmp_path, monkeypatch, changes):
    good, _ = checkpoints
    monkeypatch.chdir(tmp_path)  # a MARKER file would land here
    path = crafted(good, tmp_path / "evil.ckpt", **changes)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(str(path))
    assert not (tmp_path / "MARKER").exists()


def test_a_users_own_class_loads_when_named(checkpoints, tmp_path):
    good, _ = checkpoints
    hparams = torch.load(good, weights_only=True)["hyper_parameters"]
    own = crafted(good, tmp_path / "own.ckpt", net={**hparams["net"], "class_path": "nets.MyUNet"})
    with pytest.raises(UserError, match="--trust_class nets.MyUNet"):
        load_checkpoint(str(own))
    module, _ = load_checkpoint(str(own), ["nets.MyUNet"])
    assert type(module.net).__name__ == "MyUNet"
    with pytest.raises(UserError, match="not a subclass of torch.nn.Module"):  # trusted, but not a network
        load_checkpoint(str(crafted(good, tmp_path / "d.ckpt", net={"class_path": "os.system"})), ["os.system"])


def test_the_allow_list_admits_our_networks_and_torch_optimizers():
    for net in ("diffusion_lit.nets.unet.UNet", "diffusion_lit.nets.dit.DiT"):
        for optimizer in ("torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD"):
            check_hparams({"net": {"class_path": net}, "optimizer": {"class_path": optimizer},
                           "_instantiator": "lightning.pytorch.cli.instantiate_module"})
    with pytest.raises(UserError):  # an optimizer class at the network's place
        check_hparams({"net": {"class_path": "torch.optim.Adam"}})


def test_fit_trusts_the_class_its_config_names(images, tmp_path):
    """A resumed run of the user's own network: the config (or --trust_class) names it, so the checkpoint may."""
    args = [*fit_args(images, tmp_path), "--model.net.class_path", "nets.MyUNet", "--checkpoint.every_n_train_steps", 1]
    first = cli("fit", *args, "--trainer.max_steps", 1)
    assert first.returncode == 0, first.stderr
    step1 = tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "step00000001.ckpt"
    resumed = cli("fit", *args, "--trainer.max_steps", 2, "--ckpt_path", step1)  # a file: read by LightningCLI
    assert resumed.returncode == 0, resumed.stderr
    refused = cli("fit", *fit_args(images, tmp_path), "--trainer.max_steps", 3, "--ckpt_path", "last")
    assert_clean_failure(refused, "'nets.MyUNet'", "--trust_class nets.MyUNet")  # the config names UNet, not it
