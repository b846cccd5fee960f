"""A text's tokens coloured by a value per token (a neuron, a head, a direction).

The scale (`mechscope.viz.scale`): blue negative, white at 0, red positive, shared by every text
shown, one-sided when no value is negative. The first `skip` positions of each text (the index's
rule; SmolLM2 parks its attention there and its units take outlier values) are drawn marked as not
scored, and are left out of the scale and of the reported max, argmax, mean and min; their values
stay on hover and in the numbers. Pass `skip=0` to score every position. Tokens are shown as in
`mechscope.viz.shown` (`↵` for a newline, `\\xNN` for a byte, `\\uNNNN` for an invisible character).

- terminal: `token_heatmap_text`, each token on its colour, text black or white by luminance, so
  it reads the same on dark and light terminals; positions not scored are dim and uncoloured.
  Where the console shows no colour (a pipe, a file), it prints the text, then one line per
  token: position, value, token, and the marks (max, not scored). `token_stats_table` gives max / argmax
  token / mean / min per text.
- HTML: `token_heatmap_html`, a self-contained snippet (inline styles, no script) for
  `viz.report.write_report`; hovering a token shows its position, text and value; with a legend.
- PNG: `token_heatmap_png`, the tokens in wrapped lines of coloured boxes, with a colour bar.

Functions take a `TokenValues` (from `mechscope.attribution.activations`), a list of them, or
anything with `tokens`, `values` and `label`. Attention patterns are drawn by `viz.attention`.
"""

from __future__ import annotations

import html
import textwrap
from pathlib import Path

from rich.style import Style
from rich.table import Table
from rich.text import Text

from mechscope.attribution.activations import TokenValues
from mechscope.viz.attention import attention_pattern_figure, attention_pattern_html, attention_pattern_png
from mechscope.viz.report import save_png
from mechscope.viz.scale import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    Scale,
    hex_colour,
    ink,
    make_scale,
    resolve_skip,
    scored,
    skip_note,
    value_rgb,
)
from mechscope.viz.shown import PNG_FONTS, for_png, plain, position_label, shown_token, token_label
from mechscope.viz.terminal import ColourText

SKIPPED_CSS = "repeating-linear-gradient(135deg,#eeeeee 0 3px,#fafafa 3px 6px)"
"""The background of a position not scored, in HTML."""


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


def token_scale(values, vmax: float | None = None, skip: int | None = None) -> Scale:
    """The scale several texts share: set by their scored positions (see `viz.scale.make_scale`)."""
    return make_scale([_floats(item) for item in _items(values)], vmax, resolve_skip(skip))


def shared_vmax(values, vmax: float | None = None, skip: int | None = None) -> float:
    """The scale's end: `vmax` if given, else the largest finite |value| at the scored positions (1 if all are 0)."""
    return token_scale(values, vmax, skip).vmax


def _argmax(vals: list[float], skip: int) -> int | None:
    """Position of the largest scored value (the first, if tied); None if nothing is scored."""
    counted = scored(vals, skip)
    return vals.index(max(counted), skip) if counted else None


# -- terminal -------------------------------------------------------------------------------------


def token_heatmap_text(
    values, vmax: float | None = None, labels: bool = True, legend: bool = True, skip: int | None = None
) -> ColourText:
    """Each text's label, then its tokens on coloured backgrounds; a legend at the end.

    Without colour (piped): the text, then one line per token with its position, value and marks.
    """
    items = _items(values)
    scale = token_scale(items, vmax, skip)
    coloured, piped = Text(), Text()
    for i, item in enumerate(items):
        vals = _floats(item)
        if i:
            coloured.append("\n\n")
            piped.append("\n")
        if labels and getattr(item, "label", None):
            coloured.append_text(plain(item.label, "bold") + Text("\n"))
            piped.append_text(plain(item.label, "bold") + Text("\n"))
        for pos, (token, value) in enumerate(zip(item.tokens, vals, strict=True)):
            rgb = scale.rgb(value)
            style = Style(dim=True) if pos < scale.skip else Style(bgcolor=hex_colour(rgb), color=ink(rgb))
            for j, piece in enumerate(shown_token(token, breaks=True).split("\n")):
                if j:
                    coloured.append("\n")
                if piece:
                    coloured.append(piece, style=style)
        piped.append_text(plain("".join(shown_token(t, breaks=True) for t in item.tokens)) + Text("\n"))
        piped.append_text(_value_lines(item.tokens, vals, scale.skip))
    if legend:
        coloured.append("\n\n")
        coloured.append_text(legend_text(scale))
        if scale.skip:
            piped.append("\n" + skip_note(scale.skip) + "\n")
    return ColourText(coloured, piped)


