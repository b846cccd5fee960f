"""Index results drawn: top examples and samples as token heatmaps, unit cards, histograms, a unit page.

- terminal: `examples_text` (one line per example, the activating token underlined; tokens with no
  stored activation, such as the positions the index does not score, are dim and keep the
  terminal's own colours), `strata_text`, `card_tables`, `histogram_text`. Where the console shows
  no colour (a pipe, a file), the example's own token is marked `⟦...⟧` instead of underlined;
- PNG: `histogram_png`, counts on a log scale over the unit's non-empty bins;
- HTML: `unit_page` writes one light self-contained page (values on hover, every token escaped, no
  plotly) through `viz.report.write_report`; `histogram_html` is its SVG histogram and
  `histogram_figure` the same as a plotly figure;
- a dictionary feature (`index.feature_card.FeatureCard`): `feature_tables` in the terminal and
  `feature_page` in HTML, the unit's views plus its logit effects and nearest features.

Colours are the scale of `viz.scale` (blue negative, red positive, white at 0; one-sided when no
value is negative), shared by every example of a unit: full colour at the unit's largest
|activation| shown. Tokens are shown as in `viz.shown`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.style import Style
from rich.table import Table
from rich.text import Text

from mechscope.index.card import OutputToken, UnitCard
from mechscope.index.feature_card import FeatureCard
from mechscope.index.query import Example, Histogram, Stratum
from mechscope.index.stats import LOW_EXP, ZERO_BIN
from mechscope.viz.html_figures import bars_html
from mechscope.viz.report import save_png, table_html, write_report
from mechscope.viz.scale import Scale, hex_colour, ink, value_rgb
from mechscope.viz.shown import plain, shown_token, token_label
from mechscope.viz.terminal import ColourText
from mechscope.viz.token_heatmap import legend_text

_SPARK = "▁▂▃▄▅▆▇█"


def _shown(example: Example) -> list[str]:
    """Each token of the window as drawn on one line: whitespace made visible, no line breaks."""
    tokens = example.tokens or [f"<{i}>" for i in example.token_ids]
    return [shown_token(t) for t in tokens]


def examples_vmax(examples: Sequence[Example]) -> float:
    """The scale's end: the largest finite |activation| over the examples (1 if none)."""
    values = [abs(float(v)) for ex in examples for v in [ex.value, *ex.acts.tolist()] if math.isfinite(v)]
    return max(values, default=0.0) or 1.0


def examples_scale(examples: Sequence[Example], vmax: float | None = None) -> Scale:
    """The examples' shared scale: one-sided when no stored activation is negative."""
    values = [float(v) for ex in examples for v in [ex.value, *ex.acts.tolist()] if math.isfinite(v)]
    return Scale(examples_vmax(examples) if vmax is None else float(vmax), all(v >= 0 for v in values), 0)


NOT_STORED = "dim: no stored activation (the index does not score the first positions of a context)"


# -- terminal -------------------------------------------------------------------------------------


def example_line(example: Example, vmax: float, label: str | None = None) -> ColourText:
    """`label value` then the window's tokens on coloured backgrounds; the example's own token underlined
    (marked `⟦...⟧` where the console shows no colour)."""
    head = f"{label if label is not None else example.rank:>3} {example.value:>8.3f}  "
    out, piped = Text(), Text(head)
    out.append(head, style="dim")
    for p, piece, act in zip(example.positions, _shown(example), example.acts.tolist(), strict=True):
        style = Style(bold=True, underline=True) if p == example.pos else Style()
        if math.isfinite(act):
            rgb = value_rgb(act, vmax)
            style += Style(bgcolor=hex_colour(rgb), color=ink(rgb))
        else:
            style += Style(dim=True)
        out.append(piece, style=style)
        piped.append(f"⟦{piece}⟧" if p == example.pos else piece)
    return ColourText(out, piped)


def _lines(lines: Sequence[ColourText]) -> ColourText:
    return ColourText(Text("\n").join(line.coloured for line in lines), Text("\n").join(line.piped for line in lines))


