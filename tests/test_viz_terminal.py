"""Terminal views keep their information anywhere: piped output has the values and marks the colours
gave, and tables with many columns show the ones that fit, with a note (synthetic data)."""

import io
import re

import numpy as np
import torch
from rich.console import Console

from mechscope.attribution.activations import TokenValues
from mechscope.index.query import Example
from mechscope.viz.grids import grid_table
from mechscope.viz.index_views import examples_text, strata_text
from mechscope.viz.token_heatmap import token_heatmap_text

TOKENS = ["The", " rel", "iability", " of", " Wikipedia", " is", " very", " question", "able", "."]
VALUES = torch.tensor([62.0, 12.0, 20.0, 15.0, 25.0, 30.0, 28.0, 41.0, 33.0, -2.5])


def _piped(renderable, width: int = 100) -> str:
    """What a pipe or a file receives: rich sees no terminal, so no colour."""
    buffer = io.StringIO()
    Console(file=buffer, width=width).print(renderable)
    return buffer.getvalue()


def _terminal(renderable, width: int = 100) -> str:
    console = Console(record=True, width=width, color_system="truecolor", force_terminal=True)
    console.print(renderable)
    return console.export_text()


def test_piped_heatmap_keeps_every_value_and_the_max_mark():
    out = _piped(token_heatmap_text([TokenValues(TOKENS, VALUES, "neuron 29:288")]))
    lines = {int(m[1]): m for m in re.finditer(r"^\s*(\d+)\s+(-?[\d.]+)\s+'(.*)'(.*)$", out, re.M)}
    assert sorted(lines) == list(range(len(TOKENS)))
    for pos, (token, value) in enumerate(zip(TOKENS, VALUES.tolist(), strict=True)):
        assert float(lines[pos][2]) == value and lines[pos][3] == token
    assert "← max" in lines[7][4]  # the max over the scored positions, not position 0
    assert all("(not scored)" in lines[p][4] for p in range(4)) and "(not scored)" not in lines[4][4]
    assert "neuron 29:288" in out and "positions 0–3 of each text not scored" in out


def test_terminal_heatmap_is_coloured_tokens():
    out = _terminal(token_heatmap_text(TokenValues(TOKENS, VALUES, "neuron 29:288")))
    assert "".join(TOKENS) in out and "← max" not in out


def _example(value: float, at: int) -> Example:
    tokens = [" a", "[i]", " b", " c"]
    acts = np.array([np.nan, 1.0, value, 0.5], np.float32)
    return Example(0, value, 3, 10 + at, 7, list(range(9, 13)), [1, 2, 3, 4], tokens, acts)


def test_piped_examples_mark_their_own_token():
    out = _piped(examples_text([_example(4.0, 1)]))
    assert " a[i]⟦ b⟧ c" in out and "4.000" in out and "⟦...⟧: the example's own token" in out
    terminal = _terminal(examples_text([_example(4.0, 1)]))
    assert " a[i] b c" in terminal and "⟦" not in terminal
    from mechscope.index.query import Stratum
    from mechscope.index.stats import N_STRATA, stratum_range

    octave = next(s for s in range(N_STRATA) if stratum_range(s) == (2.0, 4.0))  # the positive range [2, 4)
    strata = [Stratum(octave, 2.0, 4.0, 0.5, 0.9, [_example(3.0, 2)])]
    assert "⟦ c⟧" in _piped(strata_text(strata)) and "[2, 4)" in _piped(strata_text(strata))


def test_grid_table_keeps_the_largest_columns_when_narrow():
    grid = torch.zeros(3, 40)
    grid[:, 17] = 1.0
    grid[:, 33] = -0.8
    labels = [f" t{i}" for i in range(40)]
    narrow = _terminal(grid_table("resid_pre", ["0", "1", "2"], labels, grid), width=60)
    assert "t17" in narrow and "t33" in narrow and "+1.00" in narrow and "-0.80" in narrow
    assert re.search(r"showing \d+ of 40 columns \(those with the largest \|value\|\)", narrow.replace("\n", " "))
    assert "showing" not in _terminal(grid_table("resid_pre", ["0"], labels[:5], grid[:1, :5]), width=100)
