"""Interventions: change neurons, heads or directions during the forward pass and see what changes.

An `Intervention` describes one change, built with its constructors:

- on units (neurons `L:N`, heads `L.H`, see `units.py`): `Intervention.set(units, value)`,
  `.scale(units, factor)`, `.add(units, value)`, `.zero(units)` and `.mean_ablate(units, reference)`.
  A head's value is its whole `d_head` output vector, so setting or adding a number changes every
  component of it, and a head's mean is a vector.
- on a direction at any site (except `attn.hook_pattern`): `.add_direction(site, d, alpha)` writes
  `x + alpha * d` (d as given, not normalised), and `.set_projection(site, d, value)` sets the
  component of `x` along the unit vector `d / |d|` to `value`, leaving the orthogonal part alone.

Every constructor takes `positions`: None (the default) changes every position, including the
tokens that `generate` adds; a list of prompt positions (negative ones count from the end of the
prompt) changes only those, and never a generated token.

Mean ablation replaces a unit by its mean activation over a reference: by default the mean over
all positions of the prompt itself, in a clean run; or the mean over every position of the text (or
texts, which may differ in length) given as `reference`. `resolve` computes it; the resolved
intervention carries it in `means` (one number per neuron, one `d_head` vector per head).

`writes` turns a list of interventions into the `write` dict of `Model.run` / `Model.hooks`, with
one function per site that applies every intervention on that site in list order. `effects.py`
compares what the model does before and after.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from mechscope.attribution.units import Unit, parse_assignment, parse_units
from mechscope.errors import MechscopeError, one_of
from mechscope.lens.predict import check_position, split_inputs
from mechscope.models import Edit, Inputs, Model
from mechscope.models.precision import widen
from mechscope.models.sites import Site

UNIT_OPS = ("set", "scale", "add", "zero", "mean")
DIRECTION_OPS = ("add_direction", "set_projection")
UnitSpec = str | Unit | Iterable[str | Unit]


def _floats(value) -> float | tuple[float, ...]:
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, int | float):
        return float(value)
    return tuple(float(v) for v in value)


def _units(units: UnitSpec) -> tuple[str | Unit, ...]:
    if isinstance(units, str | Unit):
        return (units,)
    return tuple(units)


def _positions(positions: int | Iterable[int] | None) -> tuple[int, ...] | None:
    if positions is None:
        return None
    if isinstance(positions, int):
        return (positions,)
    return tuple(int(p) for p in positions)


@dataclass(frozen=True, eq=False)
class Intervention:
    """One change to the forward pass. Build it with a constructor (`Intervention.zero("12:345")`, ...)."""

    op: str
    """One of `set`, `scale`, `add`, `zero`, `mean` (units) or `add_direction`, `set_projection` (a direction)."""
    units: tuple[str | Unit, ...] = ()
    """Neurons and heads (unit ops); strings are checked against the model by `resolve`."""
    value: float | tuple[float, ...] = 0.0
    """The value set or added, the scale factor, the direction's `alpha` or the projection's value;
    for unit ops, either one number for every unit or one per unit."""
    site: str | None = None
    """The site of a direction op."""
    direction: Tensor | None = None
    """The direction of a direction op, shaped like one position of the site (or flattened)."""
    positions: tuple[int, ...] | None = None
    """Prompt positions to change; None changes every position, generated ones included."""
    reference: Inputs | None = None
    """Mean ablation: what the mean is taken over (None: the prompt itself)."""
    means: tuple[Tensor, ...] | None = None
    """Mean ablation, once resolved: each unit's mean (a 0-d tensor per neuron, a [d_head] vector per head)."""

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def set(cls, units: UnitSpec, value, positions=None) -> Intervention:
        """Set each unit to `value` (one number, or one per unit)."""
        return cls("set", _units(units), _floats(value), positions=_positions(positions))

    @classmethod
    def scale(cls, units: UnitSpec, factor, positions=None) -> Intervention:
        """Multiply each unit by `factor` (one number, or one per unit)."""
        return cls("scale", _units(units), _floats(factor), positions=_positions(positions))

    @classmethod
    def add(cls, units: UnitSpec, value, positions=None) -> Intervention:
        """Add `value` (one number, or one per unit) to each unit."""
        return cls("add", _units(units), _floats(value), positions=_positions(positions))

    @classmethod
    def zero(cls, units: UnitSpec, positions=None) -> Intervention:
        """Zero-ablate each unit."""
        return cls("zero", _units(units), 0.0, positions=_positions(positions))

    @classmethod
    def mean_ablate(cls, units: UnitSpec, reference: Inputs | None = None, positions=None) -> Intervention:
        """Replace each unit by its mean over every position of `reference` (default: of the prompt itself)."""
        return cls("mean", _units(units), 0.0, positions=_positions(positions), reference=reference)

    @classmethod
    def add_direction(cls, site: str | Site, direction: Tensor, alpha: float = 1.0, positions=None) -> Intervention:
        """Write `x + alpha * direction` at `site`."""
        return cls("add_direction", value=float(alpha), site=str(site), direction=torch.as_tensor(direction),
                   positions=_positions(positions))  # fmt: skip

    @classmethod
    def set_projection(cls, site: str | Site, direction: Tensor, value: float = 0.0, positions=None) -> Intervention:
        """Set the component of the site's value along `direction / |direction|` to `value` (0 projects it out)."""
        return cls("set_projection", value=float(value), site=str(site), direction=torch.as_tensor(direction),
                   positions=_positions(positions))  # fmt: skip

    # -- description -------------------------------------------------------------------------------

    def __str__(self) -> str:
        units = ",".join(str(u) for u in self.units)
        value = self.value if isinstance(self.value, float) else list(self.value)
        text = {
            "set": f"set {units} = {value}",
            "scale": f"scale {units} x {value}",
            "add": f"add {value} to {units}",
            "zero": f"zero-ablate {units}",
            "mean": f"mean-ablate {units} (mean over {'the prompt' if self.reference is None else 'the reference'})",
            "add_direction": f"add {value} * direction at {self.site}",
            "set_projection": f"set projection on direction at {self.site} to {value}",
        }.get(self.op, self.op)
        return text + ("" if self.positions is None else f" at positions {list(self.positions)}")