def _value_lines(tokens: list[str], vals: list[float], skip: int) -> Text:
    """One line per token: position, value, the token in quotes, and `← max` / `not scored`."""
    top = _argmax(vals, skip)
    lines = Text("  pos       value  token\n", style="dim")
    for pos, (token, value) in enumerate(zip(tokens, vals, strict=True)):
        mark = "  ← max" if pos == top else "  (not scored)" if pos < skip else ""
        lines.append_text(Text(f"{pos:>5}  {value:>10.4g}  ") + plain(token_label(token)) + Text(mark + "\n"))
    return lines


def legend_text(scale: Scale | float, steps: int = 9) -> Text:
    """The colour scale as coloured blocks with its ends labelled; then what dim tokens mean, if any are."""
    scale = scale if isinstance(scale, Scale) else Scale(float(scale), False, 0)
    text = Text(f"{scale.vmin:.3g} ")
    for v in scale.stops(steps):
        text.append("  ", style=Style(bgcolor=hex_colour(scale.rgb(v))))
    text.append(f" {scale.vmax:.3g}")
    if scale.skip:
        text.append("  dim: " + skip_note(scale.skip), style="dim")
    return text


def token_stats_table(values, title: str | None = None, skip: int | None = None) -> Table:
    """One row per text: max, the token at the max (and its position), mean, min, over the scored positions;
    and the largest value among the positions not scored."""
    items = _items(values)
    skip = token_scale(items, skip=skip).skip
    caption = f"max, at, mean, min: over positions {skip}..; {skip_note(skip)}" if skip else None
    table = Table(title=plain(title) if title else None, title_justify="left", caption=caption, caption_justify="left")
    columns = ["text", "max", "at", "mean", "min"] + ([f"max 0–{skip - 1}"] if skip else [])
    for name in columns:
        table.add_column(name, justify="left" if name in ("text", "at") else "right")
    for item in items:
        vals = _floats(item)
        preview = "".join(item.tokens)
        preview = preview if len(preview) <= 40 else preview[:39] + "…"
        counted, top = scored(vals, skip), _argmax(vals, skip)
        cells = [plain(token_label(preview))]
        if counted:
            cells += [
                Text(f"{vals[top]:.4g}"),
                plain(position_label(top, item.tokens[top])),
                Text(f"{sum(counted) / len(counted):.4g}"),
                Text(f"{min(counted):.4g}"),
            ]
        else:
            cells += [Text("–"), Text("(too short)"), Text("–"), Text("–")]
        if skip:
            cells.append(Text(f"{max(vals[:skip]):.4g}" if vals[:skip] else "–"))
        table.add_row(*cells)
    return table


# -- HTML -----------------------------------------------------------------------------------------

_HTML_STYLE = (
    "<style>"
    ".ms-tokens{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:0.95rem;"
    "line-height:1.9;white-space:pre-wrap;word-break:break-word;margin:0.3rem 0 1rem}"
    ".ms-tok{padding:0.1rem 0;border-right:1px solid rgba(128,128,128,0.25);unicode-bidi:isolate}"
    f".ms-tok.skip{{background:{SKIPPED_CSS};color:#777}}"
    ".ms-label{font-weight:600;margin-top:0.6rem}"
    ".ms-legend{display:flex;align-items:center;gap:0.5rem;font-size:0.85rem;margin:0.5rem 0;flex-wrap:wrap}"
    ".ms-legend .bar{width:14rem;height:0.8rem;border:1px solid #999}"
    "</style>"
)


