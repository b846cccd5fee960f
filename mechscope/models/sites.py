"""Sites: the named points of a model's computation, with TransformerLens names.

A site name is either global (`hook_embed`, `ln_final.hook_normalized`) or per block
(`blocks.L.hook_resid_post`). `parse_site` turns a name into a `Site` and checks it against the
model; `site_names` lists every site a model has, in the order the forward pass reaches them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mechscope.errors import MechscopeError, one_of

# Per-block site kinds in the order a sequential block computes them, with their shapes.
BLOCK_KINDS: dict[str, tuple[str, ...]] = {
    "hook_resid_pre": ("batch", "pos", "d_model"),
    "attn.hook_pattern": ("batch", "n_heads", "q_pos", "k_pos"),
    "attn.hook_z": ("batch", "pos", "n_heads", "d_head"),
    "hook_attn_out": ("batch", "pos", "d_model"),
    "hook_resid_mid": ("batch", "pos", "d_model"),
    "ln2.hook_normalized": ("batch", "pos", "d_model"),
    "mlp.hook_post": ("batch", "pos", "d_mlp"),
    "hook_mlp_out": ("batch", "pos", "d_model"),
    "hook_resid_post": ("batch", "pos", "d_model"),
}
GLOBAL_KINDS: dict[str, tuple[str, ...]] = {
    "hook_embed": ("batch", "pos", "d_model"),
    "hook_pos_embed": ("batch", "pos", "d_model"),
    "ln_final.hook_normalized": ("batch", "pos", "d_model"),
}
_BLOCK_NAME = re.compile(r"blocks\.(-?\d+)\.(.+)")


@dataclass(frozen=True)
class Site:
    """One point of the computation: a kind, and the block it sits in (None for global sites)."""

    kind: str
    layer: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Dims:
    """The sizes that site shapes are written in."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    d_head: int
    has_resid_mid: bool
    has_pos_embed: bool

    def shape(self, site: Site) -> tuple[str | int, ...]:
        dims = BLOCK_KINDS.get(site.kind) or GLOBAL_KINDS[site.kind]
        return tuple(getattr(self, d, d) for d in dims)


def absent_reason(kind: str, dims: Dims) -> str | None:
    """Why a known site kind does not exist in this model, or None if it does."""
    if kind == "hook_resid_mid" and not dims.has_resid_mid:
        return (
            "this model runs attention and the MLP in parallel on the block input, so there is no "
            "residual stream between them; use hook_resid_pre, hook_attn_out or hook_mlp_out"
        )
    if kind == "hook_pos_embed" and not dims.has_pos_embed:
        return "this model has no learned position embedding (positions enter inside attention)"
    return None


def site_names(dims: Dims) -> list[str]:
    """Every site of a model, in forward order."""
    names = [k for k in ("hook_embed", "hook_pos_embed") if absent_reason(k, dims) is None]
    for layer in range(dims.n_layers):
        names += [f"blocks.{layer}.{k}" for k in BLOCK_KINDS if absent_reason(k, dims) is None]
    return names + ["ln_final.hook_normalized"]


def parse_site(name: str | Site, dims: Dims) -> Site:
    """Check a site name against a model and return its `Site`; a bad name gets a one-line error."""
    if isinstance(name, Site):
        name = name.name
    match = _BLOCK_NAME.fullmatch(name)
    if match:
        layer, kind = int(match.group(1)), match.group(2)
        if kind not in BLOCK_KINDS:
            raise MechscopeError(f"unknown site {name!r}: per-block site kinds are {one_of(BLOCK_KINDS)}")
        if not 0 <= layer < dims.n_layers:
            raise MechscopeError(f"layer {layer} out of range in site {name!r}: valid layers are 0..{dims.n_layers - 1}")
        site = Site(kind, layer)
    elif name in GLOBAL_KINDS:
        site = Site(name)
    else:
        valid = list(GLOBAL_KINDS) + [f"blocks.L.{k}" for k in BLOCK_KINDS]
        raise MechscopeError(f"unknown site {name!r}: valid sites are {one_of(valid, 20)}")
    reason = absent_reason(site.kind, dims)
    if reason:
        raise MechscopeError(f"site {name!r} does not exist in this model: {reason}")
    return site