class Steering:
    """Base of interventions defined outside this module (a dictionary feature's steering, for one).

    A subclass has `positions` (None, or prompt positions as for `Intervention`), checks itself against
    the model and the prompt in `resolved`, and says in `site_edits` what to do at which sites: one
    out-of-place function per site, flagged `positional` where it applies only at `positions` (an
    edit that only records a value for a later site applies at every position).
    """

    positions: tuple[int, ...] | None = None

    def resolved(self, model: Model, n_prompt: int | None) -> Steering:
        raise NotImplementedError

    def site_edits(self, model: Model) -> dict[str, Edit]:
        raise NotImplementedError


def positional(edit: Edit) -> Edit:
    """Mark a steering edit as applying only at the steering's positions."""
    edit.positional = True
    return edit


class SiteEdit(NamedTuple):
    """One steering edit at one site, and the prompt positions it applies at (None: all)."""

    edit: Edit
    positions: tuple[int, ...] | None


def check_positions(positions: tuple[int, ...] | None, n_prompt: int | None) -> tuple[int, ...] | None:
    """Positions made absolute against a prompt of `n_prompt` tokens (one-line error when out of range)."""
    if positions is None:
        return None
    if n_prompt is None:
        if any(p < 0 for p in positions):
            raise MechscopeError(f"negative positions {list(positions)} need the prompt: pass ids to resolve()")
        return positions
    return tuple(sorted({check_position(p, n_prompt) for p in positions}))


def _check_positions(iv: Intervention, n_prompt: int | None) -> tuple[int, ...] | None:
    return check_positions(iv.positions, n_prompt)


def _values(iv: Intervention, n: int) -> tuple[float, ...]:
    if isinstance(iv.value, float):
        return (iv.value,) * n
    if len(iv.value) != n:
        raise MechscopeError(f"{len(iv.value)} values for {n} units in '{iv}': give one value, or one per unit")
    return iv.value


