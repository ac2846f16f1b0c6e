"""A run of 2N steps and a run of N steps + resume + N steps must end in the same state."""

from functools import partial

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_lit.data.datamodule import DiffusionDataModule
from diffusion_lit.model.module import DiffusionModule
from diffusion_lit.model.objective import Objective
from diffusion_lit.model.process import Flow
from diffusion_lit.data.sources import ImageFolder

from conftest import tiny_unet, write_image_folder
from test_guidance import tiny_guide

N = 6  # 32 training images in batches of 8: resuming mid-way through the second epoch


def run(root, ckpt_dir, max_steps, ckpt_path=None, **objective):
    seed_everything(0)
    data = DiffusionDataModule(ImageFolder(str(root)), batch_size=8, num_workers=0, val_fraction=0.2)
    model = DiffusionModule(
        net=tiny_unet, image_size=data.image_size, channels=data.channels, ema_decay=0.99, warmup_steps=3,
        optimizer=partial(torch.optim.AdamW, lr=1e-3), **objective,
    )
    model.net.down[0][0].dropout.p = 0.1  # dropout draws from the global generator: resume must restore it
    trainer = Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        deterministic=True, val_check_interval=4, check_val_every_n_epoch=None, gradient_clip_val=1.0,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=N, save_top_k=-1)],
    )
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=False)  # hparams hold the test's partials
    return trainer, model


@pytest.mark.parametrize("objective", [{}, {"process": Flow(), "objective": Objective(loss_weighting="min_snr")},
                                       {"guide": tiny_guide}],
                         ids=["ddpm", "flow", "guide"])
def test_resumed_run_matches_uninterrupted_run(tmp_path, objective):
    root = write_image_folder(tmp_path / "images", n_per_class=20)  # 40 images: 32 train, 8 val
    straight, straight_model = run(root, tmp_path / "a", 2 * N, **objective)
    run(root, tmp_path / "b", N, **objective)
    resumed, resumed_model = run(root, tmp_path / "b", 2 * N, ckpt_path=tmp_path / "b" / "last.ckpt", **objective)

    assert resumed.global_step == straight.global_step == 2 * N
    assert resumed.current_epoch == straight.current_epoch
    for a, b in zip(straight_model.ema.parameters(), resumed_model.ema.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(straight_model.net.parameters(), resumed_model.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    straight_state, resumed_state = straight_model.state_dict(), resumed_model.state_dict()
    assert straight_state.keys() == resumed_state.keys()
    for key in straight_state:  # every tensor, the guide's and its EMA's too
        torch.testing.assert_close(straight_state[key], resumed_state[key], rtol=0, atol=1e-6, msg=key)
    opt_a, opt_b = straight.optimizers[0].state_dict(), resumed.optimizers[0].state_dict()
    for i, state in opt_a["state"].items():
        assert state["step"] == opt_b["state"][i]["step"] == 2 * N
        torch.testing.assert_close(state["exp_avg"], opt_b["state"][i]["exp_avg"], rtol=0, atol=1e-6)
        torch.testing.assert_close(state["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"], rtol=0, atol=1e-9)
    assert straight.lr_scheduler_configs[0].scheduler.last_epoch == resumed.lr_scheduler_configs[0].scheduler.last_epoch
