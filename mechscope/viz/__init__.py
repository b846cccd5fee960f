"""Heatmaps and reports: terminal, light self-contained HTML, PNG (and plotly figures on request)."""

from mechscope.viz.attention import attention_pattern_figure, attention_pattern_html, attention_pattern_png
from mechscope.viz.grids import grid_table
from mechscope.viz.lens_plots import lens_figure, lens_html, lens_png, lens_table
from mechscope.viz.patching_plots import patching_figure, patching_html
from mechscope.viz.report import table_html, write_report
from mechscope.viz.token_heatmap import (
    token_heatmap_html,
    token_heatmap_png,
    token_heatmap_text,
    token_stats_table,
)

__all__ = [
    "grid_table",
    "attention_pattern_figure",
    "attention_pattern_html",
    "attention_pattern_png",
    "token_heatmap_html",
    "token_heatmap_png",
    "token_heatmap_text",
    "token_stats_table",
    "lens_figure",
    "lens_html",
    "lens_png",
    "lens_table",
    "patching_figure",
    "patching_html",
    "table_html",
    "write_report",
]
