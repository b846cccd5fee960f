"""One head's attention pattern: queries down, keys across, as a plotly figure, light HTML or a PNG.

- The scale is one-sided (probabilities are never negative): white at 0, dark blue at vmax, the
  largest probability on a scored key. Keys at the first `skip` positions (the index's rule: the
  attention sink, which takes most of every row there) are drawn faded, their values on hover and
  beyond the scale, so that the rest of the pattern is not left pale.
- Masked future keys (after the query) are hatched grey and have no value; a real 0 is white.

Pass an `AttentionPattern` (from `mechscope.attribution.activations`), or the tokens and a [q, k] pattern.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import NamedTuple

from mechscope.attribution.activations import AttentionPattern
from mechscope.viz.html_figures import MASKED_CSS, colourbar_html, grid_html, notes_html
from mechscope.viz.report import save_png
from mechscope.viz.scale import resolve_skip
from mechscope.viz.shown import for_png, position_label

MASKED_NOTE = "hatched: masked (a future key)"


class _Pattern(NamedTuple):
    tokens: list[str]
    z: list[list[float]]
    """[q][k] probabilities."""
    title: str
    skip: int
    """Keys 0..skip-1 are not scored (0 when no key is beyond them)."""
    vmax: float

    def masked(self, q: int, k: int) -> bool:
        return k > q

    def labels(self, width: int = 20) -> list[str]:
        return [position_label(p, t, width) for p, t in enumerate(self.tokens)]

    def note(self) -> str:
        if not self.skip:
            return ""
        keys = "key 0" if self.skip == 1 else f"keys 0–{self.skip - 1}"
        return f"faded: {keys}, not scored (as in the index: the attention sink), beyond the scale"

    def hovers(self) -> list[list[str]]:
        """[q][k] hover text: the query and key, and the probability or why there is none."""
        full = self.labels(None)
        out = []
        for q, row in enumerate(self.z):
            out.append([])
            for k, x in enumerate(row):
                where = f"query {full[q]} → key {full[k]}"
                if self.masked(q, k):
                    out[-1].append(f"{where}: masked (a future key)")
                else:
                    out[-1].append(f"{where}: {x:.4g}" + (" (key not scored: beyond the scale)" if k < self.skip else ""))
        return out


def _prepare(tokens, pattern, title: str | None, skip: int | None) -> _Pattern:
    if isinstance(tokens, AttentionPattern):
        tokens, pattern, title = tokens.tokens, tokens.pattern, title or tokens.label
    elif pattern is None:
        raise ValueError("give an AttentionPattern, or tokens and a [q, k] pattern")
    rows = pattern.tolist() if hasattr(pattern, "tolist") else [list(r) for r in pattern]
    z = [[float(x) for x in r] for r in rows]
    n, skip = len(z), resolve_skip(skip)
    counted = [z[q][k] for q in range(n) for k in range(skip, q + 1)]
    if not counted:  # no key beyond the first ones: the rule cannot apply
        skip, counted = 0, [z[q][k] for q in range(n) for k in range(q + 1)]
    return _Pattern(list(tokens), z, title or "attention pattern", skip, max(counted, default=0.0) or 1.0)


@functools.cache
def _blues_table() -> list[tuple[int, int, int]]:
    from matplotlib import colormaps

    return [tuple(round(c * 255) for c in colormaps["Blues"](i / 255)[:3]) for i in range(256)]


def _blues(frac: float) -> tuple[int, int, int]:
    """The colour of `frac` (0..1, clipped) on matplotlib's (and plotly's) Blues."""
    return _blues_table()[round(min(max(frac, 0.0), 1.0) * 255)]


def attention_pattern_figure(tokens, pattern=None, title: str | None = None, skip: int | None = None):
    """A plotly heatmap: queries down, keys across, token labels, value on hover."""
    import plotly.graph_objects as go

    p = _prepare(tokens, pattern, title, skip)
    n = len(p.tokens)
    # plotly reads tags and entities in labels and hover text: escape the tokens so they show as they are
    labels = [html.escape(label) for label in p.labels()]
    z = [[None if p.masked(q, k) else p.z[q][k] for k in range(n)] for q in range(n)]
    hover = [[html.escape(text) for text in row] for row in p.hovers()]
    fig = go.Figure(
        go.Heatmap(
            z=z, x=labels, y=labels, hovertext=hover, hoverinfo="text", colorscale="Blues", zmin=0, zmax=p.vmax,
            colorbar={"title": "p"},
        )
    )  # fmt: skip
    shapes = []
    if p.skip:
        shapes.append(
            dict(type="rect", x0=-0.5, x1=p.skip - 0.5, y0=-0.5, y1=n - 0.5, fillcolor="white", opacity=0.65, line_width=0)
        )
    side = max(420, 24 * n + 200)
    fig.update_layout(
        title=html.escape(p.title) + f"<br><sub>{html.escape('; '.join(filter(None, [MASKED_NOTE, p.note()])))}</sub>",
        xaxis={"title": "key (attended to)", "type": "category", "tickangle": -45},
        yaxis={"title": "query (attending)", "type": "category", "autorange": "reversed"},
        plot_bgcolor="#d4d4d4",
        shapes=shapes,
        width=side + 120,
        height=side,
    )
    return fig


def attention_pattern_html(tokens, pattern=None, title: str | None = None, skip: int | None = None) -> str:
    """A light HTML grid (no plotly): one cell per (query, key), values on hover and in the cells of short texts."""
    p = _prepare(tokens, pattern, title, skip)
    n = len(p.tokens)
    colours = [[None if p.masked(q, k) else _blues(p.z[q][k] / p.vmax) for k in range(n)] for q in range(n)]
    numbers = [[f"{x:.2g}" for x in row] for row in p.z] if n <= 12 else None
    notes = [(MASKED_CSS, MASKED_NOTE, False)] + ([("#6baed6", p.note(), True)] if p.skip else [])
    legend = colourbar_html([_blues(k / 8) for k in range(9)], "0", f"{p.vmax:.3g}") + notes_html(notes)
    heading = f"<div class='ms-axis'>{html.escape(p.title)}: queries down, keys across</div>"
    return heading + grid_html(
        p.labels(),
        p.labels(),
        colours,
        p.hovers(),
        numbers=numbers,
        faded_cols=range(p.skip),
        row_title="query",
        col_title="key",
        legend=legend,
    )


def attention_pattern_png(tokens, path: str | Path, pattern=None, title: str | None = None, skip: int | None = None) -> Path:
    """Save an attention pattern (an `AttentionPattern`, or tokens and a [q, k] pattern) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    p = _prepare(tokens, pattern, title, skip)
    n = len(p.tokens)
    z = np.ma.masked_array(np.array(p.z, dtype=float), mask=np.triu(np.ones((n, n), dtype=bool), 1))
    labels = [for_png(label) for label in p.labels()]
    side = 2.5 + 0.28 * n
    fig, ax = plt.subplots(figsize=(side + 1, side + 0.4))
    ax.set_facecolor("white")
    ax.add_patch(Rectangle((-0.5, -0.5), n, n, facecolor="white", edgecolor="#c4c4c4", hatch="////", linewidth=0, zorder=0))
    cmap = colormaps["Blues"].with_extremes(bad=(0, 0, 0, 0))
    image = ax.imshow(z, cmap=cmap, vmin=0, vmax=p.vmax, zorder=1)
    for k in range(p.skip):  # fade the cells of keys not scored, below the diagonal (the rest are masked)
        ax.add_patch(Rectangle((k - 0.5, k - 0.5), 1, n - k, facecolor="white", alpha=0.65, linewidth=0, zorder=2))
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8, parse_math=False)
    ax.set_yticks(range(n), labels, fontsize=8, parse_math=False)
    for tick in [*ax.get_xticklabels()[: p.skip]]:
        tick.set_color("#888888")
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(for_png(p.title), parse_math=False)
    fig.colorbar(image, ax=ax, label="p", shrink=0.8)
    notes = "\n".join(filter(None, [MASKED_NOTE, p.note()]))
    fig.text(0.01, 0.01, notes, fontsize=8, color="#444444", va="bottom", parse_math=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save_png(fig, path)
