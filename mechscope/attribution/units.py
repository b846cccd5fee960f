"""Units: single neurons and single attention heads, named by short strings.

A neuron is `L:N` (layer L, neuron N of that layer's MLP, read at `blocks.L.mlp.hook_post`), a head
is `L.H` (layer L, head H, read at `blocks.L.attn.hook_z`). `parse_unit` checks a string against a
model's sizes; `parse_assignment` reads `L:N=V` / `L.H=V`, as the command line's `--set` and
`--scale` take them. Every bad string gets one line naming it and what would have been valid.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from mechscope.errors import MechscopeError
from mechscope.models.sites import Dims, Site

UnitKind = Literal["neuron", "head"]

_NEURON = re.compile(r"(\d+):(\d+)")
_HEAD = re.compile(r"(\d+)\.(\d+)")
_SYNTAX = "write a neuron as LAYER:NEURON (e.g. 12:345) or a head as LAYER.HEAD (e.g. 5.3)"


@dataclass(frozen=True)
class Unit:
    """One neuron (`kind="neuron"`, index in 0..d_mlp-1) or one head (`kind="head"`, index in 0..n_heads-1)."""

    kind: UnitKind
    layer: int
    index: int

    @property
    def site(self) -> Site:
        """The site holding this unit: `blocks.L.mlp.hook_post` for a neuron, `blocks.L.attn.hook_z` for a head."""
        return Site("mlp.hook_post" if self.kind == "neuron" else "attn.hook_z", self.layer)

    def __str__(self) -> str:
        return f"{self.layer}:{self.index}" if self.kind == "neuron" else f"{self.layer}.{self.index}"


def _dims(model_or_dims) -> Dims:
    return model_or_dims if isinstance(model_or_dims, Dims) else model_or_dims.dims


def check_unit(unit: Unit, model_or_dims) -> Unit:
    """`unit` if it exists in the model (a `Model` or its `Dims`); a one-line error naming the valid range otherwise."""
    dims = _dims(model_or_dims)
    if unit.kind not in ("neuron", "head"):
        raise MechscopeError(f"unknown unit kind {unit.kind!r}: valid kinds are neuron, head")
    if not 0 <= unit.layer < dims.n_layers:
        raise MechscopeError(f"layer {unit.layer} out of range in unit '{unit}': valid layers are 0..{dims.n_layers - 1}")
    size, what = (dims.d_mlp, "neurons") if unit.kind == "neuron" else (dims.n_heads, "heads")
    if not 0 <= unit.index < size:
        raise MechscopeError(f"{unit.kind} {unit.index} out of range in unit '{unit}': valid {what} are 0..{size - 1}")
    return unit


def parse_unit(text: str | Unit, model_or_dims) -> Unit:
    """A neuron `"L:N"` or a head `"L.H"` (or a `Unit`), checked against the model.

    >>> parse_unit("12:345", model)   # Unit(kind='neuron', layer=12, index=345)
    >>> parse_unit("5.3", model)      # Unit(kind='head', layer=5, index=3)
    """
    if isinstance(text, Unit):
        return check_unit(text, model_or_dims)
    if not isinstance(text, str):
        raise MechscopeError(f"bad unit {text!r}: {_SYNTAX}")
    s = text.strip()
    if match := _NEURON.fullmatch(s):
        unit = Unit("neuron", int(match.group(1)), int(match.group(2)))
    elif match := _HEAD.fullmatch(s):
        unit = Unit("head", int(match.group(1)), int(match.group(2)))
    else:
        raise MechscopeError(f"bad unit {text!r}: {_SYNTAX}")
    return check_unit(unit, model_or_dims)


def parse_units(texts: str | Unit | Iterable[str | Unit], model_or_dims) -> list[Unit]:
    """Several units: a list, or one string with units separated by commas (`"12:345,5.3"`)."""
    if isinstance(texts, Unit):
        texts = [texts]
    elif isinstance(texts, str):
        texts = [t for t in texts.split(",") if t.strip()] or [texts]
    units = [parse_unit(t, model_or_dims) for t in texts]
    if not units:
        raise MechscopeError(f"no units given: {_SYNTAX}")
    return units


def parse_assignment(text: str, model_or_dims) -> tuple[Unit, float]:
    """A unit and a number: `"12:345=3.5"` (neuron) or `"5.3=0.5"` (head)."""
    if not isinstance(text, str) or text.count("=") != 1:
        raise MechscopeError(f"bad assignment {text!r}: write UNIT=NUMBER, e.g. 12:345=3.5 for a neuron or 5.3=0.5 for a head")
    unit_text, value_text = text.split("=")
    unit = parse_unit(unit_text, model_or_dims)
    try:
        value = float(value_text)
    except ValueError:
        raise MechscopeError(f"bad number {value_text.strip()!r} in {text!r}: give a number after '=', e.g. {unit}=3.5") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise MechscopeError(f"bad number {value_text.strip()!r} in {text!r}: give a finite number after '='")
    return unit, value
