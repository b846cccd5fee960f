"""Self-contained HTML reports: figures and small tables in one file that works offline.

mechscope's own figures (`lens_html`, `patching_html`, `attention_pattern_html`, `histogram_html`,
`token_heatmap_html`) are plain HTML and SVG: a page of them weighs kilobytes. A plotly figure needs
plotly.js (4.6 MB), which a report carries once whatever the number of figures: inline (the page
stands alone), or with `plotly_js="beside"` as one `plotly.min.js` next to the page that every
report written to the same folder shares.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

PLOTLY_FILE = "plotly.min.js"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
td, th { padding: 0.2rem 0.8rem; border-bottom: 1px solid #ddd; text-align: left; }
code { background: #f4f4f6; padding: 0 0.2rem; }
"""


def table_html(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; every cell is escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _write(path: Path, text: str) -> None:
    """Write atomically: a temporary file beside `path`, removed if the write fails."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _plotly_beside(folder: Path) -> None:
    """Put plotly.js next to the report, once per folder (rewritten only when it differs)."""
    from plotly.offline import get_plotlyjs

    script = get_plotlyjs()
    target = folder / PLOTLY_FILE
    if not target.exists() or target.stat().st_size != len(script.encode()):
        _write(target, script)


def write_report(
    path: str | Path, title: str, sections: Sequence[tuple[str, object]], plotly_js: Literal["inline", "beside"] = "inline"
) -> Path:
    """Write a report atomically. Each section is (heading, HTML string or plotly figure).

    Headings and the title are escaped; HTML strings are used as they are. Pages with plotly figures
    carry plotly.js once: inline, or as one `plotly.min.js` beside the page (`plotly_js="beside"`).
    """
    if plotly_js not in ("inline", "beside"):
        raise ValueError(f"plotly_js {plotly_js!r}: give 'inline' or 'beside'")
    path = Path(path)
    parts, plotly_included = [], False
    for heading, content in sections:
        if hasattr(content, "to_html"):
            script = (True if plotly_js == "inline" else PLOTLY_FILE) if not plotly_included else False
            content = content.to_html(full_html=False, include_plotlyjs=script)
            plotly_included = True
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{content}")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if plotly_included and plotly_js == "beside":
        _plotly_beside(path.parent)
    _write(path, page)
    return path


def save_png(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as a PNG (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