def token_heatmap_html(values, vmax: float | None = None, legend: bool = True, skip: int | None = None) -> str:
    """An HTML snippet, one block per text; each token a span coloured by its value.

    Hovering a token shows `pos P 'token' = value`. Every token is escaped; each is its own
    bidirectional island, so tokens keep their order whatever their script. Use it as a section of
    `write_report(path, title, [(heading, token_heatmap_html(tv))])`.
    """
    items = _items(values)
    scale = token_scale(items, vmax, skip)
    parts = [_HTML_STYLE]
    for item in items:
        if getattr(item, "label", None):
            parts.append(f"<div class='ms-label'>{html.escape(str(item.label))}</div>")
        spans = []
        for pos, (token, value) in enumerate(zip(item.tokens, _floats(item), strict=True)):
            skipped = pos < scale.skip
            tip = html.escape(f"pos {pos} {token_label(token)} = {value:.4g}" + (" (not scored)" if skipped else ""), quote=True)
            shown = html.escape(shown_token(token, breaks=True)).replace("\n", "<br>")
            rgb = scale.rgb(value)
            look = "class='ms-tok skip'" if skipped else f"class='ms-tok' style='background:{hex_colour(rgb)};color:{ink(rgb)}'"
            spans.append(f'<span {look} title="{tip}">{shown}</span>')
        parts.append(f"<div class='ms-tokens'>{''.join(spans)}</div>")
    if legend:
        stops = ",".join(hex_colour(scale.rgb(v)) for v in scale.stops())
        parts.append(
            f"<div class='ms-legend'><span>{scale.vmin:.3g}</span>"
            f"<span class='bar' style='background:linear-gradient(to right,{stops})'></span>"
            f"<span>{scale.vmax:.3g}</span><span>(0 is white; hover a token for its value)</span>"
            + (
                f"<span><span class='ms-tok skip'>&nbsp;grey&nbsp;</span> {html.escape(skip_note(scale.skip))}</span>"
                if scale.skip
                else ""
            )
            + "</div>"
        )
    return "<div class='ms-token-heatmap'>" + "".join(parts) + "</div>"


# -- PNG ------------------------------------------------------------------------------------------

FONT_SIZE = 11
ROW_IN = 1.9 * FONT_SIZE / 72  # height of a line of tokens, inches


def _colormap(scale: Scale):
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    ends = (NEUTRAL, POSITIVE) if scale.one_sided else (NEGATIVE, NEUTRAL, POSITIVE)
    colours = [tuple(c / 255 for c in rgb) for rgb in ends]
    return LinearSegmentedColormap.from_list("mechscope_scale", colours), Normalize(scale.vmin, scale.vmax)