def _with_legend(text: ColourText, scale: Scale) -> ColourText:
    coloured, piped = text.coloured.copy(), text.piped.copy()
    coloured.append("\n")
    coloured.append_text(legend_text(scale))
    coloured.append("  " + NOT_STORED, style="dim")
    piped.append("\n⟦...⟧: the example's own token")
    return ColourText(coloured, piped)


def examples_text(examples: Sequence[Example], vmax: float | None = None, legend: bool = True) -> ColourText:
    """Top examples, one line each, on one colour scale."""
    scale = examples_scale(examples, vmax)
    out = _lines([example_line(ex, scale.vmax) for ex in examples])
    return _with_legend(out, scale) if legend and examples else out


def strata_text(strata: Sequence[Stratum], vmax: float | None = None) -> ColourText:
    """Samples by activation range, highest range first, each range headed by its quantiles."""
    vmax = examples_vmax([ex for s in strata for ex in s.examples]) if vmax is None else vmax
    lines: list[ColourText] = []
    for s in reversed(strata):
        heading = Text(f"{_range(s)}  ({_quantiles(s)})", style="bold")
        lines.append(ColourText(heading, heading))
        lines += [example_line(ex, vmax, label="") for ex in s.examples]
    return _lines(lines)


def _range(s: Stratum) -> str:
    return s.text  # '[0.5, 1)', '(-1, -0.5]', '(-0.000977, 0.000977)'


def _quantiles(s: Stratum) -> str:
    return f"quantiles {100 * s.q_low:.2f}%–{100 * s.q_high:.2f}% of tokens"


def examples_renderables(hist: Histogram, examples: Sequence[Example], strata: Sequence[Stratum] = ()) -> list:
    """What a unit's page prints after its tables: histogram, top examples, then samples by range (rich renderables)."""
    if not examples:  # e.g. a dictionary latent that never fired on the indexed text
        return [histogram_text(hist), "\n[bold]no top examples[/]: the unit was never active on the indexed tokens"]
    out = [histogram_text(hist), f"\n[bold]top {len(examples)} examples[/] (rank, activation, then the tokens around it)"]
    out.append(examples_text(examples))
    if strata:
        out += ["\n[bold]samples by activation range[/]", strata_text(strata)]
    return out


def card_tables(card: UnitCard) -> list[Table]:
    """The card as rich tables: statistics, input tokens, and output tokens for a neuron."""
    st = card.stats
    stats = Table(title=plain(f"unit {card.unit.name} ({card.unit.site})"), title_justify="left")  # not the row number
    for column in ("tokens", "mean", "std", "max", "density", "active"):
        stats.add_column(column, justify="right")
    stats.add_row(f"{st.tokens:,}", f"{st.mean:.4g}", f"{st.std:.4g}", f"{st.max:.4g}", f"{st.density:.2%}", f"{st.active:,}")
    tables = [stats]
    inputs = Table(title="input tokens it fires on (top examples and samples)", title_justify="left")
    for column in ("token", "mean", "max", "count"):
        inputs.add_column(column, justify="left" if column == "token" else "right")
    for t in card.input_tokens:
        inputs.add_row(plain(_token_label(t.token, t.token_id)), f"{t.mean:.4g}", f"{t.max:.4g}", str(t.count))
    tables.append(inputs)
    if card.promoted is not None:
        tables.append(output_table(card.promoted, card.suppressed))
    return tables


OUTPUT_TITLE = "output tokens: direct logit effect per unit of activation, less its vocabulary mean"


def output_table(promoted: Sequence[OutputToken], suppressed: Sequence[OutputToken], title: str = OUTPUT_TITLE) -> Table:
    """Tokens promoted and suppressed side by side, with their (centred) logit effects."""
    out = Table(title=title, title_justify="left")
    for column in ("promotes", "weight", "suppresses", "weight "):
        out.add_column(column, justify="right" if column.startswith("weight") else "left")
    for up, down in zip(promoted, suppressed, strict=True):
        out.add_row(plain(token_label(up.token)), f"{up.weight:+.3f}", plain(token_label(down.token)), f"{down.weight:+.3f}")
    return out


