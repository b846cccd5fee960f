"""A text's tokens coloured by a value per token (a neuron, a head, a direction), and attention patterns.

The colour scale is diverging and symmetric about zero: negative blue, positive red, white at 0,
full colour at +-vmax (by default the largest |value| over every text shown, so several texts share
one scale). Three forms of the token heatmap:

- terminal: `token_heatmap_text`, a rich `Text`; each token's background is its colour and its
  text black or white by luminance, so it reads the same on dark and light terminals. Newlines
  show as `↵` (and still break the line), tabs as `→`, tokens that decode to nothing as `∅`.
  `token_stats_table` gives max / argmax token / mean / min per text.
- HTML: `token_heatmap_html`, a self-contained snippet (inline styles, no script) for
  `viz.report.write_report`; hovering a token shows its position, text and value; with a legend.
- PNG: `token_heatmap_png`, the tokens in wrapped lines of coloured boxes, with a colour bar.

`attention_pattern_figure` (plotly, query x key with token labels, value on hover) and
`attention_pattern_png` draw one head's attention probabilities.

Functions take a `TokenValues` (from `mechscope.attribution.activations`), a list of them, or
anything with `tokens`, `values` and `label`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

from rich.style import Style
from rich.table import Table
from rich.text import Text

from mechscope.attribution.activations import AttentionPattern, TokenValues
from mechscope.viz.report import save_png

NEGATIVE = (33, 102, 172)  # blue, at -vmax
POSITIVE = (178, 24, 43)  # red, at +vmax
NEUTRAL = (255, 255, 255)  # white, at 0


# -- colours --------------------------------------------------------------------------------------


def _items(values) -> list:
    if hasattr(values, "tokens") and hasattr(values, "values"):
        return [values]
    items = list(values)
    if not items:
        raise ValueError("no token values to draw")
    return items


def _floats(item) -> list[float]:
    v = item.values
    return [float(x) for x in (v.tolist() if hasattr(v, "tolist") else v)]


def shared_vmax(items, vmax: float | None = None) -> float:
    """The scale's end: `vmax` if given, else the largest finite |value| over all texts (1 if all are 0)."""
    if vmax is not None:
        return float(vmax)
    m = max((abs(x) for item in _items(items) for x in _floats(item) if math.isfinite(x)), default=0.0)
    return m if m > 0 else 1.0


def value_rgb(value: float, vmax: float) -> tuple[int, int, int]:
    """The colour of `value` on the diverging scale [-vmax, vmax]; NaN is grey."""
    if not math.isfinite(value):
        return (160, 160, 160) if math.isnan(value) else (POSITIVE if value > 0 else NEGATIVE)
    frac = max(-1.0, min(1.0, value / vmax)) if vmax > 0 else 0.0
    end = POSITIVE if frac >= 0 else NEGATIVE
    t = abs(frac)
    return tuple(round(n + (e - n) * t) for n, e in zip(NEUTRAL, end, strict=True))


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _ink(rgb: tuple[int, int, int]) -> str:
    """Black or white text, whichever reads on this background."""
    r, g, b = (c / 255 for c in rgb)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _visible(token: str) -> str:
    """A token as shown: newlines as `↵` (still breaking the line), tabs as `→`, an empty token as `∅`."""
    if token == "":
        return "∅"
    return token.replace("\r", "␍").replace("\t", "→").replace("\n", "↵\n")


# -- terminal -------------------------------------------------------------------------------------


def token_heatmap_text(values, vmax: float | None = None, labels: bool = True, legend: bool = True) -> Text:
    """A rich `Text`: each text's label, then its tokens on coloured backgrounds; a legend at the end."""
    items = _items(values)
    vmax = shared_vmax(items, vmax)
    out = Text()
    for i, item in enumerate(items):
        if i:
            out.append("\n\n")
        if labels and getattr(item, "label", None):
            out.append(f"{item.label}\n", style="bold")
        for token, value in zip(item.tokens, _floats(item), strict=True):
            rgb = value_rgb(value, vmax)
            style = Style(bgcolor=_hex(rgb), color=_ink(rgb))
            for j, piece in enumerate(_visible(token).split("\n")):
                if j:
                    out.append("\n")
                if piece:
                    out.append(piece, style=style)
    if legend:
        out.append("\n\n")
        out.append_text(legend_text(vmax))
    return out


def legend_text(vmax: float, steps: int = 9) -> Text:
    """The colour scale, from -vmax to +vmax, as coloured blocks with their ends labelled."""
    text = Text(f"{-vmax:.3g} ")
    for k in range(steps):
        v = -vmax + 2 * vmax * k / (steps - 1)
        text.append("  ", style=Style(bgcolor=_hex(value_rgb(v, vmax))))
    text.append(f" {vmax:.3g}")
    return text


