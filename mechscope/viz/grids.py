"""Layer x position (or layer x head) grids in the terminal, on the diverging token-heatmap scale."""

from __future__ import annotations

from collections.abc import Sequence

from rich.style import Style
from rich.table import Table
from rich.text import Text
from torch import Tensor

from mechscope.viz.token_heatmap import value_rgb


def grid_table(title: str, rows: Sequence[str], cols: Sequence[str], grid: Tensor, vmax: float | None = None) -> Table:
    """A rich table with one coloured cell per grid value (blue negative, red positive, white at 0)."""
    vmax = float(grid.abs().max()) if vmax is None else vmax
    table = Table(title=title, title_justify="left")
    table.add_column("layer", justify="right")
    for col in cols:
        table.add_column(str(col)[:12], justify="right")
    for label, values in zip(rows, grid.tolist(), strict=True):
        cells = []
        for value in values:
            r, g, b = value_rgb(value, vmax)
            ink = "black" if (0.299 * r + 0.587 * g + 0.114 * b) / 255 > 0.5 else "white"
            cells.append(Text(f"{value:+.2f}", style=Style(bgcolor=f"#{r:02x}{g:02x}{b:02x}", color=ink)))
        table.add_row(str(label), *cells)
    return table
