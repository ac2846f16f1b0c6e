"""Few-step students tuned from a frozen teacher (`model.teacher`): a closed-form teacher's one-step map learnt, the
guided teacher velocity and sample against plain teacher calls, the endpoint rows' target, the checks when fit
starts, the student's checkpoint (no teacher in it; it samples without one), resume and the recorded teacher, and
the couplings (whole chunks, another teacher's refused, SIGTERM and going on)."""

import shutil
from functools import partial

import diffusers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_unet, write_image_folder
from diffusion_lit.core.errors import UserError
from diffusion_lit.io.couplings import Couplings
from diffusion_lit.io.loading import load_checkpoint
from diffusion_lit.io.teacher import CheckpointTeacher
from diffusion_lit.model.conditioning import Labels
from diffusion_lit.model.latent import Latent
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.objective import MeanFlow, Objective
from diffusion_lit.model.process import Flow
from diffusion_lit.model.teacher import Teacher
from diffusion_lit.sampling.samplers import sample
from test_cli import REPO, cli
from test_meanflow import MU, S, GaussianMeanFlow, assert_one_error_line


class GaussianTeacher(Teacher):
    """The exact velocity of the flow for data x0 ~ N(MU, S²) per pixel (test_meanflow's closed form)."""

    exact = GaussianMeanFlow(MU, S, instantaneous=True)

    def velocity(self, process, z, t, y=None):
        return self.exact(z, 1000 * torch.stack([t, torch.zeros_like(t)], 1))

    def draw(self, process, noise, y=None):
        return MU + S * noise  # the flow's map from t = 1 to 0


