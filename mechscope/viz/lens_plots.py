"""The logit lens as a heatmap of layers x positions, coloured by a target's probability (log scale).

Three forms: a rich table for the terminal (cell backgrounds with black or white text, legible on
dark and light terminals), a plotly figure for HTML (top tokens on hover), and a PNG.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
from rich.style import Style
from rich.table import Table
from rich.text import Text

from mechscope.lens import LensResult
from mechscope.viz.report import save_png
from mechscope.viz.token_heatmap import _no_math

FLOOR = 1e-10  # probabilities below this share the coldest colour


def _log_probs(lens: LensResult, target: int) -> np.ndarray:
    return np.log10(np.clip(lens.probs[:, :, target].numpy(), FLOOR, 1.0))


def _column_labels(lens: LensResult) -> list[str]:
    return [f"{p}:{lens.tokens[p]!r}"[:18] for p in lens.positions]


def _cell_style(log_prob: float) -> Style:
    from matplotlib import colormaps

    frac = (log_prob - math.log10(FLOOR)) / -math.log10(FLOOR)
    r, g, b, _ = colormaps["viridis"](frac)
    light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
    return Style(bgcolor=f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}", color="black" if light else "white")


def lens_table(lens: LensResult, target: int = 0) -> Table:
    """A rich table: one row per layer, one column per position, P(target) in each cell."""
    table = Table(title=f"logit lens: P({lens.targets[target]!r}) after each layer", title_justify="left")
    table.add_column("layer", justify="right")
    for label in _column_labels(lens):
        table.add_column(label, justify="right")
    logp = _log_probs(lens, target)
    for r, row in enumerate(lens.rows):
        cells = [Text(f"{lens.probs[r, c, target]:.1e}", style=_cell_style(logp[r, c])) for c in range(len(lens.positions))]
        table.add_row(row, *cells)
    return table


def _escaped(text: str) -> str:
    """plotly reads tags and entities in labels and hover text: escape tokens so they show as they are."""
    return html.escape(text)


def lens_figure(lens: LensResult, target: int = 0):
    """A plotly heatmap; hovering a cell shows P(target), its rank and the top tokens there."""
    import plotly.graph_objects as go

    name = _escaped(repr(lens.targets[target]))
    hover = [
        [
            f"layer {row}, pos {pos} {_escaped(repr(lens.tokens[pos]))}<br>P({name}) = {lens.probs[r, c, target]:.3g}"
            f" (rank {int(lens.ranks[r, c, target])})<br>top: "
            + ", ".join(
                f"{_escaped(repr(t))} {p:.2f}" for t, p in zip(lens.top_tokens[r][c], lens.top_probs[r, c].tolist(), strict=True)
            )
            for c, pos in enumerate(lens.positions)
        ]
        for r, row in enumerate(lens.rows)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=_log_probs(lens, target),
            x=[_escaped(label) for label in _column_labels(lens)],
            y=lens.rows,
            hovertext=hover,
            hoverinfo="text",
            colorscale="Viridis",
            zmin=math.log10(FLOOR),
            zmax=0,
            colorbar={"title": "log10 P"},
        )
    )
    fig.update_layout(
        title=f"Logit lens: P({name}) by layer and position",
        yaxis={"autorange": "reversed", "title": "layer (residual stream after it)", "type": "category"},
        xaxis={"title": "position", "type": "category"},
        height=max(400, 22 * len(lens.rows) + 150),
    )
    return fig


def lens_png(lens: LensResult, path: str | Path, target: int = 0) -> Path:
    """Save the heatmap as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2 + 1.1 * len(lens.positions), 1.5 + 0.25 * len(lens.rows)))
    image = ax.imshow(_log_probs(lens, target), aspect="auto", cmap="viridis", vmin=math.log10(FLOOR), vmax=0)
    ax.set_xticks(range(len(lens.positions)), [_no_math(label) for label in _column_labels(lens)], rotation=45, ha="right")
    ax.set_yticks(range(len(lens.rows)), lens.rows)
    ax.set_ylabel("layer (residual stream after it)")
    ax.set_title(_no_math(f"Logit lens: P({lens.targets[target]!r})"))
    fig.colorbar(image, ax=ax, label="log10 P")
    fig.tight_layout()
    return save_png(fig, path)
