"""EDM2's power-function EMA: the update against its closed form, widths rebuilt from snapshots, resume and
gradient accumulation, and what is refused."""

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_lit.core.errors import UserError
from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.data.sources import ImageFolder
from diffusion_lit.model.ema import PowerAveraged, PowerEMA, gamma_of, power_profile, sigma_rel_of
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.conditioning import Prompts
from diffusion_lit.model.guidance import Guide
from diffusion_lit.model.snapshots import Rebuilt, Snapshots, power_modules, snapshot_steps, to_prune
from diffusion_lit.nets.text import ByteTextEncoder

from conftest import tiny_unet, write_image_folder
from test_cli import REPO, cli

GOLDEN = Path(__file__).parent / "data" / "golden_v3"


def test_widths_and_exponents_are_edm2s():
    # EDM2 (section 3.1): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01) and gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.07, 0.2, 0.28):
        assert sigma_rel_of(gamma_of(s)) == pytest.approx(s, rel=1e-9)


def test_the_update_is_the_closed_form_power_average():
    """Weights that move as a + b i (and c i^2) in the step i: the incremental average equals the sum of the
    closed-form profile's weights times the trajectory, and tends to the continuous mean a + b t (g+1) / (g+2)."""
    net = torch.nn.Linear(1, 1)
    average = PowerAveraged(net, PowerEMA([0.05, 0.2]))
    steps = 400
    for i in range(1, steps + 1):
        with torch.no_grad():
            net.weight.fill_(2.0 + 0.5 * i)
            net.bias.fill_(1e-4 * i * i)
        average.update_parameters(net)
    i = np.arange(1, steps + 1)
    for copy, gamma in zip(average.averages(), average.gammas):
        w = power_profile(i, steps, gamma)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        assert not power_profile(np.arange(steps + 1, 2 * steps), steps, gamma).any()  # nothing after step t
        assert copy.weight.item() == pytest.approx((w * (2.0 + 0.5 * i)).sum(), rel=1e-6)
        assert copy.bias.item() == pytest.approx((w * 1e-4 * i * i).sum(), rel=1e-6)
        continuous = 2.0 + 0.5 * steps * (gamma + 1) / (gamma + 2)
        assert copy.weight.item() == pytest.approx(continuous, rel=2 / steps)  # the discrete sum's O(1/t) offset


def test_pruning_keeps_the_steps_spread():
    steps = list(range(10, 110, 10))
    removed = to_prune(steps, 6)
    kept = [s for s in steps if s not in removed]
    assert len(kept) == 6 and kept[0] == 10 and kept[-1] == 100
    assert max(np.diff(kept)) <= 2 * min(np.diff(kept))
    assert to_prune(steps, 20) == []


def walk(tmp_path, sigma_rels=(0.05, 0.10), dtype="float32", steps=200, every=10, keep=40, direct=(0.07,)):
    """A module whose weights take a random walk with drift for `steps` updates, its power averages saved every
    `every` steps (as training does), and averages of the `direct` widths tracked beside it."""
    torch.manual_seed(0)
    module = DiffusionModule(net=tiny_unet, image_size=8, channels=1,
                             ema_decay=PowerEMA(sigma_rels, snapshot_every=every, keep=keep, snapshot_dtype=dtype))
    alongside = PowerAveraged(module.net, PowerEMA(direct))
    snapshots = Snapshots(module.hparams.ema_decay)
    snapshots.run, snapshots.folder = "run-a", str(tmp_path / "ema")
    drift = [torch.randn_like(p) for p in module.net.parameters()]
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p, d in zip(module.net.parameters(), drift):
                p.add_(0.01 * d + 0.02 * torch.randn_like(p))
        module.ema.update_parameters(module.net)
        alongside.update_parameters(module.net)
        if step % every == 0:
            snapshots.write(SimpleNamespace(global_step=step, is_global_zero=True), module)
    checkpoint = {"ema_snapshots": {"run": snapshots.run, "folder": snapshots.folder}, "global_step": steps}
    return module, alongside, checkpoint


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_a_tracked_width_is_rebuilt_exactly_and_another_closely(tmp_path):
    module, alongside, checkpoint = walk(tmp_path)
    tracked = [flat(m) for m in module.ema.averages()]
    rebuilt = Rebuilt(module, checkpoint, tmp_path / "last.ckpt")
    assert len(rebuilt.paths) == 20 and rebuilt.step == 200
    rebuilt.apply(0.10)
    torch.testing.assert_close(flat(module.ema.module), tracked[1], rtol=0, atol=1e-5)  # float32 rounding of the mix
    rebuilt.apply(0.05)
    torch.testing.assert_close(flat(module.ema.module), tracked[0], rtol=0, atol=1e-5)
    # 0.07, between the tracked widths: within 1% of how far apart the tracked ones lie (profile error 2e-4)
    rebuilt.apply(0.07)
    spread = (tracked[0] - tracked[1]).abs().max()
    assert (flat(module.ema.module) - flat(alongside.module)).abs().max() < 0.01 * spread


