"""Plots of dictionaries: training curves from the metrics log, and the feature-density histogram."""

from __future__ import annotations

import json
import math
from pathlib import Path

CURVES = (
    ("fvu", "eval_fvu", "FVU (train, held-out)"),
    ("l0", "eval_l0", "L0"),
    ("dead", None, "dead fraction"),
    ("loss", None, "loss"),
)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a training metrics log (`metrics.jsonl`)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def training_curves_png(metrics: list[dict], out: str | Path, title: str = "training") -> None:
    """Loss, FVU, L0 and dead fraction against training tokens, as a 2 x 2 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
    tokens = [m["tokens"] / 1e6 for m in metrics]
    for ax, (key, held, label) in zip(axes.flat, CURVES, strict=True):
        ax.plot(tokens, [m.get(key, math.nan) for m in metrics], lw=1, label="train")
        if held:
            points = [(m["tokens"] / 1e6, m[held]) for m in metrics if held in m]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", ms=3, lw=1, label="held-out")
                ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training tokens (millions)", fontsize=8)
        if key in ("fvu", "loss"):
            ax.set_yscale("log")
    fig.suptitle(title.replace("$", r"\$"), fontsize=11)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def density_histogram_png(density: list[float], out: str | Path, title: str = "feature density") -> None:
    """A histogram of log10(firing fraction) over latents, dead latents counted apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alive = [math.log10(d) for d in density if d > 0]
    dead = len(density) - len(alive)
    fig, ax = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    ax.hist(alive, bins=60, color="#4c72b0")
    ax.set_xlabel("log10(fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title.replace('$', chr(92) + '$')} · {len(density):,} latents, {dead:,} never fired", fontsize=10)
    fig.savefig(out, dpi=110)
    plt.close(fig)
