"""Patching grids drawn: a plotly heatmap of layers x positions (or heads), diverging colours centred on 0."""

from __future__ import annotations

import html

from mechscope.attribution.patching import PatchingResult


def patching_figure(result: PatchingResult):
    """A plotly heatmap of a grid: layers down, positions (or heads) across, diverging colours centred on 0."""
    import plotly.graph_objects as go

    grid = result.grid.numpy()
    labels = [html.escape(repr(label)) for label in result.col_labels]  # plotly reads tags in text: show tokens as they are
    hover = [
        [
            f"layer {layer}, {label}<br>normalised {grid[r, c]:.3f}<br>{html.escape(result.metric)} {float(result.raw[r, c]):.4g}"
            for c, label in enumerate(labels)
        ]
        for r, layer in enumerate(result.layers)
    ]
    span = max(float(abs(result.grid).max()), 1e-9)
    fig = go.Figure(
        go.Heatmap(
            z=grid,
            x=[html.escape(f"{c}:{label}") for c, label in zip(result.cols, result.col_labels, strict=True)],
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
        title=html.escape(f"{result.method} patching of {result.kind} ({result.metric}: ")
        + f"clean {result.clean:.3g}, corrupted {result.corrupt:.3g})",
        xaxis_title="head" if result.kind == "attn.hook_z" else "position",
        yaxis_title="layer",
        yaxis_autorange="reversed",
    )
    return fig