def feature_tables(card: FeatureCard) -> list[Table]:
    """A feature as rich tables: its unit card from the index (logit effects as output tokens) or, without
    one, its logit effects alone; then its nearest features."""
    tables = card_tables(card.unit) if card.unit is not None else []
    if card.unit is None and card.promoted is not None:
        tables.append(output_table(card.promoted, card.suppressed))
    near = Table(title="nearest features (cosine of decoder directions)", title_justify="left")
    near.add_column("feature")
    near.add_column("cosine", justify="right")
    for n in card.nearest:
        near.add_row(str(n.feature), f"{n.cosine:+.3f}")
    return [*tables, *([_profile_table(card)] if card.profile else []), near]


def _profile_rows(card: FeatureCard) -> list[list[str]]:
    """(site, decoder norm, a bar of it relative to the largest) for each site the feature writes."""
    top = max(norm for _, norm in card.profile) or 1.0
    return [[site, f"{norm:.3f}", "█" * round(20 * norm / top)] for site, norm in card.profile]


def _profile_table(card: FeatureCard) -> Table:
    table = Table(title="decoder norm at each written site", title_justify="left")
    for column, justify in (("site", "left"), ("norm", "right"), ("", "left")):
        table.add_column(column, justify=justify)
    for row in _profile_rows(card):
        table.add_row(*(Text(cell) for cell in row))
    return table


def _token_label(token: str | None, token_id: int) -> str:
    return token_label(token) if token is not None else f"<{token_id}>"


def histogram_text(hist: Histogram, width: int = 64) -> Text:
    """A one-line sparkline of log counts over the non-empty range, its ends labelled."""
    if len(hist.counts) == 0:
        return Text("(empty histogram)")
    counts = hist.counts[:width] if len(hist.counts) <= width else _pool(hist.counts, width)
    logs = np.log1p(counts.astype(np.float64))
    top = logs.max() or 1.0
    spark = "".join(
        " " if c == 0 else _SPARK[min(len(_SPARK) - 1, int(v / top * len(_SPARK)))] for c, v in zip(counts, logs, strict=True)
    )
    return (
        Text(f"{_edge(hist.edges[0])} ", style="dim") + Text(spark) + Text(f" {_edge(hist.edges[-1])}  (log counts)", style="dim")
    )


def _pool(counts: np.ndarray, width: int) -> np.ndarray:
    groups = np.array_split(counts, width)
    return np.array([g.sum() for g in groups])


def _edge(x: float) -> str:
    return ("-∞" if x < 0 else "∞") if not math.isfinite(x) else f"{x:.3g}"


# -- histogram plots ------------------------------------------------------------------------------


def _bin_labels(hist: Histogram) -> list[str]:
    return [f"[{_edge(lo)}, {_edge(hi)})" for lo, hi in zip(hist.edges[:-1], hist.edges[1:], strict=True)]


