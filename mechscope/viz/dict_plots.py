"""Plots of dictionaries: training curves from the metrics log, the feature-density histogram, and where
across its written sites a dictionary's features write (decoder-norm profiles)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mechscope.viz.report import save_png

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
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
    scale, unit = (1e6, "millions") if max((m["tokens"] for m in metrics), default=0) >= 1e6 else (1e3, "thousands")
    tokens = [m["tokens"] / scale for m in metrics]
    for ax, (key, held, label) in zip(axes.flat, CURVES, strict=True):
        ax.plot(tokens, [m.get(key, math.nan) for m in metrics], lw=1, label="train")
        if held:
            points = [(m["tokens"] / scale, m[held]) for m in metrics if held in m]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", ms=3, lw=1, label="held-out")
                ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(f"training tokens ({unit})", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))  # short runs: a few labels, not one per step
        if key in ("fvu", "loss"):
            ax.set_yscale("log")
    fig.suptitle(title.replace("$", r"\$"), fontsize=11)
    save_png(fig, out)  # creates the folder


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
    save_png(fig, out)  # creates the folder


def decoder_profile_png(
    profile, sites: list[str], out: str | Path, title: str = "decoder profile", share: float = 0.8, layers=None
) -> None:
    """Two panels for a dictionary writing W sites, from its decoder profile [F, W] (`Dictionary.decoder_profile`):
    how many latents need 1..W sites to hold `share` of their squared decoder norm, and the median (with
    the 10th-90th percentile band) of each site's norm relative to the latent's largest, latents grouped by
    the site they write most, or, given `layers` [F] (a CLT's `latent_site`), by the layer they read (each
    group drawn from the first site it can write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from mechscope.dictionaries.evaluate import sites_carrying

    profile = torch.as_tensor(profile).float()
    F, W = profile.shape
    counts = torch.bincount(sites_carrying(profile, share), minlength=W + 1)[1:]
    relative = profile / profile.max(dim=1, keepdim=True).values.clamp_min(1e-30)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    left.bar(range(1, W + 1), counts.tolist(), color="#4c72b0")
    left.set_xticks(range(1, W + 1))
    left.set_xlabel(f"sites holding {share:.0%} of a latent's squared decoder norm")
    left.set_ylabel("latents")
    left.set_title(f"{F:,} latents", fontsize=10)
    labels = [s.replace("blocks.", "").replace(".hook_", " ") for s in sites]
    peak = profile.argmax(dim=1) if layers is None else torch.as_tensor(layers)
    colours = plt.get_cmap("viridis")
    for w in range(W):
        group = relative[peak == w]
        if len(group) == 0:
            continue
        first = 0 if layers is None else w  # a CLT's latents of layer w cannot write the sites before it
        low, mid, high = (group[:, first:].quantile(q, dim=0).tolist() for q in (0.1, 0.5, 0.9))
        colour = colours(w / max(1, W - 1))
        name = labels[w] if layers is None else "layer " + labels[w].split(" ")[0]
        right.plot(range(first, W), mid, "o-", color=colour, label=f"{name} ({len(group):,})")
        right.fill_between(range(first, W), low, high, color=colour, alpha=0.15)
    right.set_xticks(range(W), labels, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("decoder norm / the latent's largest")
    right.set_ylim(0, 1.05)
    grouped = "the site they write most" if layers is None else "the layer they read"
    right.set_title(f"latents grouped by {grouped}: median, 10-90 %", fontsize=10)
    legend = "peak site (latents)" if layers is None else "reading (latents)"
    right.legend(fontsize=7, title=legend, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(title.replace("$", chr(92) + "$"), fontsize=10)
    save_png(fig, out)  # creates the folder
