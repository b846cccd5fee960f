"""Which units an index holds, and their names.

An index reads a list of sites; each dimension of each site is one unit, numbered globally in site
order. A neuron (a dimension of `blocks.L.mlp.hook_post`) is named `L:N`, as everywhere in mechscope;
any other unit is `SITE:I` (e.g. `blocks.5.hook_resid_post:17`, or `blocks.3.attn.hook_z:130` for
head 2, dimension 2 when d_head is 64).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mechscope.errors import MechscopeError, one_of
from mechscope.models.sites import Site

_NEURON = re.compile(r"(\d+):(\d+)")
NOT_PER_TOKEN = ("attn.hook_pattern",)


@dataclass(frozen=True)
class IndexedSite:
    """One site read by an index: its units are first_unit .. first_unit + width - 1."""

    site: str
    layer: int | None
    first_unit: int
    width: int

    @property
    def is_neurons(self) -> bool:
        return self.site.endswith(".mlp.hook_post")


def default_sites(model) -> list[str]:
    """Every MLP neuron of every layer."""
    return [f"blocks.{layer}.mlp.hook_post" for layer in range(model.dims.n_layers)]


def plan_sites(model, sites: Sequence[str] | None) -> list[IndexedSite]:
    """Check the sites against the model and number their units; one-line errors for bad ones."""
    names = list(sites) if sites else default_sites(model)
    out, first = [], 0
    for name in names:
        site: Site = model.site(name)
        if site.kind in NOT_PER_TOKEN:
            raise MechscopeError(f"site {name!r} is not one value per token: index a per-token site, e.g. blocks.L.mlp.hook_post")
        if any(s.site == site.name for s in out):
            raise MechscopeError(f"site {name!r} is given twice")
        width = math.prod(d for d in model.shape(site)[2:])
        out.append(IndexedSite(site.name, site.layer, first, width))
        first += width
    return out


def unit_name(site: IndexedSite, index: int) -> str:
    return f"{site.layer}:{index}" if site.is_neurons else f"{site.site}:{index}"


def unit_names(sites: Sequence[IndexedSite]) -> list[tuple[str, int | None, int]]:
    """(site, layer, index within the site) for every unit, in unit order."""
    return [(s.site, s.layer, i) for s in sites for i in range(s.width)]


def parse_unit_id(text: str | int, sites: Sequence[IndexedSite]) -> int:
    """The global unit number of `L:N` or `SITE:I` in an index over `sites` (one-line error if absent)."""
    if isinstance(text, int):
        total = sum(s.width for s in sites)
        if not 0 <= text < total:
            raise MechscopeError(f"unit number {text} out of range: this index has units 0..{total - 1}")
        return text
    text = text.strip()
    if match := _NEURON.fullmatch(text):
        site_name, index = f"blocks.{match.group(1)}.mlp.hook_post", int(match.group(2))
    elif ":" in text and text.rsplit(":", 1)[1].isdigit():
        site_name, index = text.rsplit(":", 1)[0], int(text.rsplit(":", 1)[1])
    else:
        raise MechscopeError(f"bad unit {text!r}: write a neuron as LAYER:NEURON (e.g. 12:345) or another unit as SITE:INDEX")
    for site in sites:
        if site.site == site_name:
            if not 0 <= index < site.width:
                raise MechscopeError(f"unit {text!r} out of range: {site_name} has units 0..{site.width - 1}")
            return site.first_unit + index
    indexed = [s.site for s in sites]
    raise MechscopeError(f"unit {text!r} is not in this index: it holds the sites {one_of(indexed, 6)}")
