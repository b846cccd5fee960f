"""Small pictures and pages of dictionary work: training curves of a short run, a latent that never fired."""

import numpy as np
from rich.console import Console

from mechscope.index.query import Histogram
from mechscope.viz.dict_plots import training_curves_png
from mechscope.viz.index_views import examples_renderables


def test_curves_of_a_short_run_count_thousands_of_tokens(tmp_path):
    metrics = [{"tokens": 512 * s, "loss": 1 / s, "fvu": 1 / s, "l0": 8.0, "dead": 0.0} for s in range(1, 40)]
    training_curves_png(metrics, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_a_unit_that_never_fired_says_so_instead_of_listing_no_examples():
    hist = Histogram(np.array([-(2.0**-10), 2.0**-10]), np.array([4096]), 0)
    console = Console(width=100, record=True, color_system=None)
    for part in examples_renderables(hist, []):
        console.print(part)
    text = console.export_text()
    assert "never active on the indexed tokens" in text and "top 0 examples" not in text
