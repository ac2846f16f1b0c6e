"""The suite's two-rank fits, in one launch: starting two processes and importing everything in each costs more than
the fits. `conftest.ddp_runs` prepares the data and the jobs (`prepare`), runs this script, and the tests read what
the fits wrote. Lightning launches this script again as rank 1, which runs the same jobs in the same order.

Jobs: `fid` (test_callbacks: FID, grids and the guide checkpoint under DDP); for a folder and for streamed chunks of it,
an uninterrupted run of 10 steps, and a run stopped at step 6 and resumed from its last.ckpt to step 10, each logging
the batches it trains on (test_loader_resume), with the power EMA's snapshots (test_ema)."""

import json
import sys
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything

from built_data import BatchLog
from conftest import tiny_unet, write_image_folder
from diffusion_lit.training.checkpointing import Checkpoint
from diffusion_lit.cli import main
from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.model.ema import PowerEMA
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.data.sources import ImageFolder
from diffusion_lit.commands.optimize import optimize
from diffusion_lit.data.streaming import Streaming

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def prepare(tmp: Path) -> None:
    """The data and tmp/jobs.json."""
    from test_callbacks import DDP_FID_ARGS, callback_fit_args

    (tmp / "fid").mkdir()
    fid = [str(word) for word in callback_fit_args(tmp / "fid", *DDP_FID_ARGS, *DDP)]
    images = write_image_folder(tmp / "images", n_per_class=20)
    optimize(ImageFolder(str(images)), str(tmp / "chunks"))
    (tmp / "jobs.json").write_text(json.dumps({"fid": fid, "resume": ["folder", "streaming"]}))


def run(source, folder: Path, log: str, max_steps: int, resume: bool = False) -> None:
    seed_everything(0)
    data = DiffusionDataModule(source, batch_size=4, num_workers=1, val_fraction=0.2)
    # The power EMA's snapshots under two ranks (test_ema): every 2 steps, into folder/ema
    model = DiffusionModule(net=tiny_unet, image_size=8, channels=1,
                            ema_decay=PowerEMA([0.05, 0.10], snapshot_every=2, snapshot_dtype="float32"))
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[BatchLog(str(folder / log)), Checkpoint(dirpath=folder, save_last=True,
                                                                         every_n_train_steps=1000)])
    # weights_only=False: the test's hyperparameters hold a partial (tiny_unet)
    trainer.fit(model, data, ckpt_path=folder / "last.ckpt" if resume else None, weights_only=False)


if __name__ == "__main__":
    tmp = Path(sys.argv[1])
    jobs = json.loads((tmp / "jobs.json").read_text())
    main(jobs["fid"])
    for kind in jobs["resume"]:
        source = ImageFolder(str(tmp / "images")) if kind == "folder" else Streaming(str(tmp / "chunks"))
        (tmp / kind / "straight").mkdir(parents=True, exist_ok=True)
        run(source, tmp / kind / "straight", "../straight.log", 10)
        run(source, tmp / kind, "stopped.log", 6)
        run(source, tmp / kind, "resumed.log", 10, resume=True)