def token_stats_table(values, title: str | None = None) -> Table:
    """One row per text: max, the token at the max (and its position), mean, min."""
    items = _items(values)
    table = Table(title=title, title_justify="left")
    for name, justify in (("text", "left"), ("max", "right"), ("at", "left"), ("mean", "right"), ("min", "right")):
        table.add_column(name, justify=justify)
    for item in items:
        v = _floats(item)
        top = max(range(len(v)), key=lambda p: v[p])
        preview = "".join(item.tokens)
        preview = preview if len(preview) <= 40 else preview[:39] + "…"
        table.add_row(
            repr(preview),
            f"{v[top]:.4g}",
            f"{top}:{item.tokens[top]!r}",
            f"{sum(v) / len(v):.4g}",
            f"{min(v):.4g}",
        )
    return table


# -- HTML -----------------------------------------------------------------------------------------

_HTML_STYLE = (
    "<style>"
    ".ms-tokens{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:0.95rem;"
    "line-height:1.9;white-space:pre-wrap;word-break:break-word;margin:0.3rem 0 1rem}"
    ".ms-tok{padding:0.1rem 0;border-right:1px solid rgba(128,128,128,0.25)}"
    ".ms-label{font-weight:600;margin-top:0.6rem}"
    ".ms-legend{display:flex;align-items:center;gap:0.5rem;font-size:0.85rem;margin:0.5rem 0}"
    ".ms-legend .bar{width:14rem;height:0.8rem;border:1px solid #999}"
    "</style>"
)


def token_heatmap_html(values, vmax: float | None = None, legend: bool = True) -> str:
    """An HTML snippet, one block per text; each token a span coloured by its value.

    Hovering a token shows `pos P 'token' = value`. Every token is escaped. Use it as a section of
    `write_report(path, title, [(heading, token_heatmap_html(tv))])`.
    """
    items = _items(values)
    vmax = shared_vmax(items, vmax)
    parts = [_HTML_STYLE]
    for item in items:
        if getattr(item, "label", None):
            parts.append(f"<div class='ms-label'>{html.escape(str(item.label))}</div>")
        spans = []
        for pos, (token, value) in enumerate(zip(item.tokens, _floats(item), strict=True)):
            rgb = value_rgb(value, vmax)
            tip = html.escape(f"pos {pos} {token!r} = {value:.4g}", quote=True)
            shown = html.escape(_visible(token)).replace("\n", "<br>")
            spans.append(f"<span class='ms-tok' style='background:{_hex(rgb)};color:{_ink(rgb)}' title=\"{tip}\">{shown}</span>")
        parts.append(f"<div class='ms-tokens'>{''.join(spans)}</div>")
    if legend:
        stops = ",".join(_hex(value_rgb(-vmax + 2 * vmax * k / 8, vmax)) for k in range(9))
        parts.append(
            f"<div class='ms-legend'><span>{-vmax:.3g}</span>"
            f"<span class='bar' style='background:linear-gradient(to right,{stops})'></span>"
            f"<span>{vmax:.3g}</span><span>(0 is white)</span></div>"
        )
    return "<div class='ms-token-heatmap'>" + "".join(parts) + "</div>"


# -- PNG ------------------------------------------------------------------------------------------


def _colormap(vmax: float):
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    colours = [tuple(c / 255 for c in rgb) for rgb in (NEGATIVE, NEUTRAL, POSITIVE)]
    return LinearSegmentedColormap.from_list("mechscope_diverging", colours), Normalize(-vmax, vmax)


def _wrap(tokens: Sequence[str], width: int) -> list[list[tuple[int, str, int]]]:
    """Lines of (position, shown text, column) with at most `width` characters a line; newlines break lines."""
    lines: list[list[tuple[int, str, int]]] = [[]]
    col = 0
    for pos, token in enumerate(tokens):
        pieces = _visible(token).split("\n")
        for j, piece in enumerate(pieces):
            if j:
                lines.append([])
                col = 0
            if not piece:
                continue
            if col and col + len(piece) > width:
                lines.append([])
                col = 0
            lines[-1].append((pos, piece, col))
            col += len(piece)
    return lines