def _measure(pieces: set[str]) -> dict[str, float]:
    """Each piece's drawn width in inches, in the PNG's fonts (emoji and scripts are not one character wide)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    prop, ttp = FontProperties(family=list(PNG_FONTS), size=FONT_SIZE), TextToPath()
    return {p: ttp.get_text_width_height_descent(p, prop, ismath=False)[0] / 72 for p in pieces}


def _wrap(tokens, width_in: float) -> list[list[tuple[int, str, float, float]]]:
    """Lines of (position, piece, x, width) in inches, at most `width_in` wide; newlines break lines."""
    pieces = [(pos, for_png(piece)) for pos, t in enumerate(tokens) for piece in shown_token(t, breaks=True).split("\n")]
    widths = _measure({p for _, p in pieces})
    lines: list[list[tuple[int, str, float, float]]] = [[]]
    x, last = 0.0, -1
    for pos, piece in pieces:
        if pos == last:  # the piece after a newline of the same token
            lines.append([])
            x = 0.0
        last = pos
        if not piece:
            continue
        w = widths[piece]
        if x and x + w > width_in:
            lines.append([])
            x = 0.0
        lines[-1].append((pos, piece, x, w))
        x += w
    return lines


def token_heatmap_png(
    values, path: str | Path, vmax: float | None = None, width: int = 80, title: str | None = None, skip: int | None = None
) -> Path:
    """Save the tokens as wrapped lines of coloured boxes (one block per text, shared scale) with a colour bar.

    Lines wrap at `width` monospace characters; the figure is as wide as its longest line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.patches import Rectangle

    items = _items(values)
    scale = token_scale(items, vmax, skip)
    char_in = 0.6021 * FONT_SIZE / 72
    blocks = [(item, _floats(item), _wrap(item.tokens, width * char_in)) for item in items]
    n_rows = sum(len(lines) + 1.5 for *_, lines in blocks)
    longest = max((x + w for *_, lines in blocks for line in lines for _, _, x, w in line), default=0.0)
    labels = [len(str(getattr(item, "label", "") or "")) * char_in * 1.1 for item in items]
    content_w = max(longest, *labels, 36 * char_in)
    note = ""
    if scale.skip:  # wrapped to the figure's width
        high = max(v for item in items for v in _floats(item)[: scale.skip])
        note = f"hatched: {skip_note(scale.skip)} (largest there: {high:.3g})"
        note = textwrap.fill(note, width=max(40, int(content_w / (char_in * 0.85))))
    notes = note.count("\n") + 1 if note else 0
    fig_w, fig_h = content_w + 0.6, n_rows * ROW_IN + 1.15 + 0.18 * notes + (0.35 if title else 0)
    fig = plt.figure(figsize=(fig_w, fig_h))
    bottom = 0.95 + 0.18 * notes
    ax = fig.add_axes((0.3 / fig_w, bottom / fig_h, content_w / fig_w, n_rows * ROW_IN / fig_h))
    ax.set_xlim(0, content_w)
    ax.set_ylim(n_rows, 0)
    ax.axis("off")
    text_style = dict(fontsize=FONT_SIZE, family=list(PNG_FONTS), va="center", ha="left", parse_math=False)
    row = 0.0
    for item, vals, lines in blocks:
        if getattr(item, "label", None):
            ax.text(0, row + 0.75, for_png(str(item.label)), fontsize=FONT_SIZE, fontweight="bold", va="center", parse_math=False)
        row += 1.2
        for line in lines:
            for pos, piece, x, w in line:
                if pos < scale.skip:
                    box = dict(facecolor="#f2f2f2", edgecolor="#bbbbbb", hatch="////", linewidth=0.4)
                    ink_colour = "#666666"
                else:
                    rgb = scale.rgb(vals[pos])
                    box = dict(facecolor=hex_colour(rgb), edgecolor="#bbbbbb", linewidth=0.4)
                    ink_colour = ink(rgb)
                ax.add_patch(Rectangle((x, row + 0.08), w, 0.84, **box))
                ax.text(x, row + 0.52, piece, color=ink_colour, **text_style)
            row += 1
        row += 0.3
    cmap, norm = _colormap(scale)
    cax = fig.add_axes((0.55 / fig_w, (0.35 + 0.18 * notes) / fig_h, min(4.0, content_w - 0.6) / fig_w, 0.15 / fig_h))
    ticks = [0, scale.vmax / 2, scale.vmax] if scale.one_sided else [-scale.vmax, 0, scale.vmax]
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal", ticks=ticks, format="%.3g")
    if note:
        fig.text(0.3 / fig_w, 0.12 / fig_h, note, fontsize=FONT_SIZE - 2, color="#444444", va="bottom", parse_math=False)
    if title:
        fig.suptitle(
            for_png(title), x=0.3 / fig_w, y=1 - 0.1 / fig_h, va="top", ha="left", fontsize=FONT_SIZE + 1, parse_math=False
        )
    return save_png(fig, path)


__all__ = [
    "TokenValues",
    "attention_pattern_figure",
    "attention_pattern_html",
    "attention_pattern_png",
    "legend_text",
    "shared_vmax",
    "token_heatmap_html",
    "token_heatmap_png",
    "token_heatmap_text",
    "token_scale",
    "token_stats_table",
    "value_rgb",
]