class AffineStudent(nn.Module):
    """u(z, r, t) = a(t, t - r) z + b(t, t - r): the Gaussian flow map is affine in z, so the exact u is in reach."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, z, times, y=None):
        a, b = self.mlp(times / 1000).unbind(1)
        return a.view(-1, 1, 1, 1) * z + b.view(-1, 1, 1, 1)


def test_a_student_of_a_closed_form_teacher_learns_its_one_step_map():
    # Times drawn wide (logit-normal, deviation 3: many intervals near [0, 1]) and r = t on a quarter, so that the
    # one-step map is learnt within 1,500 steps (measured on three seeds: variance within 1.5%, samples within 0.02
    # of the exact map; with the recipe's settings or 300 steps, off by 10-30%).
    torch.manual_seed(0)
    student, g = AffineStudent(), torch.Generator().manual_seed(1)
    objective, teacher = MeanFlow(flow_matching_share=0.25, t_mean=0.0, t_std=3.0), GaussianTeacher()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 1500)
    for _ in range(1500):
        loss = objective.loss(student, Flow(), MU + S * torch.randn(128, 1, 2, 2, generator=g), generator=g,
                              teacher=teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()

    x_T = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = sample(student, Flow(), x_T, sampler="meanflow", steps=1, prediction="u")
    # 16,384 values: standard errors 0.004 (mean) and 1.1% (variance); the tolerances are 4 and 5 of those.
    assert abs(x.mean() - MU) < 0.015 and abs(x.var() / S**2 - 1) < 0.05, (x.mean(), x.var())
    torch.testing.assert_close(x, MU + S * x_T, rtol=0, atol=0.05)  # the map itself, sample by sample (0.004)

    # The teacher's target holds no data noise: on fresh draws the student's loss against it is near 0 (measured
    # 3e-4), while against eps - x0 it keeps the irreducible E[(v_c - v)²] (sd_r / sd_t)² of test_meanflow.
    x0, plain = MU + S * torch.randn(4096, 1, 2, 2, generator=g), MeanFlow(t_mean=0.0, t_std=3.0, p=0.0)
    taught = plain.loss(student, Flow(), x0, generator=torch.Generator().manual_seed(3), teacher=teacher)
    noisy = plain.loss(student, Flow(), x0, generator=torch.Generator().manual_seed(3))
    assert taught < 0.01 < noisy, (taught, noisy)


# --- checkpoints: teachers of several kinds, one-step fit runs on 8x8 images ---------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    images = write_image_folder(tmp / "images", n_per_class=8, size=8)
    for name in ("vae", "other_vae"):
        torch.manual_seed(len(name))
        diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 16),
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                norm_num_groups=4, scaling_factor=0.5).save_pretrained(tmp / name)
    fit_args = ["--config", REPO / "configs/tiny_cpu.yaml", "--data.source", "ImageFolder", "--data.source.root",
                images, "--data.image_size", 8, "--data.batch_size", 8, "--trainer.enable_progress_bar", "false",
                "--trainer.callbacks", "[]", "--trainer.logger.init_args.save_dir", tmp / "runs"]

    def fit(name, *extra):
        result = cli("fit", *fit_args, "--trainer.max_steps", 1, "--trainer.logger.init_args.name", name, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        return tmp / "runs" / name / "checkpoints" / "last.ckpt"

    small_guide = ["--model.guide", "Guide", "--model.guide.net", "UNet", "--model.guide.net.base_channels", 8,
                   "--model.guide.net.channel_mult", "[1]", "--model.guide.net.norm_groups", 4,
                   "--model.guide.net.attention_resolutions", "[]"]
    ckpt = {"flow": fit("flow", "--model.process", "Flow", *small_guide), "weak": fit("weak", "--model.process", "Flow"),
            "class": fit("class", "--model.process", "Flow", "--model.conditioning", "Labels"),
            "vp": fit("vp"),
            "latent": fit("latent", "--model.process", "Flow", "--model.latent", "Latent",
                          "--model.latent.autoencoder", tmp / "vae")}
    return tmp, ckpt, fit_args


def student(**parts) -> DiffusionModule:
    parts = {"image_size": 8, "objective": MeanFlow(), **parts}
    return DiffusionModule(partial(tiny_unet, interval_input=True), channels=1, process=Flow(), **parts)


def perturb(net: nn.Module, seed: int = 0) -> nn.Module:
    """A one-step run's EMA is near its zero-initialised output: noise in its weights, so that outputs differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def test_the_guided_teacher_velocity_is_the_plain_teacher_calls_mixed_by_hand(runs):
    _, ckpt, _ = runs
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0.1, 0.3, 0.45, 0.6, 0.8, 0.95])
    times, w = 1000 * t, 3.0

    # Autoguidance by a guide checkpoint on the interval (0.7, 5] of sigma / alpha = t / (1 - t): rows 2-4.
    teacher = CheckpointTeacher(ckpt["flow"], guidance_scale=w, guide_ckpt=str(ckpt["weak"]),
                                guidance_interval=(0.7, 5.0))
    teacher.bind(student())
    net, guide = (perturb(n, seed) for seed, n in enumerate((teacher.loaded.net, teacher.loaded.guide)))
    with torch.no_grad():
        main, weak = net(z, times), guide(z, times)
    inside = torch.tensor([False, False, True, True, True, False]).view(-1, 1, 1, 1)
    assert ((t / (1 - t) > 0.7) & (t / (1 - t) <= 5)).tolist() == inside.flatten().tolist()
    by_hand = torch.where(inside, weak + w * (main - weak), main)
    # The guide runs on the inside rows alone, the network on all: per-row results of other batch shapes (1e-6).
    torch.testing.assert_close(teacher.velocity(Flow(), z, t), by_hand, rtol=1e-5, atol=1e-5)
    assert (by_hand - main).abs().amax() > 1e-2  # the guidance moved the inside rows

    # The teacher's own guide (trained beside it), everywhere.
    own = CheckpointTeacher(ckpt["flow"], guidance_scale=w)
    own.bind(student())
    net, guide = own.loaded.net, own.loaded.guide
    perturb(guide, 1)
    with torch.no_grad():
        main, weak = net(z, times), guide(z, times)
    torch.testing.assert_close(own.velocity(Flow(), z, t), weak + w * (main - weak), rtol=1e-5, atol=1e-5)

    # Classifier-free: the null label (2: two classes) as the weak side; a row already at null stays itself.
    cfg = CheckpointTeacher(ckpt["class"], guidance_scale=w)
    cfg.bind(student(num_classes=2, conditioning=Labels()))
    net = perturb(cfg.loaded.net)
    y, null = torch.tensor([0, 1, 2, 0, 1, 2]), torch.full((6,), 2)
    with torch.no_grad():
        main, weak = net(z, times, y), net(z, times, null)
    torch.testing.assert_close(cfg.velocity(Flow(), z, t, y), weak + w * (main - weak), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cfg.velocity(Flow(), z, t, y)[2], main[2], rtol=1e-5, atol=1e-5)

    # Its own sample for the endpoint rows: DDIM at eta 0 (Euler on the flow) over the guided teacher, by hand
    # (unclipped: a pixel teacher's DDIM clips its x0 at every step, a latent one's does not).
    assert teacher.loaded.clip_x0
    teacher.loaded = teacher.loaded._replace(clip_x0=False)
    noise = torch.randn(2, 1, 8, 8, generator=g)
    x, levels = noise, torch.linspace(1, 0, teacher.steps + 1)
    for a, b in zip(levels[:-1], levels[1:]):
        x = x + (b - a) * teacher.velocity(Flow(), x, a.expand(2))
    torch.testing.assert_close(teacher.draw(Flow(), noise), x, rtol=1e-5, atol=1e-5)

    # The MeanFlow target from the teacher: v_T in place of eps - x0 (r = t: the loss is flow matching on v_T).
    x0, eps = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.randn(6, 1, 8, 8, generator=g)
    learner = perturb(tiny_unet(1, 8, interval_input=True))
    zt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    loss = MeanFlow(flow_matching_share=1.0, p=0.0).loss_at(learner, Flow(), x0, eps, t, t, teacher=teacher)
    with torch.no_grad():
        expected = F.mse_loss(learner(zt, times), teacher.velocity(Flow(), zt, t))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_the_endpoint_rows_regress_the_one_step_map_on_the_teachers_samples():
    objective, g = MeanFlow(flow_matching_share=0.5, endpoint_share=0.25), torch.Generator().manual_seed(0)
    r, t = objective.draw(8, "cpu", g)
    assert torch.equal(r[:4], t[:4]) and (r[4:6] < t[4:6]).all()  # r = t, then the MeanFlow identity
    assert r[6:].tolist() == [0.0, 0.0] and t[6:].tolist() == [1.0, 1.0]  # the last quarter: the whole interval
    r, t = MeanFlow(flow_matching_share=0.5, endpoint_share=0.5).draw(3, "cpu", g)  # 1.5 rows each, rounded up
    assert torch.equal(r[:2], t[:2]) and (r[2], t[2]) == (0.0, 1.0)  # r = t kept where the two would overlap
    r, t = objective.draw(8, "cpu", g)
    learner = AffineStudent()
    x0, eps = MU + S * torch.randn(8, 1, 2, 2, generator=g), torch.randn(8, 1, 2, 2, generator=g)
    teacher = GaussianTeacher()
    plain = MeanFlow(flow_matching_share=0.5, endpoint_share=0.25, p=0.0)
    error = lambda rows: plain.loss_at(learner, Flow(), x0[rows], eps[rows], r[rows], t[rows], teacher=teacher)
    ends = slice(6, 8)
    with torch.no_grad():  # u(eps, 0, 1) against eps - (MU + S eps), whatever x0 was
        by_hand = F.mse_loss(learner(eps[ends], torch.tensor([[1000.0, 1000.0]] * 2)), eps[ends] - teacher.draw(
            Flow(), eps[ends]))
    torch.testing.assert_close(error(ends), by_hand, rtol=1e-6, atol=0)
    torch.testing.assert_close(error(slice(0, 8)), (6 * error(slice(0, 6)) + 2 * by_hand) / 8, rtol=1e-5, atol=0)
    with pytest.raises(UserError, match="endpoint_share must lie in"):
        MeanFlow(flow_matching_share=0.75, endpoint_share=0.5)
    with pytest.raises(UserError, match="has no model.teacher"):
        student(objective=MeanFlow(endpoint_share=0.1))