def test_half_precision_snapshots_rebuild_within_their_rounding(tmp_path):
    module, alongside, checkpoint = walk(tmp_path, dtype="float16")
    tracked = flat(module.ema.averages()[1])
    Rebuilt(module, checkpoint, tmp_path / "last.ckpt").apply(0.10)
    assert ((flat(module.ema.module) - tracked).abs() <= 1e-3 * tracked.abs() + 1e-5).all()  # float16: 2^-11


def test_widths_the_snapshots_cannot_give_and_other_runs_are_refused(tmp_path):
    module, _, checkpoint = walk(tmp_path, steps=40, every=10)
    rebuilt = Rebuilt(module, checkpoint, tmp_path / "last.ckpt")
    roughly = r"--ema_length 0.01: .* rebuild it only roughly .* run from 0\.04\d to 0\.1\d+"
    with pytest.raises(UserError, match=roughly):
        rebuilt.apply(0.01)
    with pytest.raises(UserError, match="must be above 0 and below 0.2887"):
        rebuilt.apply(0.3)
    with pytest.raises(UserError, match="belongs? to another run"):
        Rebuilt(module, {**checkpoint, "ema_snapshots": {**checkpoint["ema_snapshots"], "run": "run-b"}}, "x.ckpt")
    constant = DiffusionModule(net=tiny_unet, image_size=8, channels=1, ema_decay=0.99)
    damaged = torch.load(tmp_path / "ema" / "step00000020.pt", weights_only=True)
    next(iter(damaged["averages"]["ema"][0].values()))[0] = float("nan")
    torch.save(damaged, tmp_path / "ema" / "step00000020.pt")
    with pytest.raises(UserError, match="step00000020.pt holds values that are not finite"):
        Rebuilt(module, checkpoint, tmp_path / "last.ckpt").apply(0.08)
    with pytest.raises(UserError, match="constant EMA decay and has no EMA snapshots"):
        Rebuilt(constant, {"global_step": 40}, "old.ckpt")
    moved = {**checkpoint, "ema_snapshots": {**checkpoint["ema_snapshots"], "folder": str(tmp_path / "gone")}}
    with pytest.raises(UserError, match="no EMA snapshot of .* is in .*elsewhere.ema nor .*gone"):
        Rebuilt(module, moved, tmp_path / "elsewhere" / "last.ckpt")


def run(root, ckpt_dir, max_steps, ckpt_path=None, accumulate=1):
    seed_everything(0)
    data = DiffusionDataModule(ImageFolder(str(root)), batch_size=8, num_workers=0, val_fraction=0.2)
    model = DiffusionModule(net=tiny_unet, image_size=data.image_size, channels=data.channels,
                            ema_decay=PowerEMA([0.05, 0.10], snapshot_every=2, keep=4, snapshot_dtype="float32"),
                            optimizer=partial(torch.optim.AdamW, lr=1e-3))
    trainer = Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      deterministic=True, limit_val_batches=0, accumulate_grad_batches=accumulate,
                      callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=3,
                                                 save_top_k=-1)])
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=False)  # hparams hold the test's partials
    return model


def snapshots_of(folder: Path) -> dict[int, dict]:
    return {s: torch.load(folder / f"step{s:08d}.pt", weights_only=True) for s in snapshot_steps(folder)}


