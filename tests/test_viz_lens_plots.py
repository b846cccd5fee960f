"""The logit lens drawn at any size: a long prompt's table still shows numbers, the PNG sizes to its grid,
the light HTML carries the values; every label is literal (synthetic lens results: no model needed)."""

import re

import matplotlib
import numpy as np
import torch
from PIL import Image
from rich.console import Console

from mechscope.lens import LensResult
from mechscope.viz.lens_plots import lens_figure, lens_html, lens_png, lens_table

NUMBER = re.compile(r"\d\.\de[+-]\d\d")


def synthetic_lens(n: int, target: str = " the", tokens: list[str] | None = None) -> LensResult:
    """A lens of 31 rows over n positions whose probabilities span 1e-9..0.9."""
    tokens = tokens or [f" w{i}" for i in range(n)]
    rows = ["embed", *map(str, range(30))]
    probs = torch.logspace(-9, -0.05, len(rows) * n).reshape(len(rows), n, 1)
    return LensResult(
        tokens=tokens, positions=list(range(n)), rows=rows, sites=[""] * len(rows), targets=[target], target_ids=[0],
        probs=probs, ranks=torch.ones(len(rows), n, 1), top_ids=torch.zeros(len(rows), n, 2, dtype=torch.long),
        top_probs=torch.full((len(rows), n, 2), 0.1), top_tokens=[[["<b>", "[i]"]] * n] * len(rows),
    )  # fmt: skip


def _print(renderable, width: int) -> str:
    console = Console(record=True, width=width, color_system="truecolor", force_terminal=True)
    console.print(renderable)
    return console.export_text()


def test_77_token_table_shows_numbers_and_says_what_is_left_out():
    for width in (80, 120, 200):
        out = _print(lens_table(synthetic_lens(77)), width)
        body = [line for line in out.splitlines() if line.startswith("│")]
        assert len(body) == 31
        shown = len(NUMBER.findall(body[-1]))
        assert shown >= (width - 12) // 12 and all(len(NUMBER.findall(line)) == shown for line in body)
        assert f"showing {shown} of 77 columns (the last positions)" in out.replace("\n", " ")
        assert "76" in out and "' w76'" in out  # the last position is always there
        assert max(len(line) for line in out.splitlines()) <= width


def test_short_prompt_table_shows_every_position_without_a_note():
    out = _print(lens_table(synthetic_lens(6)), 100)
    assert "showing" not in out and all(f"' w{i}'" in out for i in range(6))


def test_title_and_headers_are_literal():
    out = _print(lens_table(synthetic_lens(3, target="[bold]", tokens=["[i]", " [/]", " x"])), 100)
    assert "P('[bold]')" in out and "'[i]'" in out and "' [/]'" in out


def test_png_sizes_to_its_grid(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    for n in (6, 77):
        pixels = np.asarray(Image.open(lens_png(synthetic_lens(n, target=" $x$"), tmp_path / f"l{n}.png")).convert("L"))
        height, width = pixels.shape
        assert height < 1300 and width < (1000 if n == 6 else 3000)
        cols, rows = np.nonzero(pixels.min(0) < 255)[0], np.nonzero(pixels.min(1) < 255)[0]  # where anything is drawn
        margins = (cols[0], width - cols[-1], rows[0], height - rows[-1])
        assert max(margins) < 100, (n, margins)  # was 1,500 px of blank beside a 77-token grid
    texts = [t for fig in figures for t in fig.findobj(matplotlib.text.Text) if "$" in t.get_text()]
    assert texts and not any(t.get_parse_math() for t in texts)


def test_light_html_has_the_numbers_and_escapes_labels():
    page = lens_html(synthetic_lens(3, tokens=["<b>", " &amp;", " x"]))
    assert "<script" not in page and "&lt;b&gt;" in page and "&amp;amp;" in page and "<b>" not in page
    assert page.count("<td") == 31 * 3 and "8.9e-01" in page  # short prompts: a number in each cell
    assert "top: &#x27;&lt;b&gt;&#x27; 0.10, &#x27;[i]&#x27; 0.10" in page  # hover: the top tokens
    long = lens_html(synthetic_lens(77))
    assert long.count("<td") == 31 * 77 and not NUMBER.search(long.replace("title=", "\0").split("\0")[0])


def test_plotly_figure_is_sized_and_escaped():
    fig = lens_figure(synthetic_lens(3, tokens=["<b>", " x", " y"]))
    assert fig.layout.width and fig.layout.height and "&lt;b&gt;" in fig.data[0].x[0]
