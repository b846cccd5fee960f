"""The shapes a tiny model (`tiny_model`) may take, checked without importing any modelling code."""

from __future__ import annotations

from mechscope.errors import MechscopeError, one_of

ACTIVATIONS = ("gelu", "solu", "topk")
"""MLP activations: GELU (the baseline), SoLU (Elhage et al. 2022) and TopK (GELU of the k largest units)."""
LAYERS = (1, 2)
MAX_D_MODEL = 256


def check_shape(act: str, layers: int, d_model: int, n_heads: int, d_mlp: int, k: int) -> None:
    """Refuse, in one line naming the value and what is valid, a shape the tiny models do not take."""
    if act not in ACTIVATIONS:
        raise MechscopeError(f"unknown MLP activation {act!r}: valid activations are {one_of(ACTIVATIONS)}")
    if layers not in LAYERS:
        raise MechscopeError(f"layers={layers} is invalid: a tiny model has {' or '.join(map(str, LAYERS))} layers")
    if not 1 <= d_model <= MAX_D_MODEL:
        raise MechscopeError(f"d_model={d_model} is out of range: valid values are 1..{MAX_D_MODEL}")
    if n_heads < 1 or d_model % n_heads:
        raise MechscopeError(f"n_heads={n_heads} is invalid: it must divide d_model={d_model}")
    if d_mlp < 1:
        raise MechscopeError(f"d_mlp={d_mlp} is invalid: it must be a positive integer")
    if act == "topk" and not 1 <= k <= d_mlp:
        raise MechscopeError(f"k={k} is out of range for d_mlp={d_mlp}: valid values are 1..{d_mlp}")
