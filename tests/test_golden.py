"""Checkpoints written by older code still load and sample the same: tests/data/golden_v2 holds tiny models trained
by `fit` at commit b882802 (before the model's process, objective, conditioning and latent space became config
parts), tests/data/golden_v3 at commit 04a0155 (before the package moved into subpackages: the parts named by their
old class paths), with the images `sample` drew from them then (each set's README.md says how; make_golden_v2.py and
make_golden_v3.py wrote them). Each is drawn again here by the same command line, the autoencoder or pipeline folder
given with `--autoencoder` because the path the checkpoint records no longer exists."""

from pathlib import Path

import numpy as np
import pytest
import torch

from test_cli import cli

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"

FIXTURES = {  # (set, name): what it is
    ("golden_v2", "flow_v_latent"): "rectified flow, v, class-conditional, in a tiny autoencoder's latents",
    ("golden_v2", "text_bytes"): "VP eps, cosine, byte-level text encoder",
    ("golden_v2", "guided"): "VP x0, cosine, autoguidance's guide trained beside it",
    ("golden_v2", "sd_lora"): "LoRA on the tiny Stable Diffusion pipeline",
    ("golden_v2", "vp_v_cond"): "VP v, cosine, class-conditional, Min-SNR weighting",
    # golden_v3: the parts by their class paths from before the package moved into subpackages
    ("golden_v3", "meanflow_labels"): "MeanFlow on a flow, guidance folded in, class-conditional",
    ("golden_v3", "vp_guide"): "VP eps with autoguidance's guide, from an ImageFolder source",
}
COMMITS = {"golden_v2": "b882802", "golden_v3": "04a0155"}


@pytest.mark.parametrize("golden_set,name", FIXTURES)
def test_a_golden_checkpoint_samples_as_it_did(golden_set, name, tmp_path):
    if name == "sd_lora":  # as the other Stable Diffusion tests
        pytest.importorskip("diffusers")
        pytest.importorskip("peft")
        pytest.importorskip("transformers")
    if name == "flow_v_latent":
        pytest.importorskip("diffusers")  # the autoencoder is diffusers' AutoencoderKL
    here = DATA / golden_set
    golden = torch.load(here / f"{name}_samples.pt", weights_only=True)
    assert golden["commit"] == COMMITS[golden_set]
    for command in golden["commands"]:
        out = tmp_path / f"{command['name']}.npz"
        args = [word.replace("{here}", str(here)).replace("{out}", str(out)) for word in command["args"]]
        result = cli(*args)  # in this process
        assert result.returncode == 0, f"{' '.join(args)}\n{result.stderr}"
        new, old = np.load(out)["arr_0"].astype(int), command["images"].numpy().astype(int)
        assert new.shape == old.shape, command["args"]
        # The stored images may come from another CPU than this one: convolutions and matrix products round
        # differently from one CPU (and SIMD width) to the next, so the floats agree to rounding, not bit for bit,
        # and a value on a grey level's edge may round to its neighbour in uint8. One grey level apart, then, and
        # for a minority of the values: ATen's plain kernels (ATEN_CPU_CAPABILITY=default) moved 9 of the 128 values
        # of one 8x8 Heun draw (7%), while a change in the math moves far more (golden_v2/README.md: another label,
        # prompt or guidance scale moved 74-90% of the values by more than one level).
        differ = new != old
        assert np.abs(new - old).max() <= 1 and differ.mean() <= 0.25, (
            f"{name} {command['name']}: {differ.sum()} of {differ.size} values differ, by up to "
            f"{np.abs(new - old).max()} grey levels\n{' '.join(command['args'])}")