def test_a_teacher_of_another_kind_is_refused_in_one_line(runs):
    tmp, ckpt, _ = runs

    def refused(path, learner, *phrases, **settings):
        with pytest.raises(UserError) as caught:
            CheckpointTeacher(path, **settings).bind(learner)
        line = str(caught.value)
        assert "\n" not in line and all(p in line for p in phrases), line

    refused(ckpt["vp"], student(), "its process is {'process': 'vp'", "a teacher is a model of the student's")
    refused(ckpt["flow"], student(image_size=16), "its shape is (1, 8, 8)")
    refused(ckpt["class"], student(), "its classes is 2")
    refused(ckpt["flow"], student(num_classes=2, conditioning=Labels()), "its classes is 0")
    refused(ckpt["latent"], student(), "the teacher is a latent model and this model a pixel model")
    refused(ckpt["flow"], student(image_size=8, latent=Latent(str(tmp / "vae"))),
            "the teacher is a pixel model and this model a latent model")
    refused(ckpt["latent"], student(latent=Latent(str(tmp / "other_vae"))), "another autoencoder")
    refused(tmp / "none.ckpt", student(), "no such checkpoint")
    refused(ckpt["weak"], student(), "no guide of its own", "guide_ckpt", guidance_scale=2)
    refused(ckpt["flow"], student(), "unused at guidance_scale 1", guide_ckpt=str(ckpt["weak"]))
    with pytest.raises(UserError, match="objective is MeanFlow"):
        DiffusionModule(tiny_unet, image_size=8, channels=1, process=Flow(), objective=Objective(),
                        teacher=CheckpointTeacher(ckpt["flow"]))
    with pytest.raises(UserError, match="give the guidance to the teacher"):
        student(objective=MeanFlow(guidance_scale=2), num_classes=2, conditioning=Labels(),
                teacher=CheckpointTeacher(ckpt["class"]))
    for bad, phrase in (({"guidance_scale": -1}, "must not be negative"), ({"guidance_interval": (2, 1)}, "LO < HI")):
        with pytest.raises(UserError, match=phrase):
            CheckpointTeacher(ckpt["flow"], **bad)