def _ticks(hist: Histogram) -> list[tuple[float, str]]:
    """Bar positions to label: octave edges (about 12 of them), and 0 at the middle of the bin around it."""
    n = len(hist.counts)
    ticks = [i for i, edge in enumerate(hist.edges) if not math.isfinite(edge) or _power_of_two(abs(edge))]
    ticks = [i for i in ticks if abs(hist.edges[i]) != 2.0**LOW_EXP][:: max(1, len(ticks) // 12)]
    out = [(float(i), _edge(hist.edges[i])) for i in ticks]
    if 0 <= ZERO_BIN - hist.first_bin < n:  # the bin of |x| < 2^LOW_EXP, labelled 0 at its middle
        out.append((ZERO_BIN - hist.first_bin + 0.5, "0"))
    return out


def histogram_html(hist: Histogram) -> str:
    """A light SVG bar chart (no plotly), one bar per bin, counts on a log axis, each bar's range and count on hover."""
    total = max(int(hist.counts.sum()), 1)
    hover = [f"{int(c):,} tokens ({c / total:.3%})" for c in hist.counts]
    counts = [int(c) for c in hist.counts]
    return bars_html(counts, _bin_labels(hist), hover, _ticks(hist), x_title="activation (bins log-spaced in magnitude)")


def histogram_figure(hist: Histogram, title: str = "activation histogram"):
    """A plotly bar chart, one bar per bin (bins are log-spaced in |activation|), counts on a log axis."""
    import plotly.graph_objects as go

    total = max(int(hist.counts.sum()), 1)
    labels = _bin_labels(hist)
    hover = [f"{label}<br>{int(c):,} tokens ({c / total:.3%})" for label, c in zip(labels, hist.counts, strict=True)]
    fig = go.Figure(go.Bar(x=labels, y=hist.counts, hovertext=hover, hoverinfo="text", marker_color="#b2182b"))
    fig.update_layout(
        title=html.escape(title),
        xaxis={"title": "activation (bins log-spaced in magnitude)", "type": "category", "tickangle": -45},
        yaxis={"title": "tokens", "type": "log"},
        height=420,
    )
    return fig


def histogram_png(hist: Histogram, path: str | Path, title: str = "activation histogram") -> Path:
    """Save the histogram as a PNG: one bar per bin, counts on a log scale, octave edges labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(hist.counts)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * n + 2), 3.6))
    ax.bar(np.arange(n) + 0.5, hist.counts, width=1.0, color="#b2182b", edgecolor="white", linewidth=0.3)
    ax.set_yscale("log")
    ticks = _ticks(hist)
    ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(bottom=0.5)
    ax.set_xlim(0, max(n, 1))
    ax.set_xlabel("activation (bins log-spaced in magnitude)")
    ax.set_ylabel("tokens")
    ax.set_title(title, parse_math=False)
    fig.tight_layout()
    return save_png(fig, path)


def _power_of_two(x: float) -> bool:
    return x > 0 and math.log2(x).is_integer()


# -- HTML -----------------------------------------------------------------------------------------

_PAGE_STYLE = (
    "<style>"
    ".ms-ex{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:0.9rem;line-height:1.8;"
    "white-space:pre;overflow-x:auto;margin:0.1rem 0}"
    ".ms-ex .meta{color:#888;display:inline-block;min-width:7.5rem}"
    ".ms-ex .tok{padding:0.1rem 0;border-right:1px solid rgba(128,128,128,0.25);unicode-bidi:isolate}"
    ".ms-ex .none{color:#888}"
    ".ms-ex .at{outline:2px solid #1d1d1f;font-weight:700}"
    "</style>"
)


def example_html(example: Example, vmax: float, label: str | None = None) -> str:
    """One example as a line of token spans; hovering a token shows its position, text and activation."""
    meta = html.escape(f"{label if label is not None else example.rank} · {example.value:.3f}")
    spans = []
    tokens = example.tokens or [f"<{i}>" for i in example.token_ids]
    for p, token, piece, act in zip(example.positions, tokens, _shown(example), example.acts.tolist(), strict=True):
        known = math.isfinite(act)
        value = f"{act:.4g}" if known else "not stored (not scored)"
        tip = html.escape(f"ctx {example.ctx} pos {p} {token_label(token)} = {value}", quote=True)
        rgb = value_rgb(act, vmax)
        style = f" style='background:{hex_colour(rgb)};color:{ink(rgb)}'" if known else ""
        cls = "tok" + (" at" if p == example.pos else "") + ("" if known else " none")
        spans.append(f"<span class='{cls}'{style} title=\"{tip}\">{html.escape(piece)}</span>")
    return f"<div class='ms-ex'><span class='meta'>{meta}</span>{''.join(spans)}</div>"


def examples_html(examples: Sequence[Example], vmax: float | None = None) -> str:
    vmax = examples_vmax(examples) if vmax is None else vmax
    return _PAGE_STYLE + "".join(example_html(ex, vmax) for ex in examples)


def strata_html(strata: Sequence[Stratum], vmax: float | None = None) -> str:
    vmax = examples_vmax([ex for s in strata for ex in s.examples]) if vmax is None else vmax
    parts = []
    for s in reversed(strata):
        parts.append(f"<h3>{html.escape(_range(s))} <small>{html.escape(_quantiles(s))}</small></h3>")
        parts.extend(example_html(ex, vmax, label="") for ex in s.examples)
    return _PAGE_STYLE + "".join(parts)


def unit_page(
    path: str | Path, card: UnitCard, examples: Sequence[Example], strata: Sequence[Stratum] = (), title: str | None = None
) -> Path:
    """Write a self-contained HTML page on one unit: its card, histogram, top examples and samples by range."""
    return write_report(path, title or f"Unit {card.unit.name} · {card.unit.site}", unit_sections(card, examples, strata))


def unit_sections(card: UnitCard, examples: Sequence[Example], strata: Sequence[Stratum] = ()) -> list[tuple[str, object]]:
    """The sections of a unit's page: statistics, histogram, top examples, samples, input and output tokens."""
    st, u = card.stats, card.unit
    stats = table_html(
        ["unit", "site", "tokens", "mean", "std", "max", "density", "active"],
        [[u.name, u.site, f"{st.tokens:,}", f"{st.mean:.4g}", f"{st.std:.4g}", f"{st.max:.4g}", f"{st.density:.2%}", st.active]],
    )
    vmax = examples_vmax([*examples, *(ex for s in strata for ex in s.examples)])
    sections: list[tuple[str, object]] = [
        ("Statistics", stats),
        ("Histogram", histogram_html(card.histogram)),
        (f"Top {len(examples)} examples (the example's token outlined; hover for values)", examples_html(examples, vmax)),
    ]
    if strata:
        sections.append(("Samples by activation range", strata_html(strata, vmax)))
    inputs = [[_token_label(t.token, t.token_id), f"{t.mean:.4g}", f"{t.max:.4g}", t.count] for t in card.input_tokens]
    sections.append(("Input tokens it fires on", table_html(["token", "mean", "max", "count"], inputs)))
    if card.promoted is not None:
        sections.append(_output_section(card.promoted, card.suppressed))
    return sections


def _output_section(promoted: Sequence[OutputToken], suppressed: Sequence[OutputToken], via: str = "") -> tuple[str, str]:
    rows = [
        [token_label(a.token), f"{a.weight:+.3f}", token_label(b.token), f"{b.weight:+.3f}"]
        for a, b in zip(promoted, suppressed, strict=True)
    ]
    title = "Output tokens (direct logit effect per unit of activation, less its mean over the vocabulary)"
    return title + (f" via {via}" if via else ""), table_html(["promotes", "weight", "suppresses", "weight"], rows)


def feature_page(path: str | Path, card: FeatureCard, examples: Sequence[Example] = (), strata: Sequence[Stratum] = ()) -> Path:
    """Write a self-contained HTML page on one feature: the unit page's sections when an index holds it (the logit
    effects as its output tokens), else the logit effects and a note on what an index would add; then the
    nearest features."""
    if card.unit is not None:
        sections = unit_sections(card.unit, examples, strata)
    else:
        sections = [("Examples", f"<p>{html.escape(card.note or '')}</p>")]
        if card.promoted is not None:
            sections.append(_output_section(card.promoted, card.suppressed, card.logits_via))
    if card.promoted is None:
        sections.append(("Output tokens", f"<p>{html.escape(card.logits_via)}</p>"))
    if card.profile:
        sections.append(("Decoder norm at each written site", table_html(["site", "norm", ""], _profile_rows(card))))
    near = [[n.feature, f"{n.cosine:+.3f}"] for n in card.nearest]
    sections.append(("Nearest features (cosine of decoder directions)", table_html(["feature", "cosine"], near)))
    return write_report(path, f"Feature {card.name}", sections)
