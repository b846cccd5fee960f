"""Steering with a dictionary's features, at the sites the dictionary writes.

`FeatureSteer` is an intervention (`mechscope.attribution.intervene` / `generate` take it beside neuron
and head interventions), at all or chosen positions:

- `add(d, i, coef)`: add coef x feature i's decoder direction at every written site;
- `clamp(d, i, value)`: set feature i's activation to `value`, keeping the reconstruction error, so that
  only that feature changes: x ← x + (value − f_i(x)) · W_dec,i;
- `ablate(d, i)`: clamp to 0.

Clamping needs f_i, so it reads the sites the dictionary reads (an SAE reads the site it writes; a
transcoder's read site comes before its write site in the forward pass; a cross-layer transcoder's
feature of layer l reads that layer's `hook_resid_mid` before it writes the MLP outputs of l and later).
A crosscoder writes its first layer before it has read its last, so its features can be added but not
clamped. A feature is written only where it writes: every site for a crosscoder, layers l.. for a CLT.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.attribution.interventions import Steering, check_positions, positional
from mechscope.dictionaries.dictionary import Dictionary
from mechscope.dictionaries.formats.own import check_model
from mechscope.errors import MechscopeError

OPS = ("add", "clamp", "ablate")


def _positions(positions) -> tuple[int, ...] | None:
    if positions is None:
        return None
    return (int(positions),) if isinstance(positions, int) else tuple(int(p) for p in positions)


@dataclass(frozen=True, eq=False)
class FeatureSteer(Steering):
    """Steer feature `feature` of `dictionary`: `op` is add, clamp or ablate (see the module docstring)."""

    dictionary: Dictionary
    feature: int
    op: str
    value: float = 0.0
    positions: tuple[int, ...] | None = None
    name: str = "dictionary"
    """How the dictionary is named in descriptions (its folder, say)."""

    @classmethod
    def add(cls, dictionary: Dictionary, feature: int, coefficient: float, positions=None, name="dictionary") -> FeatureSteer:
        return cls(dictionary, feature, "add", float(coefficient), _positions(positions), name)

    @classmethod
    def clamp(cls, dictionary: Dictionary, feature: int, value: float, positions=None, name="dictionary") -> FeatureSteer:
        return cls(dictionary, feature, "clamp", float(value), _positions(positions), name)

    @classmethod
    def ablate(cls, dictionary: Dictionary, feature: int, positions=None, name="dictionary") -> FeatureSteer:
        return cls(dictionary, feature, "ablate", 0.0, _positions(positions), name)

    def __str__(self) -> str:
        what = {"add": f"add {self.value:g} x feature", "clamp": "clamp feature", "ablate": "ablate feature"}[self.op]
        text = f"{what} {self.name}:{self.feature}" + (f" to {self.value:g}" if self.op == "clamp" else "")
        return text + ("" if self.positions is None else f" at positions {list(self.positions)}")

    def resolved(self, model, n_prompt: int | None) -> FeatureSteer:
        if self.op not in OPS:
            raise MechscopeError(f"unknown feature steering {self.op!r}: valid ones are add, clamp, ablate")
        n = self.dictionary.d_sae
        if isinstance(self.feature, bool) or not isinstance(self.feature, int) or not 0 <= self.feature < n:
            raise MechscopeError(f"feature {self.feature!r} out of range: {self.name} has features 0..{n - 1}")
        check_model(self.dictionary, model)
        cfg = self.dictionary.cfg
        if self.op != "add" and cfg.reconstructs and len(cfg.read_sites) > 1:
            raise MechscopeError(
                f"cannot {self.op} a crosscoder feature: it writes its first layer before it reads its last; add it instead"
            )
        return dataclasses.replace(self, positions=check_positions(self.positions, n_prompt))

    def _direction(self) -> Tensor:
        """[W, d_out] the feature's decoder direction in raw units, at each written site."""
        d = self.dictionary
        with torch.no_grad():
            return (d.W_dec[self.feature] / d.output_scale).reshape(d.n_write, d.cfg.d_out)

    def site_edits(self, model) -> dict:
        cfg = self.dictionary.cfg
        direction = self._direction()
        written = self.dictionary.written_sites(self.feature)
        if self.op == "add":
            return {cfg.write_sites[i]: positional(_adder(self.value * direction[i])) for i in written}
        reads: dict[str, Tensor] = {}
        edits = {s: _recorder(reads, s) for s in cfg.read_sites if s not in cfg.write_sites}
        for i in written:
            edits[cfg.write_sites[i]] = positional(_clamper(self, reads, cfg.write_sites[i], direction[i]))
        return edits


def _adder(delta: Tensor):
    return lambda x: x + delta.to(x.device, x.dtype)


def _recorder(reads: dict, site: str):
    def record(x: Tensor) -> Tensor:
        reads[site] = x
        return x

    return record


def _clamper(steer: FeatureSteer, reads: dict, site: str, direction: Tensor):
    d, cfg = steer.dictionary, steer.dictionary.cfg

    def clamp(x: Tensor) -> Tensor:
        if cfg.layered:  # a CLT feature reads its own layer's site, recorded in this pass; the others do not matter
            own = cfg.read_sites[int(d.latent_site(torch.tensor(steer.feature)))]
            inputs = [reads[s] if s == own else torch.zeros_like(x) for s in cfg.read_sites]
        else:
            inputs = [x if s == site else reads[s] for s in cfg.read_sites]
        stacked = torch.stack(inputs, dim=-2) if len(inputs) > 1 else inputs[0]
        with torch.no_grad():
            f = d.encode_dense(stacked.float())[..., steer.feature]  # [batch, pos]
        return x + ((steer.value - f)[..., None] * direction.to(x.device)).to(x.dtype)

    return clamp
