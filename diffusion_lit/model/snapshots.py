"""Snapshots of a model's power-function averages (`diffusion_lit.model.ema`), written while it trains, and the
average of any width rebuilt from them after training (EDM2's post-hoc EMA, arXiv 2312.02696, section 3.2).

A snapshot after t steps of the average of exponent gamma is a known mix of the weights of steps 1..t
(`power_profile`). The average of another exponent at step t_r is approximated by the mix of snapshots whose profile
is nearest to its profile in least squares; the same coefficients then mix the snapshots' weights.
"""

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback
from torch import Tensor, nn

from diffusion_lit.core.errors import UserError, reason, say
from diffusion_lit.core.files import write_atomic
from diffusion_lit.model.ema import PowerAveraged, PowerEMA, check_sigma_rel, gamma_of, power_profile

FORMAT = "diffusion_lit EMA snapshot 1"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}
# A width is rebuilt when its profile's relative L2 error, plus the snapshots' rounding times the sum of the
# coefficients' sizes (what mixing many rounded snapshots with large coefficients adds), stays within this.
MAX_ERROR = 0.05
CHUNK = 1 << 14  # steps per block of the least-squares sums (memory: CHUNK x (snapshots + widths) float64)
REBUILT = ("ema", "conditioning.ema")  # the averages snapshots hold and `--ema_length` rebuilds


def power_modules(module: nn.Module) -> dict[str, PowerAveraged]:
    """The power-function averages a model keeps, by their place in it: ``ema`` (the denoiser),
    ``conditioning.ema`` (a text encoder trained with it), ``guide.ema``."""
    return {name: m for name, m in module.named_modules() if isinstance(m, PowerAveraged)}


def snapshot_name(step: int) -> str:
    return f"step{step:08d}.pt"


def snapshot_steps(folder: Path) -> list[int]:
    """The steps of the snapshots in a folder, in order."""
    steps = []
    for path in folder.glob("step*.pt"):
        if path.stem[4:].isdigit():
            steps.append(int(path.stem[4:]))
    return sorted(steps)


def to_prune(steps: list[int], keep: int) -> list[int]:
    """The steps to remove so that at most `keep` remain: repeatedly the inner one whose neighbours lie closest
    together (the first of equals), so the rest stay spread over the run; the first and the last stay."""
    steps, removed = list(steps), []
    while len(steps) > keep:
        j = min(range(1, len(steps) - 1), key=lambda k: steps[k + 1] - steps[k - 1])
        removed.append(steps.pop(j))
    return removed