def test_a_student_resumes_exactly_holds_no_teacher_and_samples_without_it(runs):
    tmp, ckpt, fit_args = runs
    teacher = tmp / "teacher.ckpt"
    shutil.copy(ckpt["flow"], teacher)

    def fit(name, *extra):
        return cli("fit", *fit_args, "--model.process", "Flow", "--model.objective", "MeanFlow",
                   "--model.teacher", "diffusion_lit.io.teacher.CheckpointTeacher",
                   "--model.teacher.ckpt_path", teacher, "--model.teacher.guidance_scale", 2,
                   "--model.teacher.guide_ckpt", ckpt["weak"], "--model.teacher.guidance_interval", "[0.5, 5]",
                   "--model.objective.endpoint_share", 0.25, "--model.teacher.couplings", 256,  # one chunk
                   "--trainer.callbacks+=InitFrom", "--trainer.callbacks.path", teacher,
                   "--checkpoint.every_n_train_steps", 2, "--trainer.logger.init_args.name", name, *extra)

    assert fit("straight", "--trainer.max_steps", 4).returncode == 0
    half = fit("resumed", "--trainer.max_steps", 2)
    assert half.returncode == 0 and "teacher: " in half.stderr and "guided at w 2" in half.stderr, half.stderr[-3000:]
    resumed = fit("resumed", "--trainer.max_steps", 4, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = {name: tmp / "runs" / name / "checkpoints" / "last.ckpt" for name in ("straight", "resumed")}
    a, b = (torch.load(p, weights_only=True) for p in last.values())
    assert a["global_step"] == b["global_step"] == 4 and a["prediction"] == "u"
    for key in a["state_dict"]:  # the same code twice on one machine: bit for bit
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key

    # The teacher is recorded by its fingerprint, never its weights: the student's tensors are its own network and
    # EMA copy, no more than a MeanFlow model's.
    assert a["teacher"]["fingerprint"] == b["teacher"]["fingerprint"] and "w 2" in a["teacher"]["guidance"]
    assert {k.split(".")[0] for k in a["state_dict"]} == {"net", "ema"}
    assert len(a["state_dict"]) == len(load_checkpoint(str(last["straight"]))[0].state_dict())

    pairs = list(tmp.glob("couplings-*/chunk_*.pt"))  # drawn once beside the teacher, read by the other runs
    assert len(pairs) == 1 and pairs[0].parent.name == f"couplings-{a['teacher']['fingerprint']}"

    # Resuming with another teacher (other weights at the same path) is refused before a step, and before any pair
    # of the other teacher is drawn.
    shutil.copy(ckpt["weak"], teacher)
    other = fit("resumed", "--trainer.max_steps", 6, "--ckpt_path", "last")
    assert_one_error_line(other, "learnt from a teacher of fingerprint", "resume with the teacher")
    assert len(list(tmp.glob("couplings-*"))) == 1

    teacher.unlink()  # the student loads and samples without its teacher
    out = tmp / "one_step.png"
    drawn = cli("sample", "--ckpt_path", last["straight"], "--sampler", "meanflow", "--steps", 1,
                "--num_samples", 4, "--out", out)
    assert drawn.returncode == 0 and out.is_file(), drawn.stderr[-3000:]
    assert_one_error_line(cli("export", "--ckpt_path", last["straight"], "--out", tmp / "pipe"),
                          "no diffusers scheduler")
    # A new run whose teacher is gone says so in one line, before a step.
    gone = fit("gone", "--trainer.max_steps", 1, "--trainer.callbacks.path", ckpt["flow"])  # InitFrom's file is there
    assert_one_error_line(gone, "teacher", "no such checkpoint", "train the teacher first")


# --- couplings ------------------------------------------------------------------------------------------------------

def fake_draw(noise, labels):
    return 0.5 * noise + (0.0 if labels is None else labels.view(-1, 1, 1, 1).float())


def test_couplings_are_drawn_once_in_atomic_chunks_and_refused_for_another_teacher(tmp_path):
    calls = []
    store = Couplings(tmp_path / "pairs", 600, "abc", (1, 2, 2), num_classes=3)
    store.fill(lambda n, y: calls.append(len(n)) or fake_draw(n, y), torch.device("cpu"))
    assert calls == [256] * 3 and sorted(p.name for p in (tmp_path / "pairs").iterdir()) == [
        "chunk_000000.pt", "chunk_000001.pt", "chunk_000002.pt"]  # no temporary file left
    noise, sample, labels = store.pairs
    assert len(noise) == len(sample) == len(labels) == 600 and labels[:4].tolist() == [0, 1, 2, 0]
    torch.testing.assert_close(sample, fake_draw(noise, labels))
    assert len(torch.unique(noise.flatten(1), dim=0)) == 600  # no pair twice

    again = Couplings(tmp_path / "pairs", 600, "abc", (1, 2, 2), num_classes=3)
    (tmp_path / "pairs" / "chunk_000001.pt").unlink()  # a chunk lost: drawn again, the same pairs
    again.fill(lambda n, y: calls.append(len(n)) or fake_draw(n, y), torch.device("cpu"))
    assert calls == [256] * 4 and all(torch.equal(a, b) for a, b in zip(again.pairs, store.pairs))
    torch.manual_seed(0)
    z1, x1, y1 = again.pick(5, torch.device("cpu"))
    torch.testing.assert_close(x1, fake_draw(z1, y1))  # each pick a pair, with its label

    with pytest.raises(UserError, match="drawn by another teacher") as caught:
        Couplings(tmp_path / "pairs", 600, "other", (1, 2, 2), num_classes=3).fill(fake_draw, torch.device("cpu"))
    assert "\n" not in str(caught.value)


STOPPED_FILL = """
import sys, time, torch
from diffusion_lit.io.couplings import Couplings
from diffusion_lit.training.checkpointing import stop_on_signals
stop_on_signals(whole_process=True)
def draw(noise, labels):
    print("chunk", flush=True)
    time.sleep(0.3)
    return 0.5 * noise
Couplings(sys.argv[1], 2560, "abc", (1, 2, 2)).fill(draw, torch.device("cpu"))
"""


def test_couplings_stopped_by_sigterm_go_on_from_the_first_missing_chunk(tmp_path):
    import signal
    import subprocess
    import sys

    folder = tmp_path / "pairs"
    child = subprocess.Popen([sys.executable, "-c", STOPPED_FILL, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    for _ in range(3):  # three chunks begun: two written
        assert child.stdout.readline().strip() == "chunk"
    child.send_signal(signal.SIGTERM)
    child.communicate(timeout=60)
    written = sorted(folder.glob("chunk_*.pt"))
    assert child.returncode != 0 and 2 <= len(written) < 10, (child.returncode, written)
    assert not list(folder.glob(".*tmp"))  # the chunk cut short left nothing

    drawn = []
    store = Couplings(folder, 2560, "abc", (1, 2, 2))
    store.fill(lambda n, y: drawn.append(1) or 0.5 * n, torch.device("cpu"))
    assert len(drawn) == 10 - len(written)  # only the missing ones
    whole = Couplings(tmp_path / "whole", 2560, "abc", (1, 2, 2))
    whole.fill(lambda n, y: 0.5 * n, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(store.pairs[:2], whole.pairs[:2]))  # as if never stopped
    assert len(torch.unique(store.pairs[0].flatten(1), dim=0)) == 2560