def token_heatmap_png(values, path: str | Path, vmax: float | None = None, width: int = 80, title: str | None = None) -> Path:
    """Save the tokens as wrapped lines of coloured boxes (one block per text, shared scale) with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.patches import Rectangle

    items = _items(values)
    vmax = shared_vmax(items, vmax)
    blocks = [(item, _wrap(item.tokens, width)) for item in items]
    n_rows = sum(len(lines) + 1.5 for _, lines in blocks)
    font = 11
    char_in, row_in = 0.62 * font / 72, 1.9 * font / 72
    longest = max((col + len(piece) for _, lines in blocks for line in lines for _, piece, col in line), default=0)
    cols = max(min(width, longest), *(len(str(getattr(item, "label", ""))) for item in items), 36)
    fig_w, fig_h = cols * char_in + 0.6, n_rows * row_in + 1.15 + (0.35 if title else 0)
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((0.3 / fig_w, 0.95 / fig_h, cols * char_in / fig_w, n_rows * row_in / fig_h))
    ax.set_xlim(0, cols)
    ax.set_ylim(n_rows, 0)
    ax.axis("off")
    row = 0.0
    for item, lines in blocks:
        if getattr(item, "label", None):
            ax.text(0, row + 0.75, str(item.label), fontsize=font, fontweight="bold", va="center", parse_math=False)
        row += 1.2
        vals = _floats(item)
        for line in lines:
            for pos, piece, col in line:
                rgb = value_rgb(vals[pos], vmax)
                ax.add_patch(
                    Rectangle((col, row + 0.08), len(piece), 0.84, facecolor=_hex(rgb), edgecolor="#bbbbbb", linewidth=0.4)
                )
                ax.text(
                    col,
                    row + 0.52,
                    piece,
                    fontsize=font,
                    family="monospace",
                    color=_ink(rgb),
                    va="center",
                    ha="left",
                    parse_math=False,
                )
            row += 1
        row += 0.3
    cmap, norm = _colormap(vmax)
    cax = fig.add_axes((0.55 / fig_w, 0.35 / fig_h, min(4.0, cols * char_in - 0.6) / fig_w, 0.15 / fig_h))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal", ticks=[-vmax, 0, vmax])
    if title:
        fig.suptitle(title, x=0.3 / fig_w, y=1 - 0.1 / fig_h, va="top", ha="left", fontsize=font + 1, parse_math=False)
    return save_png(fig, path)


# -- attention patterns ---------------------------------------------------------------------------


def _pattern_args(tokens, pattern, title):
    if isinstance(tokens, AttentionPattern):
        return tokens.tokens, tokens.pattern, title or tokens.label
    if pattern is None:
        raise ValueError("give an AttentionPattern, or tokens and a [q, k] pattern")
    return list(tokens), pattern, title or "attention pattern"


def _grid(pattern) -> list[list[float]]:
    rows = pattern.tolist() if hasattr(pattern, "tolist") else [list(r) for r in pattern]
    return [[float(x) for x in r] for r in rows]


def _no_math(label: str) -> str:
    """matplotlib reads text between two `$` as mathtext; escape them so tokens show as they are."""
    return label.replace("$", r"\$")


def _axis_labels(tokens: Sequence[str]) -> list[str]:
    """Unique category labels (the position keeps repeated tokens apart)."""
    return [f"{p}:{t!r}"[:20] for p, t in enumerate(tokens)]


def attention_pattern_figure(tokens, pattern=None, title: str | None = None):
    """A plotly heatmap of attention probabilities: queries down, keys across, token labels, value on hover.

    Pass an `AttentionPattern`, or the tokens and a [q, k] pattern.
    """
    import plotly.graph_objects as go

    tokens, pattern, title = _pattern_args(tokens, pattern, title)
    z = _grid(pattern)
    # plotly reads tags and entities in labels and hover text: escape the tokens so they show as they are
    labels = [html.escape(label) for label in _axis_labels(tokens)]
    shown = [html.escape(repr(t)) for t in tokens]
    hover = [[f"query {q} {shown[q]} → key {k} {shown[k]}<br>{row[k]:.4g}" for k in range(len(row))] for q, row in enumerate(z)]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=labels,
            hovertext=hover,
            hoverinfo="text",
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar={"title": "p"},
        )
    )
    side = max(420, 24 * len(tokens) + 200)
    fig.update_layout(
        title=title,
        xaxis={"title": "key (attended to)", "type": "category", "tickangle": -45},
        yaxis={"title": "query (attending)", "type": "category", "autorange": "reversed"},
        width=side + 120,
        height=side,
    )
    return fig


def attention_pattern_png(tokens, path: str | Path, pattern=None, title: str | None = None) -> Path:
    """Save an attention pattern (an `AttentionPattern`, or tokens and a [q, k] pattern) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens, pattern, title = _pattern_args(tokens, pattern, title)
    z = _grid(pattern)
    labels = [_no_math(label) for label in _axis_labels(tokens)]
    side = 2.5 + 0.28 * len(tokens)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(z, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title, parse_math=False)
    fig.colorbar(image, ax=ax, label="p", shrink=0.8)
    fig.tight_layout()
    return save_png(fig, path)


__all__ = [
    "TokenValues",
    "attention_pattern_figure",
    "attention_pattern_png",
    "legend_text",
    "shared_vmax",
    "token_heatmap_html",
    "token_heatmap_png",
    "token_heatmap_text",
    "token_stats_table",
    "value_rgb",
]
