"""The EMA length chosen after training: the `ema` command (a checkpoint whose EMA weights are the average of a
chosen width, rebuilt from the run's snapshots), and the table and plot of an `evaluate` sweep over widths."""

import io
from pathlib import Path

import torch

from diffusion_lit.core.errors import UserError
from diffusion_lit.core.files import write_atomic
from diffusion_lit.core.optional import need
from diffusion_lit.core.trust import parse_trusted
from diffusion_lit.io.loading import load_checkpoint
from diffusion_lit.model.snapshots import REBUILT, power_modules

COLUMNS = {"fid": "FID", "kid_mean": "KID", "confident_share": "confident", "requested_share": "as asked",
           "frame_mean": "frame mean", "grey_frame_share": "grey frames"}


def ema(ckpt_path: str, ema_length: float, out: str, trust_class: str | None = None,
        autoencoder: str | None = None) -> None:
    """Write a copy of a checkpoint whose EMA weights (the denoiser's, and a text encoder's trained with it) are the
    average of relative width `ema_length`, rebuilt from the run's snapshots: it samples, evaluates and exports as any
    checkpoint, without the snapshots.

    Args:
        ckpt_path: a checkpoint of a run trained with model.ema_decay PowerEMA.
        ema_length: the relative width (EDM2's sigma_rel) of the average to write.
        out: the checkpoint file to write.
        trust_class: your own network or optimizer classes that the checkpoint may name (see `sample`).
        autoencoder: for a latent model whose autoencoder moved: its new place (see `sample`).
    """
    target = Path(out)
    if target.resolve() == Path(ckpt_path).resolve():
        raise UserError(f"--out {out} is the checkpoint itself; write the rebuilt one to another file")
    if target.is_dir():
        raise UserError(f"--out {out} is a folder; give the checkpoint file to write, such as {target / 'ema.ckpt'}")
    module, checkpoint = load_checkpoint(ckpt_path, parse_trusted(trust_class), autoencoder, ema_length)
    state = module.state_dict()
    for name in REBUILT:
        if name in power_modules(module):
            prefix = f"{name}.module."
            checkpoint["state_dict"].update({k: v.cpu() for k, v in state.items() if k.startswith(prefix)})
    run = (checkpoint.get("ema_rebuilt") or {}).get("from", str(Path(ckpt_path).resolve()))  # the run's own file
    checkpoint["ema_rebuilt"] = {"ema_length": ema_length, "from": run}
    write_atomic(target, lambda f: torch.save(checkpoint, f), "the checkpoint", "give --out another place")
    print(f"wrote {target}: the EMA of length {ema_length:g} of {ckpt_path}")


def check_plot(plot: str, widths: list) -> None:
    """A UserError for a plot that cannot be drawn, before any image is."""
    if not plot.lower().endswith(".png"):
        raise UserError(f"--plot {plot}: give a .png file")
    if widths == [None]:
        raise UserError("--plot draws scores against the EMA length: give --ema_length a list of widths")
    need("matplotlib", "plot")


def sweep_table(rows: list[dict]) -> str:
    """A Markdown table of a sweep's rows: the EMA length, the guidance scale and the scores."""
    scores = [key for key in COLUMNS if key in rows[0]]
    head = ["EMA length", "guidance", *(COLUMNS[k] for k in scores)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row.get('ema_length', '-')}", f"{row.get('guidance_scale', '-')}"]
        cells += [f"{row[k]:.3f}" if k in ("confident_share", "requested_share", "grey_frame_share")
                  else f"{row[k]:.4g}" for k in scores]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(rows: list[dict], plot: str) -> Path:
    """FID (and, scored by the digit judge, the confident share and the grey frames) against the EMA length, one
    line per guidance scale, as a PNG file."""
    matplotlib = need("matplotlib", "plot")
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = [k for k in ("fid", "confident_share", "grey_frame_share") if k in rows[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    scales = sorted({row.get("guidance_scale", 1.0) for row in rows})
    for ax, key in zip(axes[0], panels):
        for scale in scales:
            mine = [r for r in rows if r.get("guidance_scale", 1.0) == scale]
            ax.plot([r["ema_length"] for r in mine], [r[key] for r in mine], marker="o",
                    label="unguided" if scale == 1.0 else f"guidance {scale:g}")
        ax.set_xlabel("EMA length (sigma_rel)")
        ax.set_ylabel(COLUMNS[key])
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(Path(plot), lambda f: f.write(buffer.getvalue()), "the plot", "give --plot another place")
