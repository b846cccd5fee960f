"""Reports are light: mechscope's own figures need no plotly.js, and a report with plotly figures carries
plotly.js once (inline, or one file shared beside the pages)."""

import plotly.graph_objects as go
import pytest
import torch
from plotly.offline import get_plotlyjs

from mechscope.attribution.activations import AttentionPattern, TokenValues
from mechscope.attribution.patching import PatchingResult
from mechscope.viz import attention_pattern_html, lens_html, patching_html, token_heatmap_html, write_report
from mechscope.viz.report import PLOTLY_FILE

PLOTLY_MARK = get_plotlyjs()[:300]  # the bundle's opening: present once per copy of plotly.js


def _figures(n: int) -> list[tuple[str, go.Figure]]:
    return [(f"figure {i}", go.Figure(go.Heatmap(z=[[i, 1], [2, 3]]))) for i in range(n)]


def test_a_report_with_several_plotly_figures_holds_plotly_js_once(tmp_path):
    page = write_report(tmp_path / "r.html", "three", _figures(3)).read_text()
    assert page.count(PLOTLY_MARK) == 1 and page.count("Plotly.newPlot") == 3


def test_beside_shares_one_script_between_reports(tmp_path):
    for name in ("a", "b"):
        page = write_report(tmp_path / f"{name}.html", name, _figures(2), plotly_js="beside").read_text()
        assert PLOTLY_MARK not in page and page.count(f'src="{PLOTLY_FILE}"') == 1 and len(page) < 20_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html", PLOTLY_FILE]
    assert (tmp_path / PLOTLY_FILE).read_text() == get_plotlyjs()
    with pytest.raises(ValueError, match="give 'inline' or 'beside'"):
        write_report(tmp_path / "c.html", "c", [], plotly_js="cdn")


def test_pages_of_mechscope_figures_are_small_and_script_free(tmp_path):
    from test_viz_lens_plots import synthetic_lens

    tokens = ["The", " reliability", " of", " Wikipedia", " is", " very"]
    grid = torch.linspace(-1, 1, 30 * 6).reshape(30, 6)
    patching = PatchingResult(
        "hook_resid_pre", "activation", grid, grid, list(range(30)), list(range(6)), tokens, 7.3, -6.0, "logit_diff"
    )
    sections = [
        ("lens", lens_html(synthetic_lens(6))),
        ("patching", patching_html(patching)),
        ("pattern", attention_pattern_html(AttentionPattern(tokens, torch.tril(torch.ones(6, 6)) / 6, "head 5.3"))),
        ("neuron", token_heatmap_html(TokenValues(tokens, torch.arange(6.0), "neuron 29:288"))),
    ]
    for heading, html in sections:
        page = write_report(tmp_path / f"{heading}.html", heading, [(heading, html)]).read_text()
        assert "<script" not in page and len(page) < 60_000, (heading, len(page))
    assert len(write_report(tmp_path / "all.html", "all", sections).read_text()) < 150_000  # was 4.8 MB with plotly


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        write_report(tmp_path / "taken", "x", [("a", "<p>a</p>")])
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