def test_a_resumed_run_has_the_averages_and_snapshots_of_an_uninterrupted_one(tmp_path):
    root = write_image_folder(tmp_path / "images", n_per_class=20)
    straight = run(root, tmp_path / "a", 9)
    # b runs to the end, then is resumed from step 3: the snapshots past step 3 are an abandoned continuation's
    run(root, tmp_path / "b", 9)
    (tmp_path / "b" / "last.ckpt").unlink()
    resumed = run(root, tmp_path / "b", 9, ckpt_path=next((tmp_path / "b").glob("*step=3.ckpt")))
    assert int(resumed.ema.n_averaged) == int(straight.ema.n_averaged) == 9
    a, b = straight.state_dict(), resumed.state_dict()
    for key in a:
        if key.startswith("ema."):
            assert torch.equal(a[key], b[key]), key
    mine, theirs = snapshots_of(tmp_path / "a" / "ema"), snapshots_of(tmp_path / "b" / "ema")
    # every 2 steps and at the end, pruned to 4 (8 went: its neighbours lie closest together)
    assert list(mine) == list(theirs) == [2, 4, 6, 9]
    for step in mine:
        assert mine[step]["step"] == step
        for x, y in zip(mine[step]["averages"]["ema"], theirs[step]["averages"]["ema"]):
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_run_resumed_into_another_folder_leaves_the_first_as_it_was(tmp_path):
    root = write_image_folder(tmp_path / "images", n_per_class=20)
    run(root, tmp_path / "a", 9)
    before = snapshots_of(tmp_path / "a" / "ema")
    run(root, tmp_path / "branch", 9, ckpt_path=next((tmp_path / "a").glob("*step=3.ckpt")))
    after = snapshots_of(tmp_path / "a" / "ema")
    assert list(after) == list(before) == [2, 4, 6, 9]
    assert all(torch.equal(after[9]["averages"]["ema"][0][k], before[9]["averages"]["ema"][0][k])
               for k in before[9]["averages"]["ema"][0])
    assert snapshot_steps(tmp_path / "branch" / "ema") == [2, 4, 6, 9]  # step 2 linked, the rest its own


def test_gradient_accumulation_averages_once_per_optimizer_step(tmp_path):
    root = write_image_folder(tmp_path / "images", n_per_class=20)
    model = run(root, tmp_path / "a", 3, accumulate=2)
    assert int(model.ema.n_averaged) == 3
    assert snapshot_steps(tmp_path / "a" / "ema") == [2, 3]


@pytest.fixture(scope="module")
def power_run(tmp_path_factory):
    """A tiny run of `fit` with the power-function EMA, snapshots in float32 every 2 steps."""
    tmp = tmp_path_factory.mktemp("power")
    images = write_image_folder(tmp / "images", n_per_class=16, size=16)
    result = cli(
        "fit", "--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "ImageFolder",
        "--data.source.root", images, "--data.batch_size", 8, "--trainer.max_steps", 8,
        "--trainer.logger.init_args.save_dir", tmp / "runs", "--trainer.callbacks", "[]",
        "--model.ema_decay", "diffusion_lit.model.ema.PowerEMA", "--model.ema_decay.snapshot_every", 2,
        "--model.ema_decay.snapshot_dtype", "float32",
    )
    assert result.returncode == 0, result.stderr
    return tmp


