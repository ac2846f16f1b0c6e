"""`sample` and `evaluate`, and FID against torchmetrics computed directly."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from diffusion_lit.data.images import load_images
from diffusion_lit.training.metrics import ImageFeatures, extract, fid_and_kid

from conftest import write_image_folder
from features import TinyFeatures
from test_cli import REPO, cli

FEATURES = "features.TinyFeatures"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of a tiny run of `fit` on 16x16 images."""
    tmp = tmp_path_factory.mktemp("run")
    images = write_image_folder(tmp / "images", n_per_class=16, size=16)
    result = cli(
        "fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "ImageFolder",
        "--data.source.root", images, "--data.batch_size", 8,
        "--trainer.max_steps", 2, "--trainer.logger.init_args.save_dir", tmp / "runs", "--trainer.callbacks", "[]",
    )
    assert result.returncode == 0, result.stderr
    return tmp / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt"


def test_sample_writes_each_kind_reproducibly(checkpoint, tmp_path):
    common = ["sample", "--ckpt_path", checkpoint, "--num_samples", 5, "--steps", 4, "--batch_size", 2]
    for out in ["a.npz", "b.npz", "grid.png", "pngs"]:
        result = cli(*common, "--out", tmp_path / out, *(["--seed", 1] if out == "b.npz" else []))
        assert result.returncode == 0, result.stderr

    a = np.load(tmp_path / "a.npz")["arr_0"]
    assert a.dtype == np.uint8 and a.shape == (5, 16, 16, 1)  # NHWC
    again = cli(*common, "--out", tmp_path / "a2.npz")
    assert again.returncode == 0 and np.array_equal(np.load(tmp_path / "a2.npz")["arr_0"], a)
    assert not np.array_equal(np.load(tmp_path / "b.npz")["arr_0"], a)  # another seed, other images

    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 2 * 18, 2 + 3 * 18, 3)  # 5 images of 16px, 3 a row, 2px padding
    files = sorted((tmp_path / "pngs").glob("*.png"))
    assert len(files) == 5
    assert np.array_equal(np.stack([np.asarray(Image.open(f)) for f in files]), a[..., 0])


def test_sample_ddpm_and_bad_checkpoint(checkpoint, tmp_path):
    result = cli("sample", "--ckpt_path", checkpoint, "--num_samples", 2, "--sampler", "ddpm", "--out", tmp_path / "d.npz")
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "d.npz")["arr_0"].shape == (2, 16, 16, 1)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    bad = cli("sample", "--ckpt_path", tmp_path / "broken.ckpt")
    assert bad.returncode == 2 and "could not be loaded" in bad.stderr and "Traceback" not in bad.stderr


def direct_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' FID with the feature network inside, fed float images in [0, 1]."""
    fid = FrechetInceptionDistance(feature=TinyFeatures(), normalize=True)  # custom nets get the images as given
    fid.update(real.float() / 255, real=True)
    fid.update(fake.float() / 255, real=False)
    return fid.compute().item()


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    features = ImageFeatures(FEATURES)
    real_f, fake_f = extract(features, real), extract(features, fake)
    fid, _ = fid_and_kid(real_f.shape[1], min(len(real_f), len(fake_f)))
    fid.update(real_f, real=True)
    fid.update(fake_f, real=False)
    return fid.compute().item()


