"""Patching grids drawn: layers down, positions (or heads) across, diverging colours centred on 0.

`patching_html` is a light HTML grid (no plotly); `patching_figure` the same as a plotly figure.
"""

from __future__ import annotations

import html

from mechscope.attribution.patching import PatchingResult
from mechscope.viz.html_figures import colourbar_html, grid_html
from mechscope.viz.scale import value_rgb
from mechscope.viz.shown import token_label

NUMBERS_UP_TO = 16
"""Grids with at most this many columns write the value in each cell."""


def _labels(result: PatchingResult) -> list[str]:
    """`pos:'token'` for positions (`'clean/corrupted'` where the prompts differ), `H<head>` for heads."""
    if result.kind == "attn.hook_z":
        return list(result.col_labels)
    return [f"{c}:{token_label(label)}" for c, label in zip(result.cols, result.col_labels, strict=True)]


def _span(result: PatchingResult) -> float:
    return max(float(abs(result.grid).max()), 1e-9)


def _title(result: PatchingResult) -> str:
    metric = f"{result.metric}: clean {result.clean:.3g}, corrupted {result.corrupt:.3g}"
    return f"{result.method} patching of {result.kind} ({metric})"


def _hover(result: PatchingResult, labels: list[str]) -> list[list[str]]:
    grid = result.grid.tolist()
    return [
        [
            f"layer {layer}, {label}\nnormalised {grid[r][c]:.3f}\n{result.metric} {float(result.raw[r, c]):.4g}"
            for c, label in enumerate(labels)
        ]
        for r, layer in enumerate(result.layers)
    ]


def patching_html(result: PatchingResult) -> str:
    """A light HTML grid: one cell per (layer, column), the share restored in the cell (for small grids) and on hover."""
    labels, span, grid = _labels(result), _span(result), result.grid.tolist()
    colours = [[value_rgb(v, span) for v in row] for row in grid]
    numbers = [[f"{v:+.2f}" for v in row] for row in grid] if len(labels) <= NUMBERS_UP_TO else None
    stops = [value_rgb(-span + 2 * span * k / 8, span) for k in range(9)]
    legend = colourbar_html(stops, f"{-span:.3g}", f"{span:.3g}", ["(share restored; 0 is white)"])
    heading = f"<div class='ms-axis'>{html.escape(_title(result))}</div>"
    axis = "head" if result.kind == "attn.hook_z" else "position"
    rows = [str(layer) for layer in result.layers]
    return heading + grid_html(
        rows, labels, colours, _hover(result, labels), numbers=numbers, row_title="layer", col_title=axis, legend=legend
    )


def patching_figure(result: PatchingResult):
    """A plotly heatmap of a grid: layers down, positions (or heads) across, diverging colours centred on 0."""
    import plotly.graph_objects as go

    labels, span = _labels(result), _span(result)
    # plotly reads tags in text: escape so tokens show as they are
    hover = [[html.escape(text).replace("\n", "<br>") for text in row] for row in _hover(result, labels)]
    fig = go.Figure(
        go.Heatmap(
            z=result.grid.numpy(),
            x=[html.escape(label) for label in labels],
            y=[str(layer) for layer in result.layers],
            text=hover,
            hoverinfo="text",
            colorscale="RdBu",
            reversescale=True,
            zmin=-span,
            zmax=span,
            colorbar=dict(title="restored"),
        )
    )
    fig.update_layout(
        title=html.escape(_title(result)),
        xaxis_title="head" if result.kind == "attn.hook_z" else "position",
        yaxis_title="layer",
        yaxis_autorange="reversed",
        height=max(300, 22 * len(result.layers) + 200),
    )
    return fig