def test_sample_evaluate_and_ema_draw_a_chosen_length(power_run, tmp_path):
    ckpt = power_run / "runs" / "tiny_cpu" / "checkpoints" / "last.ckpt"
    common = ["sample", "--ckpt_path", ckpt, "--num_samples", 4, "--steps", 3]
    assert cli(*common, "--out", tmp_path / "plain.npz").returncode == 0
    tracked = cli(*common, "--ema_length", 0.05, "--out", tmp_path / "tracked.npz")
    assert tracked.returncode == 0 and "EMA length 0.05 rebuilt from 4 snapshots at step 8" in tracked.stderr
    plain, same = (np.load(tmp_path / f"{n}.npz")["arr_0"].astype(int) for n in ("plain", "tracked"))
    assert np.abs(plain - same).max() <= 1  # the first tracked width is what plain sampling uses

    wrote = cli("ema", "--ckpt_path", ckpt, "--ema_length", 0.12, "--out", tmp_path / "w12.ckpt")
    assert wrote.returncode == 0, wrote.stderr
    assert cli("sample", "--ckpt_path", tmp_path / "w12.ckpt", "--num_samples", 4, "--steps", 3,
               "--out", tmp_path / "from_file.npz").returncode == 0
    assert cli(*common, "--ema_length", 0.12, "--out", tmp_path / "rebuilt.npz").returncode == 0
    from_file, rebuilt = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in ("from_file", "rebuilt"))
    assert np.array_equal(from_file, rebuilt) and not np.array_equal(rebuilt, plain.astype(np.uint8))

    resumed = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--ckpt_path", tmp_path / "w12.ckpt",
                  "--trainer.max_steps", 10)
    assert resumed.returncode == 2 and "rebuilt after training" in resumed.stderr
    assert "Traceback" not in resumed.stderr

    sweep = cli("evaluate", "--ckpt_path", ckpt, "--real", power_run / "images", "--feature_extractor",
                "features.TinyFeatures", "--num_samples", 8, "--steps", 2, "--ema_length", "[0.05, 0.1, 0.15]",
                "--plot", tmp_path / "sweep.png", cwd=Path(__file__).parent)
    assert sweep.returncode == 0, sweep.stderr
    rows = [line for line in sweep.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3 and '"ema_length": 0.15' in rows[2]
    assert "| EMA length | guidance | FID | KID |" in sweep.stderr
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("setting", [["--model.ema_decay.keep", 1], ["--model.ema_decay.sigma_rels", "[]"],
                                     ["--model.ema_decay.snapshot_every", 0], ["--model.ema_decay.snapshot_dtype", "int8"]])
def test_power_ema_settings_that_make_no_sense_are_one_line(setting, tmp_path):
    result = cli("fit", "--config", REPO / "configs/tiny_cpu.yaml", "--trainer.max_steps", 1,
                 "--trainer.logger.init_args.save_dir", tmp_path, "--model.ema_decay",
                 "diffusion_lit.model.ema.PowerEMA", *setting)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: PowerEMA's")


def test_a_constant_ema_checkpoint_is_refused_in_one_line(tmp_path):
    result = cli("sample", "--ckpt_path", GOLDEN / "vp_guide.ckpt", "--ema_length", 0.1, "--out", tmp_path / "x.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --ema_length: ")


def test_a_new_run_does_not_mix_its_snapshots_with_another_runs(tmp_path):
    root = write_image_folder(tmp_path / "images", n_per_class=20)
    run(root, tmp_path / "a", 2)
    for ckpt in (tmp_path / "a").glob("*.ckpt"):
        ckpt.unlink()
    with pytest.raises(UserError, match="holds EMA snapshots of another run"):
        run(root, tmp_path / "a", 2)
    assert snapshot_steps(tmp_path / "a" / "ema") == [2]  # the other run's, untouched


def test_the_text_encoder_and_the_guide_average_alike(tmp_path):
    """A text encoder trained with the model takes the model's PowerEMA, and --ema_length rebuilds it too; a guide
    may keep a PowerEMA of its own (its first width guides; its averages are not snapshotted)."""
    ema = PowerEMA([0.05, 0.10], snapshot_every=5, snapshot_dtype="float32")
    module = DiffusionModule(net=tiny_unet, image_size=8, channels=1, ema_decay=ema,
                             conditioning=Prompts(ByteTextEncoder(width=32, max_length=16)),
                             guide=partial(Guide, net=partial(tiny_unet, base_channels=8, channel_mult=(1,),
                                                              norm_groups=4), ema_decay=PowerEMA([0.02])))
    assert set(power_modules(module)) == {"ema", "conditioning.ema", "guide.ema"}
    snapshots = Snapshots(ema)
    snapshots.run, snapshots.folder = "run-t", str(tmp_path / "ema")
    for step in range(1, 11):
        with torch.no_grad():
            for p in [*module.net.parameters(), *module.conditioning.encoder.parameters()]:
                p.add_(0.01 * torch.randn_like(p))
        module.ema.update_parameters(module.net)
        module.conditioning.update_ema()
        module.guide.ema.update_parameters(module.guide.net)
        if step % 5 == 0:
            snapshots.write(SimpleNamespace(global_step=step, is_global_zero=True), module)
    saved = torch.load(tmp_path / "ema" / "step00000010.pt", weights_only=True)
    assert set(saved["averages"]) == {"ema", "conditioning.ema"} and saved["updates"]["conditioning.ema"] == 10
    wide = flat(module.conditioning.ema.averages()[1])
    Rebuilt(module, {"ema_snapshots": {"run": "run-t", "folder": snapshots.folder}, "global_step": 10},
            tmp_path / "last.ckpt").apply(0.10)
    torch.testing.assert_close(flat(module.conditioning.ema.module), wide, rtol=0, atol=1e-5)


def test_under_ddp_rank_zero_writes_the_snapshots_of_one_run(ddp_runs):
    """Two ranks, 10 steps straight, and 6 steps then resumed to 10 (conftest.ddp_runs): one set of snapshots per
    folder, all of one run; the steps before the stop are the same in both."""
    straight, resumed = ddp_runs / "folder" / "straight" / "ema", ddp_runs / "folder" / "ema"
    assert snapshot_steps(straight) == snapshot_steps(resumed) == [2, 4, 6, 8, 10]
    assert not [p for p in [*straight.iterdir(), *resumed.iterdir()] if p.suffix != ".pt"]  # no temporary left
    a, b = snapshots_of(straight), snapshots_of(resumed)
    assert len({s["run"] for s in a.values()}) == len({s["run"] for s in b.values()}) == 1
    for step in (2, 4, 6):
        for x, y in zip(a[step]["averages"]["ema"], b[step]["averages"]["ema"]):
            assert all(torch.equal(x[k], y[k]) for k in x)
