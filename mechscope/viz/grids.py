"""Layer x position (or layer x head) grids in the terminal, on the diverging token-heatmap scale."""

from __future__ import annotations

from collections.abc import Sequence

from rich.style import Style
from rich.text import Text
from torch import Tensor

from mechscope.viz.scale import hex_colour, ink, value_rgb
from mechscope.viz.shown import plain, shown_token
from mechscope.viz.terminal import Column, FittedTable


def grid_table(
    title: str, rows: Sequence[str], cols: Sequence[str], grid: Tensor, vmax: float | None = None,
    remedy: str = "write the HTML (--html) for all of them",
) -> FittedTable:  # fmt: skip
    """A table with one coloured cell per grid value (blue negative, red positive, white at 0).

    When the columns do not all fit the console's width, those with the largest |value| are shown,
    in their order, with a note saying so and how to see them all (`remedy`).
    """
    vmax = float(grid.abs().max()) if vmax is None else vmax
    values = grid.tolist()
    columns = []
    for c, label in enumerate(cols):
        shown = shown_token(str(label))
        cells = []
        for row in values:
            rgb = value_rgb(row[c], vmax)
            cells.append(Text(f"{row[c]:+.2f}", style=Style(bgcolor=hex_colour(rgb), color=ink(rgb))))
        columns.append(Column(plain(shown if len(shown) <= 12 else shown[:11] + "…"), cells))
    peak = grid.abs().amax(0).tolist() if grid.numel() else []
    priority = sorted(range(len(columns)), key=lambda c: -peak[c])
    return FittedTable(
        plain(title), "layer", [str(r) for r in rows], columns, priority, chosen="those with the largest |value|", remedy=remedy
    )