@pytest.fixture
def image_sets(tmp_path):
    real_dir = write_image_folder(tmp_path / "real", n_per_class=100, size=16)
    real = load_images(real_dir)
    noise = torch.randint(0, 256, (200, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    np.savez(tmp_path / "noise.npz", arr_0=noise.permute(0, 2, 3, 1).numpy())
    return real_dir, real, noise


def test_fid_is_torchmetrics_fid(image_sets, tmp_path):
    real_dir, real, noise = image_sets
    same = fid_from_features(real, real)
    halves = fid_from_features(real[::2], real[1::2])
    against_noise = fid_from_features(real, noise)
    assert abs(same) < 1e-3
    assert against_noise > 50 * max(halves, 1e-3)
    assert against_noise == pytest.approx(direct_fid(real, noise), rel=1e-4)
    assert halves == pytest.approx(direct_fid(real[::2], real[1::2]), rel=1e-3, abs=1e-4)

    result = cli("evaluate", "--samples", tmp_path / "noise.npz", "--real", real_dir, "--feature_extractor", FEATURES)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(line) == {"fid", "kid_mean", "kid_std", "num_samples"}
    assert line["num_samples"] == 200
    assert line["fid"] == pytest.approx(against_noise, rel=1e-4)
    assert line["kid_mean"] > 0


def test_evaluate_a_checkpoint_against_its_own_data(checkpoint, tmp_path):
    args = ["evaluate", "--ckpt_path", checkpoint, "--num_samples", 20, "--steps", 3, "--feature_extractor", FEATURES,
            "--cache_dir", tmp_path / "cache"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # reference features cached ...
    second = cli(*args)
    scores = [json.loads(run.stdout.splitlines()[-1]) for run in (first, second)]
    assert scores[0].pop("ms_per_image") > 0 and scores[1].pop("ms_per_image") > 0  # wall-clock: not compared
    assert scores[0] == scores[1]  # ... and reused: the same samples give the same scores
    assert scores[0]["model_evaluations"] == 3 and scores[0]["guide_evaluations"] == 0


def test_evaluate_needs_something_to_score():
    result = cli("evaluate", "--real", "x")
    assert result.returncode == 2 and "exactly one of --ckpt_path" in result.stderr


def test_conditional_fit_and_guided_sampling(tmp_path, checkpoint):
    images = write_image_folder(tmp_path / "images", n_per_class=16, size=16)  # classes a and b
    result = cli(
        "fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "ImageFolder",
        "--data.source.root", images, "--data.batch_size", 8,
        "--model.conditioning", "Labels", "--trainer.max_steps", 2, "--trainer.logger.init_args.save_dir", tmp_path / "runs",
        "--trainer.callbacks", "[]",
    )
    assert result.returncode == 0, result.stderr
    conditional = tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt"
    ok = cli("sample", "--ckpt_path", conditional, "--labels", "0,1,1", "--guidance_scale", 3, "--steps", 3,
             "--out", tmp_path / "g.npz")
    assert ok.returncode == 0, ok.stderr
    assert np.load(tmp_path / "g.npz")["arr_0"].shape == (3, 16, 16, 1)
    balanced = cli("sample", "--ckpt_path", conditional, "--labels", "all", "--num_samples", 4, "--steps", 2,
                   "--out", tmp_path / "b.npz")
    assert balanced.returncode == 0 and len(np.load(tmp_path / "b.npz")["arr_0"]) == 4

    out_of_range = cli("sample", "--ckpt_path", conditional, "--labels", "2", "--out", tmp_path / "x.png")
    assert out_of_range.returncode == 2 and "labels must lie in [0, 1]" in out_of_range.stderr
    for args in (["--labels", "all"], ["--guidance_scale", "2"]):  # from the unconditional checkpoint
        refused = cli("sample", "--ckpt_path", checkpoint, *args, "--out", tmp_path / "y.png")
        assert refused.returncode == 2 and "unconditional" in refused.stderr and "Traceback" not in refused.stderr


def test_a_checkpoint_from_before_v_and_flow_samples_as_it_did():
    """tests/data/eps_ddpm_v1.ckpt was written by `fit` at commit ebebde6 (eps prediction, DDPM, no `process` or
    `prediction` in its hyperparameters); the samples beside it were drawn from it by that code."""
    from diffusion_lit.io.loading import load_checkpoint
    from diffusion_lit.sampling.samplers import sample

    data = REPO / "tests" / "data"
    module, checkpoint = load_checkpoint(str(data / "eps_ddpm_v1.ckpt"))
    assert "process" not in checkpoint["hyper_parameters"] and "prediction" not in checkpoint["hyper_parameters"]
    assert module.process.spec() == {"process": "vp", "schedule": "cosine", "timesteps": 100}
    assert module.objective.prediction == "eps" and module.objective.t_sampling == "uniform"
    old = torch.load(data / "eps_ddpm_v1_samples.pt", weights_only=True)
    with module.sampling() as net:
        ddim = sample(net, module.process, old["x_T"], "ddim", steps=10, labels=old["labels"], guidance_scale=2.0)
        ddpm = sample(net, module.process, old["x_T"], "ddpm", generator=torch.Generator().manual_seed(2))
        dpmpp = sample(net, module.process, old["x_T"], "dpmpp_2m", steps=8, spacing="karras")
    # The stored samples were drawn on another CPU: convolutions and matrix products round differently from one CPU
    # (and SIMD width) to the next, so the same operations agree to float32 rounding, not bit for bit (seen: 3e-7
    # for DDIM, 3e-6 for DDPM's 1000 noisy steps on an AMD EPYC with ATEN_CPU_CAPABILITY=default). 1e-4 is still
    # 80 times finer than one grey level (1/127.5), so any change in the sampler's math would fail.
    torch.testing.assert_close(ddim, old["ddim"], rtol=0, atol=1e-4)
    torch.testing.assert_close(ddpm, old["ddpm"], rtol=0, atol=1e-4)
    # the solvers now form x0 with float64 coefficients: a rounding apart, far below one grey level
    torch.testing.assert_close(dpmpp, old["dpmpp_2m"], rtol=0, atol=1e-4)


def test_flow_fit_and_sample(tmp_path):
    """A rectified-flow run through the CLI; `sample` learns the process from the checkpoint, needs no flag."""
    images = write_image_folder(tmp_path / "images", n_per_class=8, size=16)
    fit = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml",
              "--data.source", "ImageFolder", "--data.source.root", images,
              "--data.batch_size", 8, "--trainer.max_steps", 2, "--trainer.logger.init_args.save_dir", tmp_path / "runs",
              "--model.process", "Flow", "--model.objective.loss_weighting", "min_snr", "--trainer.callbacks", "[]")
    assert fit.returncode == 0, fit.stderr
    ckpt = tmp_path / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["process"]["class_path"].endswith(".Flow")
    heun = cli("sample", "--ckpt_path", ckpt, "--num_samples", 3, "--sampler", "heun", "--steps", 3,
               "--out", tmp_path / "h.npz")
    assert heun.returncode == 0, heun.stderr
    assert "(5 network evaluations per image;" in heun.stdout  # 3 levels: 2 + 2 + 1
    assert np.load(tmp_path / "h.npz")["arr_0"].shape == (3, 16, 16, 1)
    ddpm = cli("sample", "--ckpt_path", ckpt, "--sampler", "ddpm", "--out", tmp_path / "d.npz")
    assert ddpm.returncode == 2 and "Flow model" in ddpm.stderr and "Traceback" not in ddpm.stderr


def test_fid_and_kid_of_one_set_against_itself_are_never_negative():
    """The same 300 features as real and fake: both distances are zero up to rounding, which may fall below it
    (FID's matrix square root in float, KID's unbiased estimate); what is reported is clamped at 0."""
    from diffusion_lit.training.metrics import compute

    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fid, kid = fid_and_kid(16, 100)
    for metric in (fid, kid):
        metric.update(features, real=True)
        metric.update(features, real=False)
    raw = fid.compute().item()
    scores = compute(fid, kid)
    assert abs(raw) < 1e-3 and scores["fid"] == max(raw, 0.0) >= 0
    assert 0 <= scores["kid_mean"] < 1e-3
