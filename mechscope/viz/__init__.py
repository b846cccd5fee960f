"""Heatmaps and reports: terminal, self-contained HTML, PNG."""

from mechscope.viz.lens_plots import lens_figure, lens_png, lens_table
from mechscope.viz.report import table_html, write_report

__all__ = ["lens_figure", "lens_png", "lens_table", "table_html", "write_report"]
