"""The logit lens as a heatmap of layers x positions, coloured by a target's probability (log scale).

Four forms: a rich table for the terminal (cell backgrounds with black or white text, legible on
dark and light terminals; the last positions that fit the width, with a note when some do not), a
light HTML grid (`lens_html`, no plotly: P, rank and the top tokens on hover), a plotly figure
(`lens_figure`) and a PNG sized to its grid.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
from rich.style import Style
from rich.text import Text

from mechscope.lens import LensResult
from mechscope.viz.html_figures import colourbar_html, grid_html
from mechscope.viz.report import save_png
from mechscope.viz.shown import for_png, plain, position_label, token_label
from mechscope.viz.terminal import Column, FittedTable

FLOOR = 1e-10  # probabilities below this share the coldest colour
NUMBERS_UP_TO = 12
"""Grids with at most this many positions write P in each cell (HTML and PNG)."""


def _log_probs(lens: LensResult, target: int) -> np.ndarray:
    return np.log10(np.clip(lens.probs[:, :, target].numpy(), FLOOR, 1.0))


def _target(lens: LensResult, target: int) -> str:
    t = lens.targets[target]
    return token_label(t) if isinstance(t, str) else f"token {t}"


def _column_labels(lens: LensResult, width: int = 18) -> list[str]:
    return [position_label(p, lens.tokens[p], width) for p in lens.positions]


def _viridis(log_prob: float) -> tuple[int, int, int]:
    from matplotlib import colormaps

    frac = (log_prob - math.log10(FLOOR)) / -math.log10(FLOOR)
    r, g, b, _ = colormaps["viridis"](frac)
    return round(r * 255), round(g * 255), round(b * 255)


def _cell_style(log_prob: float) -> Style:
    r, g, b = _viridis(log_prob)
    light = (0.299 * r + 0.587 * g + 0.114 * b) / 255 > 0.5
    return Style(bgcolor=f"#{r:02x}{g:02x}{b:02x}", color="black" if light else "white")


def lens_table(lens: LensResult, target: int = 0) -> FittedTable:
    """A table for the terminal: one row per layer, one column per position, P(target) in each cell.

    A prompt too long for the console's width shows its last positions, with a note saying so.
    """
    logp = _log_probs(lens, target)
    columns = []
    for c, pos in enumerate(lens.positions):
        shown = token_label(lens.tokens[pos])
        header = plain(f"{pos}\n{shown if len(shown) <= 10 else shown[:9] + '…'}")
        cells = [Text(f"{lens.probs[r, c, target]:.1e}", style=_cell_style(logp[r, c])) for r in range(len(lens.rows))]
        columns.append(Column(header, cells))
    title = plain(f"logit lens: P({_target(lens, target)}) after each layer")
    priority = list(reversed(range(len(columns))))
    return FittedTable(title, "layer", lens.rows, columns, priority, chosen="the last positions")


def _hover(lens: LensResult, target: int, r: int, c: int) -> str:
    """Plain text: the cell, P(target) and its rank, the top tokens there."""
    pos = lens.positions[c]
    top = ", ".join(
        f"{token_label(t)} {p:.2f}" for t, p in zip(lens.top_tokens[r][c], lens.top_probs[r, c].tolist(), strict=True)
    )
    return (
        f"layer {lens.rows[r]}, pos {pos} {token_label(lens.tokens[pos])}\n"
        f"P({_target(lens, target)}) = {lens.probs[r, c, target]:.3g} (rank {int(lens.ranks[r, c, target])})\ntop: {top}"
    )


def lens_html(lens: LensResult, target: int = 0) -> str:
    """A light HTML grid (no plotly): layers down, positions across; P, rank and the top tokens on hover."""
    logp = _log_probs(lens, target)
    rows, cols = range(len(lens.rows)), range(len(lens.positions))
    colours = [[_viridis(logp[r, c]) for c in cols] for r in rows]
    hover = [[_hover(lens, target, r, c) for c in cols] for r in rows]
    few = len(lens.positions) <= NUMBERS_UP_TO
    numbers = [[f"{lens.probs[r, c, target]:.1e}" for c in cols] for r in rows] if few else None
    stops = [_viridis(math.log10(FLOOR) * (1 - k / 8)) for k in range(9)]
    legend = colourbar_html(stops, f"P ≤ {FLOOR:.0e}", "1", ["(log scale; hover a cell for its rank and the top tokens)"])
    heading = f"<div class='ms-axis'>Logit lens: P({html.escape(_target(lens, target))}) by layer and position</div>"
    return heading + grid_html(
        lens.rows, _column_labels(lens), colours, hover, numbers=numbers, row_title="layer", col_title="position", legend=legend
    )


def lens_figure(lens: LensResult, target: int = 0):
    """A plotly heatmap; hovering a cell shows P(target), its rank and the top tokens there."""
    import plotly.graph_objects as go

    # plotly reads tags and entities in labels and hover text: escape them so tokens show as they are
    rows, cols = range(len(lens.rows)), range(len(lens.positions))
    hover = [[html.escape(_hover(lens, target, r, c)).replace("\n", "<br>") for c in cols] for r in rows]
    fig = go.Figure(
        go.Heatmap(
            z=_log_probs(lens, target),
            x=[html.escape(label) for label in _column_labels(lens)],
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
        title=f"Logit lens: P({html.escape(_target(lens, target))}) by layer and position",
        yaxis={"autorange": "reversed", "title": "layer (residual stream after it)", "type": "category"},
        xaxis={"title": "position", "type": "category"},
        height=max(400, 22 * len(lens.rows) + 150),
        width=max(500, min(1600, 40 * len(lens.positions) + 260)),
    )
    return fig


def lens_png(lens: LensResult, path: str | Path, target: int = 0) -> Path:
    """Save the heatmap as a PNG sized to its grid: narrow columns for long prompts, P in the cells of short ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, n_rows = len(lens.positions), len(lens.rows)
    labels = [for_png(label) for label in _column_labels(lens)]
    cell_w = max(0.26, min(0.9, 7.0 / max(n, 1)))  # inches
    grid_w, grid_h = cell_w * n, 0.25 * n_rows
    upright = n > NUMBERS_UP_TO  # narrow columns: labels read bottom to top
    label_h = 0.068 * max(len(label) for label in labels) * (1.0 if upright else 0.72) + 0.5
    left, right, top = 1.25, 1.25, 0.55
    fig_w, fig_h = left + grid_w + right, top + grid_h + label_h
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((left / fig_w, label_h / fig_h, grid_w / fig_w, grid_h / fig_h))
    logp = _log_probs(lens, target)
    image = ax.imshow(logp, aspect="auto", cmap="viridis", vmin=math.log10(FLOOR), vmax=0)
    if not upright:
        for r in range(n_rows):
            for c in range(n):
                colour = "black" if logp[r, c] > -3.5 else "white"
                ax.text(c, r, f"{lens.probs[r, c, target]:.1e}", ha="center", va="center", fontsize=6.5, color=colour)
    ax.set_xticks(
        range(n), labels, rotation=90 if upright else 45, ha="center" if upright else "right", fontsize=8, parse_math=False
    )
    ax.set_yticks(range(n_rows), lens.rows, fontsize=8)
    ax.set_ylabel("layer (residual stream after it)")
    ax.set_title(for_png(f"Logit lens: P({_target(lens, target)})"), parse_math=False)
    cax = fig.add_axes(((left + grid_w + 0.2) / fig_w, label_h / fig_h, 0.18 / fig_w, grid_h / fig_h))
    fig.colorbar(image, cax=cax, label="log10 P")
    return save_png(fig, path)
