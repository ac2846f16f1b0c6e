"""A run stopped mid-epoch and resumed from last.ckpt trains on exactly the batches an uninterrupted run trains on,
for every kind of source: the train loader's position (torchdata's StatefulDataLoader, litdata's StreamingDataLoader)
travels in the checkpoint with the data module."""

import pytest
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from built_data import BatchLog, hf_layout, read_log
from conftest import tiny_unet, write_image_folder
from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.data.hf_data import HFDataset
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.data.sources import ImageFolder
from diffusion_lit.commands.optimize import optimize
from diffusion_lit.data.streaming import Streaming

N = 6  # 32 training images in batches of 8: the run stops two batches into its second epoch


class ReadsStepsAhead(DiffusionModule):
    """Reads `estimated_stepping_batches` in configure_optimizers, which makes Lightning 2.6 drop the loader state it
    restores itself (pytorch-lightning #20550): the data module's own copy must carry the position anyway."""

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0
        return super().configure_optimizers()


def source(kind: str, tmp_path):
    if kind == "folder":
        return ImageFolder(str(write_image_folder(tmp_path / "images", n_per_class=20)))
    if kind == "hf":
        return HFDataset(str(hf_layout(tmp_path, "save_to_disk", n_per_class=20)))
    optimize(ImageFolder(str(write_image_folder(tmp_path / "images", n_per_class=20))), str(tmp_path / "chunks"))
    return Streaming(str(tmp_path / "chunks"))


def run(make_source, log, ckpt_dir, max_steps, workers, ckpt_path=None):
    seed_everything(0)
    data = DiffusionDataModule(make_source(), batch_size=8, num_workers=workers, val_fraction=0.2)
    model = ReadsStepsAhead(net=tiny_unet, image_size=data.image_size, channels=data.channels)
    trainer = Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[BatchLog(str(log)), ModelCheckpoint(
                          dirpath=ckpt_dir, save_last=True, every_n_train_steps=N, save_top_k=-1)])
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=False)


@pytest.mark.parametrize("kind,workers", [("folder", 2), ("hf", 0), ("streaming", 2), ("streaming", 0)])
def test_a_resumed_run_trains_on_the_batches_of_an_uninterrupted_one(tmp_path, kind, workers):
    made = source(kind, tmp_path)
    run(lambda: made, tmp_path / "straight.log", tmp_path / "a", 2 * N, workers)
    run(lambda: made, tmp_path / "stopped.log", tmp_path / "b", N, workers)
    run(lambda: made, tmp_path / "resumed.log", tmp_path / "b", 2 * N, workers, ckpt_path=tmp_path / "b" / "last.ckpt")

    straight = read_log(tmp_path / "straight.log")
    stopped, resumed = read_log(tmp_path / "stopped.log"), read_log(tmp_path / "resumed.log")
    assert [step for step, _, _ in straight] == list(range(2 * N))
    assert stopped + resumed == straight  # the same images in the same batches at the same steps
    assert len({digest for _, _, digest in straight[:4]}) == 4  # four distinct batches an epoch, not one repeated
    assert [d for _, _, d in straight[:4]] != [d for _, _, d in straight[4:8]]  # shuffled again in epoch two



def test_under_ddp_each_rank_resumes_on_its_own_batches(ddp_runs):
    """Two ranks, for a folder and for streamed chunks of it: an uninterrupted run of 10 steps, and a run stopped at
    step 6 and resumed to 10 (conftest.ddp_runs)."""
    for kind in ("folder", "streaming"):
        straight = sorted(read_log(ddp_runs / kind / "straight.log"))
        # 32 training images, 2 ranks of batch 4: 4 steps an epoch, so the run stopped mid-epoch and went on into
        # the next two
        assert [(step, rank) for step, rank, _ in straight] == [(s, r) for s in range(10) for r in (0, 1)], kind
        resumed = sorted(read_log(ddp_runs / kind / "stopped.log") + read_log(ddp_runs / kind / "resumed.log"))
        assert resumed == straight, kind
        first_epoch = [digest for step, _, digest in straight if step < 4]
        assert len(set(first_epoch)) == 8, kind  # each rank its own share


def other_folder(tmp_path):
    return ImageFolder(str(write_image_folder(tmp_path / "other", n_per_class=24)))


@pytest.mark.parametrize("resumed_on,line", [
    ("root", "--data.source.root "),
    ("batch_size", "--data.batch_size 8 -> 4"),
    ("seed", "--data.seed 0 -> 1"),  # another split and shuffle of the same images
    ("streaming", "--data.source diffusion_lit.data.sources.ImageFolder -> diffusion_lit.data.streaming.Streaming"),
])
def test_a_resume_onto_other_data_says_its_epoch_starts_again(tmp_path, capsys, resumed_on, line):
    """The saved position belongs to the data and batch size it was saved with: resumed onto others it is not applied
    to them (their batches would be neither the old run's nor a fresh epoch's), and one line says so."""
    made = source("folder", tmp_path)
    run(lambda: made, tmp_path / "stopped.log", tmp_path / "b", N, 0)
    other = {"root": lambda: other_folder(tmp_path), "batch_size": lambda: made, "seed": lambda: made,
             "streaming": lambda: source("streaming", tmp_path / "s")}[resumed_on]()
    capsys.readouterr()
    batch = 4 if resumed_on == "batch_size" else 8
    seed_everything(0)
    data = DiffusionDataModule(other, batch_size=batch, num_workers=0, val_fraction=0.2, seed=int(resumed_on == "seed"))
    model = ReadsStepsAhead(net=tiny_unet, image_size=data.image_size, channels=data.channels)
    trainer = Trainer(max_steps=N + 2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, enable_checkpointing=False,
                      callbacks=[BatchLog(str(tmp_path / "resumed.log"))])
    trainer.fit(model, data, ckpt_path=tmp_path / "b" / "last.ckpt", weights_only=False)
    said = [x for x in capsys.readouterr().err.splitlines() if "loader position" in x]
    assert len(said) == 1 and line in said[0] and "its epoch starts again from its first batch" in said[0], said
    assert [step for step, _, _ in read_log(tmp_path / "resumed.log")] == [N, N + 1]


def test_a_stream_resumed_with_other_workers_says_its_batches_differ(tmp_path, capsys):
    made = source("streaming", tmp_path)
    run(lambda: made, tmp_path / "stopped.log", tmp_path / "b", N, 2)
    capsys.readouterr()
    run(lambda: made, tmp_path / "resumed.log", tmp_path / "b", N + 2, 0, ckpt_path=tmp_path / "b" / "last.ckpt")
    said = [x for x in capsys.readouterr().err.splitlines() if "num_workers" in x]
    assert len(said) == 1 and "saved with --data.num_workers 2 and this run has 0" in said[0], said
    assert "differ from an uninterrupted run's (resume with 2 to go on exactly)" in said[0]
