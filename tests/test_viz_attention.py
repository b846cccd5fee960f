"""Attention patterns drawn: a one-sided scale set beyond the attention sink, the sink's keys faded,
masked future keys unlike real zeros (synthetic patterns)."""

import numpy as np
import torch
from PIL import Image

from mechscope.attribution.activations import AttentionPattern
from mechscope.viz.attention import attention_pattern_figure, attention_pattern_html, attention_pattern_png

TOKENS = ["The", " <b>", " of", " Wiki", " is", " very", " true"]


def _pattern() -> AttentionPattern:
    """Row q puts 0.9 on key 0 (the sink) and spreads the rest; key 4 gets an exact 0 from query 6."""
    n = len(TOKENS)
    z = torch.zeros(n, n)
    for q in range(n):
        z[q, : q + 1] = 0.1 / (q + 1)
        z[q, 0] += 0.9
    z[6, 4] = 0.0
    z[5, 5] = 0.3
    return AttentionPattern(TOKENS, z / z.sum(-1, keepdim=True), "head 5.3 attention")


def test_scale_is_one_sided_and_set_beyond_the_sink():
    ap = _pattern()
    heatmap = attention_pattern_figure(ap).data[0]
    beyond = [float(ap.pattern[q, k]) for q in range(7) for k in range(4, q + 1)]
    assert heatmap.zmin == 0 and heatmap.zmax == max(beyond) < 0.5 < float(ap.pattern[:, 0].min())
    assert attention_pattern_figure(ap, skip=0).data[0].zmax == float(ap.pattern.max())


def test_masked_keys_are_not_zeros():
    ap = _pattern()
    heatmap = attention_pattern_figure(ap).data[0]
    assert heatmap.z[2][5] is None and heatmap.z[6][4] == 0.0  # masked: no value; a real zero: 0
    assert "masked (a future key)" in heatmap.hovertext[2][5] and heatmap.hovertext[6][4].endswith(": 0")
    page = attention_pattern_html(ap)
    cells = page.split("<tbody>")[1].split("<tr>")[1:]
    row2, row6 = cells[2].split("<td")[1:], cells[6].split("<td")[1:]
    assert row2[5].startswith(" class='m'") and "masked" in row2[5]
    assert "background:#f7fbff" in row6[4] and "class='m'" not in row6[4]  # Blues at 0: white-ish, not hatched
    assert "&lt;b&gt;" in page and "<b>" not in page and "<script" not in page


def test_sink_keys_are_faded_with_their_values_on_hover():
    page = attention_pattern_html(_pattern())
    rows = page.split("<tbody>")[1].split("<tr>")[1:]
    assert all(" class='f'" in row.split("<td")[1] for row in rows)  # key 0 in every row
    assert "(key not scored: beyond the scale)" in rows[3].split("<td")[1]
    assert "keys 0–3, not scored" in page


def test_png_hatches_masked_cells(tmp_path, monkeypatch):
    """A masked cell shows grey hatch lines on white; a real zero is one flat colour of the scale."""
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    path = attention_pattern_png(_pattern(), tmp_path / "a.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    fig = figures[0]
    ax, scale = fig.axes[0], 110 / fig.dpi  # saved at 110 dpi

    def cell(q: int, k: int) -> np.ndarray:
        (x0, y0), (x1, y1) = ax.transData.transform([(k - 0.3, q - 0.3), (k + 0.3, q + 0.3)]) * scale
        height = pixels.shape[0]
        rows = slice(round(height - max(y0, y1)), round(height - min(y0, y1)))
        return pixels[rows, round(min(x0, x1)) : round(max(x0, x1))].reshape(-1, 3)

    masked, zero = cell(1, 5), cell(6, 4)
    assert len(masked) > 20 and len(np.unique(masked, axis=0)) > 2  # lines on white
    assert len(np.unique(zero, axis=0)) == 1 and tuple(zero[0]) != (255, 255, 255)