def unit_means(model: Model, units: Sequence[Unit], reference: Inputs) -> list[Tensor]:
    """Each unit's mean activation over every position of `reference`: a text, token ids, or a list of texts (or of
    id sequences) of any lengths, run as one padded batch whose padding is left out of the mean."""
    items, _ = split_inputs(reference)
    tokens = model.encode(items)
    sites = sorted({u.site.name for u in units})
    cache = model.run(tokens.ids, attention_mask=tokens.mask, read=sites).cache
    sums = {name: cache[name][tokens.mask].double().sum(0) for name in sites}  # padding is zero in the cache
    count = int(tokens.mask.sum())
    return [(sums[u.site.name][u.index] / count).to(model.hf.dtype) for u in units]


def resolve(model: Model, interventions: Intervention | Iterable[Intervention], ids: Tensor | None = None) -> list[Intervention]:
    """Check every intervention against the model and the prompt `ids` ([1, pos]), parse its units, and
    compute the means of mean ablations. One-line error on the first bad one."""
    if isinstance(interventions, Intervention | Steering):
        interventions = [interventions]
    n_prompt = None if ids is None else ids.shape[-1]
    resolved = []
    for iv in interventions:
        if isinstance(iv, Steering):
            resolved.append(iv.resolved(model, n_prompt))
            continue
        if not isinstance(iv, Intervention):
            raise MechscopeError(f"not an intervention: {iv!r}; build one with Intervention.set / scale / add / zero / ...")
        positions = _check_positions(iv, n_prompt)
        if iv.op in UNIT_OPS:
            units = tuple(parse_units(iv.units, model))
            _values(iv, len(units))
            means = iv.means
            if iv.op == "mean" and means is None:
                reference = iv.reference if iv.reference is not None else ids
                if reference is None:
                    raise MechscopeError(f"'{iv}' needs a reference: pass the prompt ids to resolve() or give reference=")
                means = tuple(unit_means(model, units, reference))
            resolved.append(dataclasses.replace(iv, units=units, positions=positions, means=means))
        elif iv.op in DIRECTION_OPS:
            site = model.site(iv.site)
            if site.kind == "attn.hook_pattern":
                raise MechscopeError(f"cannot steer a direction at {site}: use any site but attn.hook_pattern")
            shape = tuple(int(s) for s in model.shape(site)[2:])
            numel = int(torch.Size(shape).numel())
            direction = iv.direction
            if direction.numel() != numel:
                raise MechscopeError(
                    f"direction of shape {list(direction.shape)} does not fit site {site}: "
                    f"give {numel} numbers, shaped {list(shape)}"
                )
            direction = direction.reshape(shape).to(model.device, model.hf.dtype)
            if iv.op == "set_projection" and float(direction.norm()) == 0:
                raise MechscopeError(f"zero direction in '{iv}': give a direction with a non-zero norm")
            resolved.append(dataclasses.replace(iv, site=site.name, direction=direction, positions=positions))
        else:
            raise MechscopeError(f"unknown intervention {iv.op!r}: valid ones are {one_of(UNIT_OPS + DIRECTION_OPS)}")
    return resolved


# -- the write functions ---------------------------------------------------------------------------


def _unit_edit(iv: Intervention, new: Tensor) -> None:
    """Apply a unit intervention in place to `new` ([batch, pos, d_mlp] or [batch, pos, n_heads, d_head])."""
    values = _values(iv, len(iv.units))
    for i, unit in enumerate(iv.units):
        part = new[:, :, unit.index]  # a view: [batch, pos] for a neuron, [batch, pos, d_head] for a head
        if iv.op == "set":
            part.fill_(values[i])
        elif iv.op == "scale":
            part.mul_(values[i])
        elif iv.op == "add":
            part.add_(values[i])
        elif iv.op == "zero":
            part.zero_()
        else:  # mean
            part.copy_(iv.means[i].to(part.dtype).expand_as(part))


