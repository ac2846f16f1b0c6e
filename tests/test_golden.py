"""Checkpoints written by older code still load and sample the same: tests/data/golden_v2 holds tiny models trained
by `fit` at commit b882802 (before the model's process, objective, conditioning and latent space became config
parts) and the images `sample` drew from them then (tests/data/golden_v2/README.md says how; make_golden_v2.py
wrote them). Each is drawn again here by the same command line, the autoencoder or pipeline folder given with
`--autoencoder` because the path the checkpoint records no longer exists."""

from pathlib import Path

import numpy as np
import pytest
import torch

from test_cli import cli

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden_v2"

FIXTURES = {
    "flow_v_latent": "rectified flow, v, class-conditional, in a tiny autoencoder's latents",
    "text_bytes": "VP eps, cosine, byte-level text encoder",
    "guided": "VP x0, cosine, autoguidance's guide trained beside it",
    "sd_lora": "LoRA on the tiny Stable Diffusion pipeline",
    "vp_v_cond": "VP v, cosine, class-conditional, Min-SNR weighting",
}


@pytest.mark.parametrize("name", FIXTURES)
def test_a_golden_checkpoint_samples_as_it_did(name, tmp_path):
    if name == "sd_lora":  # as the other Stable Diffusion tests
        pytest.importorskip("diffusers")
        pytest.importorskip("peft")
        pytest.importorskip("transformers")
    if name == "flow_v_latent":
        pytest.importorskip("diffusers")  # the autoencoder is diffusers' AutoencoderKL
    golden = torch.load(GOLDEN / f"{name}_samples.pt", weights_only=True)
    assert golden["commit"] == "b882802"
    for command in golden["commands"]:
        out = tmp_path / f"{command['name']}.npz"
        args = [word.replace("{here}", str(GOLDEN)).replace("{out}", str(out)) for word in command["args"]]
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