class Snapshots(Callback):
    """Saves a model's power-function averages (the denoiser's and a text encoder's trained with it: what `Rebuilt`
    rebuilds) every `PowerEMA.snapshot_every` optimizer steps and when training ends, into the `ema` folder beside
    the checkpoints (written atomically, by global rank 0: the averages are the same on every rank), and keeps at most
    `PowerEMA.keep`. The module adds it to the run (`configure_callbacks`).

    Each run folder holds its own snapshots. A run resumed in its folder goes on there, and removes the snapshots
    past the step it resumes from (an abandoned continuation's, which no longer describe this run); a run resumed
    into another folder (a branch, a run that moved) starts its own with links to the snapshots up to its step, and
    leaves the other folder as it is. The run's identity and folder are saved in each checkpoint
    (``ema_snapshots``), so that a snapshot folder of another run is refused.
    """

    def __init__(self, ema: PowerEMA) -> None:
        self.every, self.keep, self.dtype = ema.snapshot_every, ema.keep, DTYPES[ema.snapshot_dtype]
        self.run: str | None = None
        self.folder: str | None = None
        self.written = -1

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        recorded = checkpoint.get("ema_snapshots") or {}
        self.run, self.folder = recorded.get("run"), recorded.get("folder")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["ema_snapshots"] = {"run": self.run, "folder": self.folder}

    def on_train_start(self, trainer, pl_module) -> None:
        beside = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
        here = Path(beside or trainer.default_root_dir, "ema").absolute()
        self.written = trainer.global_step
        if self.run is None:  # a new run (or one resumed from a checkpoint that records no snapshots)
            self.run = trainer.strategy.broadcast(uuid.uuid4().hex)
            if trainer.is_global_zero and snapshot_steps(here):
                raise UserError(f"{here} holds EMA snapshots of another run, which this one would mix with its own: "
                                "move that folder away (or remove it), then start again")
        elif Path(self.folder) != here and trainer.is_global_zero:
            self.start_from(Path(self.folder), trainer, here)
        self.folder = str(here)  # each run folder holds its own snapshots; another's are never changed
        if trainer.is_global_zero and here.is_dir():
            later = [s for s in snapshot_steps(here) if s > trainer.global_step]
            for step in later:
                (here / snapshot_name(step)).unlink(missing_ok=True)
            if later:
                say(f"EMA snapshots: removed {len(later)} of {here} past step {trainer.global_step}, the step this "
                    "run resumes from (written by a continuation that was abandoned)")

    def start_from(self, recorded: Path, trainer, here: Path) -> None:
        """A run resumed into another folder than the one its snapshots were written to (a branch, or a run that
        moved): the snapshots up to its step, from that folder or the `ema` folder beside the checkpoint it resumes
        from, linked (or copied) into its own."""
        sources = [recorded, *([Path(trainer.ckpt_path).parent / "ema"] if trainer.ckpt_path else [])]
        source = next((p for p in sources if p.is_dir() and snapshot_steps(p)), None)
        if source is None or source.resolve() == here.resolve():
            if source is None:
                say(f"EMA snapshots: none of this run's earlier ones are in {recorded}; new ones go to {here} (put the "
                    "earlier ones there to rebuild from all of them)")
            return
        here.mkdir(parents=True, exist_ok=True)
        steps = [s for s in snapshot_steps(source) if s <= trainer.global_step]
        for step in steps:
            if not (here / snapshot_name(step)).exists():
                try:
                    os.link(source / snapshot_name(step), here / snapshot_name(step))
                except OSError:
                    shutil.copy2(source / snapshot_name(step), here / snapshot_name(step))
        say(f"EMA snapshots: this run writes them to {here}, starting with the {len(steps)} of {source} up to step "
            f"{trainer.global_step} (linked; that folder is left as it is)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0 and trainer.global_step > self.written:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > self.written:
            self.write(trainer, pl_module)

    def write(self, trainer, pl_module) -> None:
        step, self.written = trainer.global_step, trainer.global_step
        if not trainer.is_global_zero:
            return
        parts = {name: m for name, m in power_modules(pl_module).items() if name in REBUILT}
        snapshot = {"format": FORMAT, "run": self.run, "step": step,
                    "updates": {name: int(m.n_averaged) for name, m in parts.items()},
                    "sigma_rels": {name: list(m.sigma_rels) for name, m in parts.items()},
                    "averages": {name: [{k: v.to("cpu", self.dtype) for k, v in m.trained_state(i).items()}
                                        for i in range(len(m.gammas))] for name, m in parts.items()}}
        folder = Path(self.folder)
        write_atomic(folder / snapshot_name(step), lambda f: torch.save(snapshot, f), "the EMA snapshot",
                     "free some space, or save fewer snapshots (PowerEMA's keep, snapshot_every)")
        for old in to_prune(snapshot_steps(folder), self.keep):
            (folder / snapshot_name(old)).unlink(missing_ok=True)


def coefficients(columns: list[tuple[int, float]], t: int, gammas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """For each exponent in `gammas`: the mix of snapshot profiles (step, gamma) nearest in least squares to its
    profile at step t (a column of the returned [snapshots, targets] array), and its relative L2 error; one pass over
    the steps for all of them."""
    gram, target = np.zeros((len(columns), len(columns))), np.zeros((len(columns), len(gammas)))
    norm = np.zeros(len(gammas))
    for start in range(1, t + 1, CHUNK):
        steps = np.arange(start, min(start + CHUNK, t + 1))
        profiles = np.stack([power_profile(steps, s, g) for s, g in columns], axis=1)
        wanted = np.stack([power_profile(steps, t, g) for g in gammas], axis=1)
        gram += profiles.T @ profiles
        target += profiles.T @ wanted
        norm += (wanted * wanted).sum(axis=0)
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    residual = norm - 2 * (x * target).sum(axis=0) + (x * (gram @ x)).sum(axis=0)
    return x, np.sqrt(np.maximum(residual, 0.0) / norm)


def updates(snapshot: dict, name: str) -> int:
    """How many updates a part's averages had taken when the snapshot was written (its step, in snapshots that do
    not say)."""
    return int(snapshot.get("updates", {}).get(name, snapshot["step"]))


class Rebuilt:
    """Where the snapshots of a checkpoint's run are, what they hold, and the averages of other widths they give."""

    def __init__(self, module: nn.Module, checkpoint: dict, ckpt_path: str | Path) -> None:
        self.ckpt_path, self.modules = Path(ckpt_path), power_modules(module)
        info = checkpoint.get("ema_snapshots")
        if getattr(module, "ema", None) is None:
            raise UserError(f"--ema_length: {self.ckpt_path} was trained without an EMA (ema_decay null); sample "
                            "its trained weights without --ema_length")
        if "ema" not in self.modules:
            raise UserError(f"--ema_length: {self.ckpt_path} was trained with a constant EMA decay and has no EMA "
                            "snapshots to rebuild another length from; train with model.ema_decay PowerEMA "
                            "(docs/ema.md) to choose the length after training")
        if not isinstance(info, dict):
            raise UserError(f"--ema_length: {self.ckpt_path} does not record its run's EMA snapshots (written before "
                            "its run took a step); give a later checkpoint of the run")
        self.run = info.get("run")
        self.folder = self.find_folder(info.get("folder"))
        self.last = last = int(checkpoint.get("global_step", 0))
        self.paths = {s: self.folder / snapshot_name(s) for s in snapshot_steps(self.folder) if s <= last}
        if not self.paths:
            raise UserError(f"--ema_length: {self.folder} holds no EMA snapshot up to step {last} of "
                            f"{self.ckpt_path}; the run saves them every PowerEMA.snapshot_every steps")
        self.headers = {s: self.read(p) for s, p in self.paths.items()}
        newest = self.headers[max(self.paths)]
        self.step = updates(newest, "ema")  # the rebuilt average is the one of the newest snapshot
        self.dtype = next(iter(newest["averages"]["ema"][0].values())).dtype
        self.solved: dict[tuple[str, float], tuple[np.ndarray, float]] = {}

    def find_folder(self, recorded) -> Path:
        """The `ema` folder beside the checkpoint, or else the one its run recorded: the first that holds this run's
        snapshots."""
        places = [self.ckpt_path.parent / "ema", *([Path(recorded)] if isinstance(recorded, str) else [])]
        places = list(dict.fromkeys(p.absolute() for p in places))
        found = [place for place in places if place.is_dir() and snapshot_steps(place)]
        for place in found:
            if self.read(place / snapshot_name(snapshot_steps(place)[-1]), check_run=False).get("run") == self.run:
                return place
        if found:
            raise UserError(f"the EMA snapshots in {found[0]} belong to another run than {self.ckpt_path}: give the "
                            "checkpoint of the run that wrote them, or put this run's `ema` folder beside it")
        raise UserError(f"--ema_length: no EMA snapshot of {self.ckpt_path} is in {' nor '.join(map(str, places))}; "
                        "put the run's `ema` folder, with its stepNNNNNNNN.pt files, beside the checkpoint")

    def read(self, path: Path, check_run: bool = True) -> dict:
        try:
            snapshot = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise UserError(f"the EMA snapshot {path} cannot be read ({reason(err)}): a damaged file; remove it and "
                            "the rest are used") from None
        if not isinstance(snapshot, dict) or snapshot.get("format") != FORMAT:
            raise UserError(f"{path} is not an EMA snapshot of diffusion_lit; keep only the run's snapshots in "
                            f"{path.parent}")
        if check_run and snapshot.get("run") != self.run:
            raise UserError(f"the EMA snapshot {path} belongs to another run than {self.ckpt_path}: give the "
                            "checkpoint of the run that wrote that folder, or put this run's `ema` folder beside it")
        return snapshot

    def columns(self, name: str) -> list[tuple[int, int, int, float]]:
        """(step, the part's updates by then, index of the width, gamma) of every snapshot average of one part."""
        return [(s, updates(h, name), i, gamma_of(w)) for s, h in sorted(self.headers.items())
                for i, w in enumerate(h["sigma_rels"].get(name, ()))]

    def solve(self, widths: list[float], name: str = "ema") -> list[tuple[np.ndarray, float]]:
        """The coefficients of each width and its error: the profile's, plus the snapshots' rounding amplified by
        the coefficients (what mixing many rounded snapshots with large coefficients adds). Remembered."""
        new = [w for w in dict.fromkeys(widths) if (name, w) not in self.solved]
        if new:
            x, err = coefficients([(u, g) for _, u, _, g in self.columns(name)], self.step, [gamma_of(w) for w in new])
            for k, w in enumerate(new):
                self.solved[name, w] = x[:, k], float(err[k]) + ROUNDOFF.get(self.dtype, 0.0) * np.abs(x[:, k]).sum()
        return [self.solved[name, w] for w in widths]

    def reach(self) -> tuple[float, float] | None:
        """The narrowest and widest widths rebuilt within MAX_ERROR (on a grid), None when there are none."""
        grid = [float(s) for s in np.geomspace(0.005, 0.285, 80)]
        good = [s for s, (_, err) in zip(grid, self.solve(grid)) if err <= MAX_ERROR]
        return (min(good), max(good)) if good else None

    def check(self, widths: list[float]) -> None:
        """A UserError for the first width the snapshots do not allow."""
        for sigma_rel in widths:
            check_sigma_rel(sigma_rel, "--ema_length")
        for sigma_rel, (_, err) in zip(widths, self.solve(widths)):
            if err > MAX_ERROR:
                span = self.reach()
                allowed = f"from {span[0]:.3f} to {span[1]:.3f}" if span else "none"
                tracked = ", ".join(f"{w:g}" for w in self.modules["ema"].sigma_rels)
                raise UserError(f"--ema_length {sigma_rel}: the {len(self.paths)} EMA snapshots of this run (widths "
                                f"{tracked}, up to step {self.step}) rebuild it only roughly (error {err:.2f}); "
                                f"the widths they rebuild within {MAX_ERROR} run {allowed}")

    def apply(self, sigma_rel: float) -> str:
        """Puts the averages of width sigma_rel (the denoiser's, and a text encoder's trained with it) where the model
        samples from; what was done, in words. A UserError for a width outside what the snapshots allow."""
        self.check([sigma_rel])
        for name in REBUILT:
            if name in self.modules:
                self.load_mix(name, self.solve([sigma_rel], name)[0][0])
        older = f", {self.last - self.step} steps before the checkpoint's" if self.last > max(self.paths) else ""
        return (f"EMA length {sigma_rel:g} rebuilt from {len(self.paths)} snapshots at step {self.step}{older} "
                f"(error {self.solve([sigma_rel])[0][1]:.4f})")

    def load_mix(self, name: str, coeffs: np.ndarray) -> None:
        mixed: dict[str, Tensor] = {}
        for (step, _, i, _), c in zip(self.columns(name), coeffs):
            for key, value in self.headers[step]["averages"][name][i].items():
                if not torch.isfinite(value).all():
                    raise UserError(f"the EMA snapshot {self.paths[step]} holds values that are not finite ({key}): a "
                                    "damaged file; remove it and the rest are used")
                term = value.to(torch.float64) * float(c)
                mixed[key] = mixed[key] + term if key in mixed else term
        own = dict(self.modules[name].module.named_parameters())
        with torch.no_grad():
            for key, value in mixed.items():
                own[key].copy_(value.to(own[key].dtype))