def _direction_edit(iv: Intervention, new: Tensor) -> None:
    d = iv.direction.to(new.device, new.dtype)
    if iv.op == "add_direction":
        new.add_(iv.value * d)
        return
    u = widen(d) / widen(d).norm()  # the projection sums over the site's width: in float32 or wider
    trailing = tuple(range(2, new.ndim))
    coeff = (widen(new) * u).sum(dim=trailing, keepdim=True)
    new.add_(((iv.value - coeff) * u).to(new.dtype))


class _SiteEdit:
    """The one write function of a site: every intervention on it, in order, at its positions.

    Positions are absolute. A pass of more than one token starts at position 0 (a full forward pass);
    a one-token pass right after another continues it (a generation step with a KV cache)."""

    def __init__(self, interventions: list[Intervention]):
        self.interventions = interventions
        self.seen = 0

    def __call__(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        start = self.seen if (n == 1 and self.seen > 0) else 0
        self.seen = start + n
        out = x
        for iv in self.interventions:
            if iv.positions is None:
                mask = None
            else:
                inside = [p - start for p in iv.positions if start <= p < start + n]
                mask = torch.tensor(inside, dtype=torch.long, device=x.device)
                if not len(mask):
                    continue
            if isinstance(iv, SiteEdit):
                new = iv.edit(out)
            else:
                new = out.clone()
                _unit_edit(iv, new) if iv.op in UNIT_OPS else _direction_edit(iv, new)
            if mask is None:
                out = new
            else:
                out = out.clone()
                out[:, mask] = new[:, mask]
        return out


def writes(model: Model, interventions: Iterable[Intervention], ids: Tensor | None = None) -> dict[str, Edit]:
    """The `write` dict for `model.run` / `model.hooks` applying `interventions` (one function per site).

    `ids` is the prompt ([1, pos]): it resolves negative positions and is the default reference of
    mean ablations. Build a fresh dict for each prompt.

    >>> out = model.run(text, write=writes(model, [Intervention.zero("12:345")]))
    """
    by_site: dict[str, list[Intervention | SiteEdit]] = defaultdict(list)
    for iv in resolve(model, interventions, ids):
        if isinstance(iv, Steering):
            for site, edit in iv.site_edits(model).items():
                by_site[model.site(site).name].append(
                    SiteEdit(edit, iv.positions if getattr(edit, "positional", False) else None)
                )
        elif iv.op in UNIT_OPS:
            groups: dict[str, list[Unit]] = defaultdict(list)
            for unit in iv.units:
                groups[unit.site.name].append(unit)
            for name, units in groups.items():
                keep = [i for i, u in enumerate(iv.units) if u.site.name == name]
                values = iv.value if isinstance(iv.value, float) else tuple(iv.value[i] for i in keep)
                means = None if iv.means is None else tuple(iv.means[i] for i in keep)
                by_site[name].append(dataclasses.replace(iv, units=tuple(units), value=values, means=means))
        else:
            by_site[iv.site].append(iv)
    return {name: _SiteEdit(ivs) for name, ivs in by_site.items()}


def from_options(
    model: Model,
    set: Iterable[str] = (),
    scale: Iterable[str] = (),
    add: Iterable[str] = (),
    ablate: Iterable[str] = (),
    mean_ablate: Iterable[str] = (),
    positions: Sequence[int] | None = None,
) -> list[Intervention]:
    """Interventions from command-line style strings: `set=["12:345=3.5"]`, `scale=["5.3=0"]`,
    `add=["12:345=1"]`, `ablate=["12:345", "5.3"]` (zero), `mean_ablate=[...]` (mean over the prompt)."""
    out: list[Intervention] = []
    for op, items in (("set", set), ("scale", scale), ("add", add)):
        for item in items:
            unit, value = parse_assignment(item, model)
            out.append(getattr(Intervention, op)(unit, value, positions))
    out += [Intervention.zero(parse_units(item, model), positions) for item in ablate]
    out += [Intervention.mean_ablate(parse_units(item, model), positions=positions) for item in mean_ablate]
    if not out:
        raise MechscopeError("no intervention given: use --set L:N=V, --scale L:N=F, --ablate L:N (L.H for a head)")
    return out
