"""The colour scale of values over text, and which positions it counts.

Which positions: the index's rule (`mechscope.index.IndexSettings.skip`). The first few positions of
a text are where a model without a start token parks its attention, and its units take outlier
values there (SmolLM2's neuron 29:288 reaches about 62 at position 0 of any text, where about 40 is
high elsewhere). Views draw those positions marked as not scored, with their values still on hover
and in the numbers, and leave them out of the scale and of the max they report. When a text is no
longer than that, nothing is left to score, and the scale falls back to every position.

The scale: blue negative, white at 0, red positive, full colour at +-vmax (the largest |value| over
the scored positions of every text shown, so several texts share one scale). It is one-sided
(0..vmax, white to red) when no scored value is negative, as for a head's output norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

NEGATIVE = (33, 102, 172)  # blue, at -vmax
POSITIVE = (178, 24, 43)  # red, at +vmax
NEUTRAL = (255, 255, 255)  # white, at 0
MISSING = (160, 160, 160)  # grey: NaN


def default_skip() -> int:
    """How many positions at the start of a text are not scored: the index's `skip`."""
    from mechscope.index.build import IndexSettings  # the index defines the rule; imported only when drawing

    return IndexSettings.skip


def resolve_skip(skip: int | None) -> int:
    return default_skip() if skip is None else max(0, int(skip))


def value_rgb(value: float, vmax: float) -> tuple[int, int, int]:
    """The colour of `value` on the diverging scale [-vmax, vmax]; NaN is grey."""
    if not math.isfinite(value):
        return MISSING if math.isnan(value) else (POSITIVE if value > 0 else NEGATIVE)
    frac = max(-1.0, min(1.0, value / vmax)) if vmax > 0 else 0.0
    end = POSITIVE if frac >= 0 else NEGATIVE
    t = abs(frac)
    return tuple(round(n + (e - n) * t) for n, e in zip(NEUTRAL, end, strict=True))


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def ink(rgb: tuple[int, int, int]) -> str:
    """Black or white text, whichever reads on this background."""
    r, g, b = (c / 255 for c in rgb)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


class Scale(NamedTuple):
    """A colour scale: -vmax..vmax, or 0..vmax when one-sided."""

    vmax: float
    one_sided: bool
    skip: int
    """Positions at the start of each text left out of the scale (0: none)."""

    @property
    def vmin(self) -> float:
        return 0.0 if self.one_sided else -self.vmax

    def rgb(self, value: float) -> tuple[int, int, int]:
        return value_rgb(value, self.vmax)

    def stops(self, n: int = 9) -> list[float]:
        """n values evenly spaced from vmin to vmax."""
        return [self.vmin + (self.vmax - self.vmin) * k / (n - 1) for k in range(n)]


def scored(values: Sequence[float], skip: int) -> list[float]:
    """The finite values at positions `skip`.. (none when the text is no longer than `skip`)."""
    return [v for v in values[skip:] if math.isfinite(v)]


def make_scale(texts: Sequence[Sequence[float]], vmax: float | None = None, skip: int = 0) -> Scale:
    """The scale for several texts' values: their scored positions set its end and whether it is one-sided.

    If no text is longer than `skip`, nothing is scored and every position counts (`skip` becomes 0).
    """
    counted = [v for vals in texts for v in scored(vals, skip)]
    if not counted:
        skip = 0
        counted = [v for vals in texts for v in vals if math.isfinite(v)]
    one_sided = all(v >= 0 for v in counted)
    if vmax is None:
        vmax = max((abs(v) for v in counted), default=0.0) or 1.0
    return Scale(float(vmax), one_sided, skip)


def skip_note(skip: int) -> str:
    """What a legend says about the positions left out."""
    where = "position 0" if skip == 1 else f"positions 0–{skip - 1}"
    return f"{where} of each text not scored (as in the index: outliers there), left out of the scale and the max"
