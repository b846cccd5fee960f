"""Light HTML figures, without plotly: a heatmap grid as a table of coloured cells, and a bar chart in SVG.

A page of them weighs kilobytes where a plotly page weighs 4.6 MB of plotly.js. Each cell or bar
carries its hover text (a `title`), each figure sizes to its content (wide grids scroll sideways
instead of squeezing), and every label is HTML-escaped by these functions: pass plain text.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from mechscope.viz.scale import hex_colour, ink

RGB = tuple[int, int, int]

_GRID_STYLE = (
    "<style>"
    ".ms-fig{overflow-x:auto;margin:0.4rem 0 1rem}"
    ".ms-grid{border-collapse:collapse;font:11px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;width:max-content}"
    ".ms-grid td{min-width:13px;height:15px;padding:0 0.25rem;border:1px solid #fff;text-align:right;white-space:nowrap}"
    ".ms-grid th{font-weight:normal;color:#333;white-space:nowrap;padding:0 0.3rem;border:0}"
    ".ms-grid th.c{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;padding:0.3rem 0;vertical-align:bottom}"
    ".ms-grid th.r{text-align:right}"
    ".ms-grid td.m{background:repeating-linear-gradient(45deg,#d4d4d4 0 1px,#fff 1px 4px)}"
    ".ms-grid .f{opacity:0.3}"
    ".ms-grid caption{caption-side:bottom;text-align:left;color:#555;padding-top:0.3rem}"
    ".ms-axis{color:#555;font-size:0.85rem}"
    ".ms-bar{display:flex;align-items:center;gap:0.5rem;font-size:0.85rem;margin:0.3rem 0;flex-wrap:wrap}"
    ".ms-bar .bar{width:14rem;height:0.8rem;border:1px solid #999}"
    ".ms-bar .swatch{display:inline-block;width:1.6rem;height:0.8rem;border:1px solid #999;vertical-align:middle}"
    "</style>"
)

MASKED_CSS = "repeating-linear-gradient(45deg,#d4d4d4 0 1px,#fff 1px 4px)"
"""The background of a cell that has no value (a masked future key): unlike any colour of a scale."""


def colourbar_html(stops: Sequence[RGB], low: str, high: str, notes: Sequence[str] = ()) -> str:
    """A horizontal colour bar from `low` to `high`, then notes (plain text, escaped)."""
    gradient = ",".join(hex_colour(c) for c in stops)
    parts = [
        f"<span>{html.escape(low)}</span><span class='bar' style='background:linear-gradient(to right,{gradient})'></span>"
        f"<span>{html.escape(high)}</span>"
    ]
    parts += [f"<span>{html.escape(note)}</span>" for note in notes]
    return "<div class='ms-bar'>" + "".join(parts) + "</div>"


def notes_html(notes: Sequence[tuple[str, str, bool]]) -> str:
    """A line of (css background, what it means, faded): a small sample of each cell look, then its meaning."""
    parts = []
    for background, note, faded in notes:
        style = f"background:{background}" + (";opacity:0.3" if faded else "")
        parts.append(f"<span><span class='swatch' style='{style}'></span> {html.escape(note)}</span>")
    return "<div class='ms-bar'>" + "".join(parts) + "</div>"


def grid_html(
    rows: Sequence[str],
    cols: Sequence[str],
    colours: Sequence[Sequence[RGB | None]],
    hover: Sequence[Sequence[str]],
    *,
    numbers: Sequence[Sequence[str]] | None = None,
    faded_cols: Sequence[int] = (),
    row_title: str = "",
    col_title: str = "",
    legend: str = "",
) -> str:
    """A table with one coloured cell per (row, column); `None` draws a masked cell (hatched, no value).

    `numbers`, when given, are written in the cells; the cells of `faded_cols` that have a value are
    drawn faded (values still on hover); `legend` is HTML put under the grid (from `colourbar_html`
    and `notes_html`).
    """
    faded = set(faded_cols)
    head = f"<th class='r'>{html.escape(row_title)}</th>" + "".join(
        f"<th class='c{' f' if c in faded else ''}'>{html.escape(label)}</th>" for c, label in enumerate(cols)
    )
    body = []
    for r, label in enumerate(rows):
        cells = [f"<th class='r'>{html.escape(label)}</th>"]
        for c, rgb in enumerate(colours[r]):
            tip = html.escape(hover[r][c], quote=True)
            if rgb is None:
                cells.append(f"<td class='m' title=\"{tip}\"></td>")
                continue
            attr = " class='f'" if c in faded else ""
            text = html.escape(numbers[r][c]) if numbers is not None else ""
            cells.append(f"<td{attr} style='background:{hex_colour(rgb)};color:{ink(rgb)}' title=\"{tip}\">{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    axis = f"<div class='ms-axis'>{html.escape(col_title)}</div>" if col_title else ""
    table = f"<table class='ms-grid'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return _GRID_STYLE + f"<div class='ms-fig'>{table}{axis}{legend}</div>"


def bars_html(
    counts: Sequence[int], labels: Sequence[str], hover: Sequence[str], ticks: Sequence[tuple[float, str]], *, x_title: str
) -> str:
    """An SVG bar chart of counts on a log axis; `ticks` are (bar position, text) under the bars."""
    n = len(counts)
    bar, height, left, bottom, top = 7, 220, 56, 58, 10
    width = left + max(n, 1) * bar + 20
    peak = math.log10(max([*counts, 1]) + 1)
    parts = [f"<line x1='{left}' y1='{top + height}' x2='{width - 10}' y2='{top + height}' stroke='#888'/>"]
    for power in range(int(peak) + 1):  # log gridlines at 1, 10, 100, ...
        y = top + height - height * math.log10(10**power + 1) / peak
        parts.append(f"<line x1='{left}' y1='{y:.1f}' x2='{width - 10}' y2='{y:.1f}' stroke='#eee'/>")
        parts.append(f"<text x='{left - 4}' y='{y + 3:.1f}' text-anchor='end'>{10**power:,}</text>")
    for i, (count, tip) in enumerate(zip(counts, hover, strict=True)):
        h = height * math.log10(count + 1) / peak if count else 0
        x = left + i * bar
        parts.append(
            f"<rect x='{x}' y='{top + height - h:.1f}' width='{bar - 1}' height='{h:.1f}' fill='#b2182b'>"
            f"<title>{html.escape(labels[i])}: {html.escape(tip)}</title></rect>"
        )
    for pos, text in ticks:
        x = left + pos * bar
        parts.append(
            f"<text x='{x:.1f}' y='{top + height + 12}' text-anchor='end' transform='rotate(-45 {x:.1f} {top + height + 12})'>"
            f"{html.escape(text)}</text>"
        )
    parts.append(
        f"<text x='{left + n * bar / 2:.1f}' y='{top + height + bottom - 4}' text-anchor='middle'>{html.escape(x_title)}</text>"
    )
    middle = top + height / 2
    parts.append(f"<text x='12' y='{middle}' text-anchor='middle' transform='rotate(-90 12 {middle})'>tokens</text>")
    svg = (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{top + height + bottom}' "
        f"font-family='system-ui,sans-serif' font-size='10' fill='#333'>" + "".join(parts) + "</svg>"
    )
    return _GRID_STYLE + f"<div class='ms-fig'>{svg}</div>"
