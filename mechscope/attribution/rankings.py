"""Rankings: which neurons and heads matter for one prediction, by three methods, and how well the cheap ones agree.

The metric is log p(target) at `position`: the log-probability of the target's first token. Every
unit (neuron `L:N`, head `L.H`) is scored by three methods, all in one sign convention, the unit's
*contribution*: positive means the unit raises the metric, i.e. removing it would lower it.

Phases:
1. Direct logit attribution (`direct_logit_attribution`): each unit's direct contribution to the
   target's *logit* (not its log-probability: DLA is linear only in the logit), through the
   residual stream alone, with the final norm frozen.
2. Attribution patching: one forward and one backward give the gradient of log p(target) with
   respect to every `mlp.hook_post` and `attn.hook_z`. A unit's score is grad . (activation -
   baseline), summed over positions (and d_head for heads): the first-order estimate of
   log p(clean) - log p(unit ablated at every position). The baseline is zero (`baseline="zero"`)
   or the unit's mean over the prompt's positions (`baseline="mean"`, as `Intervention.mean_ablate`).
3. Real effect: log p(clean) - log p(ablated), with each candidate unit set to its baseline at every
   position. Candidates are the union of the `top` units by |DLA| and the `top` by |attribution|.
   The ablated runs are batched: B copies of the prompt in one forward, each batch element ablating a
   different unit, through one write per site that indexes the batch dimension (`batch_size` bounds B).
   The prompt is cut after `position` for these runs: in a causal model later tokens cannot change it.
4. Agreement: Spearman rank correlation of each pair of the three (signed) scores over the candidates.

Precision: every forward (and the backward) runs in the model's dtype and stops at the final norm's
output, which is unembedded in the wide dtype (float32 for a 16-bit model, `models.precision`);
log p(target) and every score are float64, so the ablation effects of a float16 or bfloat16 model
are not rounded to its logits' precision.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mechscope.attribution.units import Unit
from mechscope.errors import MechscopeError, one_of
from mechscope.lens.predict import check_position, one_sequence, single_token, split_inputs
from mechscope.models import Inputs, Model
from mechscope.models.precision import wide_unembed

BASELINES: tuple[str, ...] = ("zero", "mean")
METHODS: tuple[str, ...] = ("dla", "attribution", "real_effect")
_KIND_SITE = {"neuron": "mlp.hook_post", "head": "attn.hook_z"}
_FINAL = "ln_final.hook_normalized"


class RankedUnit(NamedTuple):
    """One candidate unit and its three scores (all: positive = the unit raises the target)."""

    unit: str
    """`L:N` for a neuron, `L.H` for a head."""
    kind: str
    """`neuron` or `head`."""
    dla: float
    """Direct contribution to the target's logit."""
    attribution: float
    """grad . (activation - baseline): first-order estimate of `real_effect`."""
    real_effect: float
    """log p(target) - log p(target with the unit ablated at every position)."""


class Rankings(NamedTuple):
    target: str | int
    position: int
    baseline: str
    """`zero` or `mean` (the unit's mean over the prompt's positions)."""
    logprob: float
    """log p(target's first token) at `position`, unablated."""
    rows: list[RankedUnit]
    """The candidates, largest |real effect| first."""
    spearman: dict[tuple[str, str], float]
    """Spearman rank correlation over the candidates of each pair of `METHODS` (nan if a score is constant)."""
    dla_heads: Tensor
    """[n_layers, n_heads] DLA of every head."""
    dla_neurons: Tensor
    """[n_layers, d_mlp] DLA of every neuron."""
    attribution_heads: Tensor
    """[n_layers, n_heads] attribution score of every head (float64)."""
    attribution_neurons: Tensor
    """[n_layers, d_mlp] attribution score of every neuron (float64)."""

    def ranks(self, method: str) -> dict[str, int]:
        """Each candidate's rank (1 = largest |score|) under `method`, one of `METHODS`."""
        if method not in METHODS:
            raise MechscopeError(f"unknown method {method!r}: valid methods are {one_of(METHODS)}")
        order = sorted(self.rows, key=lambda r: -abs(getattr(r, method)))
        return {r.unit: i + 1 for i, r in enumerate(order)}


# -- helpers ------------------------------------------------------------------------------------------


def _sites(model: Model) -> list[str]:
    return [f"blocks.{layer}.{_KIND_SITE[kind]}" for layer in range(model.dims.n_layers) for kind in ("neuron", "head")]


def _logprob(logits: Tensor, t: int) -> Tensor:
    """log p(t) from logits [batch, d_vocab], in float64."""
    return logits.double().log_softmax(-1)[:, t]


def _top_units(neurons: Tensor, heads: Tensor, n: int) -> list[Unit]:
    """The n units with the largest |score|, neurons and heads together."""
    scores = torch.cat([neurons.flatten(), heads.flatten()]).abs()
    units = []
    for i in scores.topk(min(n, scores.numel())).indices.tolist():
        if i < neurons.numel():
            units.append(Unit("neuron", i // neurons.shape[1], i % neurons.shape[1]))
        else:
            i -= neurons.numel()
            units.append(Unit("head", i // heads.shape[1], i % heads.shape[1]))
    return units


def _ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of x (ties get their average rank)."""
    order = x.argsort()
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    ranks[order] = average[inverse]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two equal-length vectors (nan if either is constant or they have < 2 values)."""
    a, b = a.double().flatten(), b.double().flatten()
    if a.numel() != b.numel():
        raise MechscopeError(f"cannot correlate {a.numel()} values with {b.numel()}: give vectors of the same length")
    if a.numel() < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


# -- phase 2: attribution patching --------------------------------------------------------------------


def _attribution(model: Model, unembed, ids: Tensor, pos: int, t: int, baseline: str):
    """(log p, baselines by site, neuron scores [n_layers, d_mlp], head scores [n_layers, n_heads])."""
    names = _sites(model)

    # The parameters are frozen, so the graph starts at the embeddings: make them a leaf that needs grad.
    def track(x: Tensor) -> Tensor:
        return x.detach().requires_grad_(True)

    out = model.run(ids, read=[*names, _FINAL], write={"hook_embed": track}, logits=False, grad=True)
    value = _logprob(unembed(out.cache[_FINAL][:, pos]), t)[0]
    grads = torch.autograd.grad(value, [out.cache[n] for n in names])
    d = model.dims
    neurons, heads = (
        torch.zeros(d.n_layers, d.d_mlp, dtype=torch.float64),
        torch.zeros(d.n_layers, d.n_heads, dtype=torch.float64),
    )
    bases: dict[str, Tensor] = {}
    for name, grad in zip(names, grads, strict=True):
        act = out.cache[name].detach()[0].double()  # [pos, d_mlp] or [pos, n_heads, d_head]
        base = act.mean(0) if baseline == "mean" else torch.zeros_like(act[0])  # [d_mlp] or [n_heads, d_head]
        bases[name] = base.to(model.hf.dtype)
        # the baseline as the ablation will write it, in the model's dtype
        score = (grad[0].double() * (act - bases[name].double())).sum(0)  # [d_mlp] or [n_heads, d_head]
        layer = int(name.split(".")[1])
        if name.endswith("attn.hook_z"):
            heads[layer] = score.sum(-1).cpu()
        else:
            neurons[layer] = score.cpu()
    return float(value.detach()), bases, neurons, heads


# -- phase 3: real effect -----------------------------------------------------------------------------


def _ablate(rows: Tensor, index: Tensor, values: Tensor):
    """A write setting, in batch element rows[i], unit index[i] to values[i] at every position."""

    def write(x: Tensor) -> Tensor:
        x = x.clone()
        # neurons: x [batch, pos, d_mlp], x[rows, :, index] is [k, pos], values [k]
        # heads: x [batch, pos, n_heads, d_head], x[rows, :, index] is [k, pos, d_head], values [k, d_head]
        x[rows, :, index] = values.unsqueeze(1).to(x.dtype)
        return x

    return write


def _final_logprob(model: Model, unembed, ids: Tensor, t: int, write=None) -> Tensor:
    """log p(t) [batch] (float64) at the last position of `ids` [batch, pos], one forward with `write` applied."""
    with torch.inference_mode():
        final = model.run(ids, read=[_FINAL], write=write, logits=False).cache[_FINAL][:, -1]
        return _logprob(unembed(final), t).cpu()


def _ablated_logprobs(model: Model, unembed, ids: Tensor, t: int, units: list[Unit], bases: dict[str, Tensor]) -> Tensor:
    """log p(t) at the last position of `ids`, one batch element per unit, that unit ablated at every position."""
    by_site: dict[str, list[tuple[int, int]]] = {}
    for i, unit in enumerate(units):
        by_site.setdefault(unit.site.name, []).append((i, unit.index))
    write = {}
    for name, items in by_site.items():
        rows = torch.tensor([i for i, _ in items], device=model.device)
        index = torch.tensor([u for _, u in items], device=model.device)
        write[name] = _ablate(rows, index, bases[name].to(model.device)[index])
    return _final_logprob(model, unembed, ids.expand(len(units), -1), t, write)


# -- the whole thing ----------------------------------------------------------------------------------


def rank_units(
    model: Model,
    text: Inputs,
    target: str | int,
    top: int = 20,
    baseline: str = "zero",
    position: int = -1,
    batch_size: int = 64,
) -> Rankings | list[Rankings]:
    """Score every neuron and head for log p(target) at `position` by DLA and attribution patching, and
    ablate the top candidates of each for real.

    Scores are contributions (positive = the unit raises the target): `dla` on the logit,
    `attribution` and `real_effect` on log p(target) = log p(clean) - log p(unit ablated everywhere).

    >>> r = mechscope.rank_units(model, "The reliability of Wikipedia is very", " questionable", top=8)
    >>> r.rows[0]                              # RankedUnit(unit='29:1085', kind='neuron', ...)
    >>> r.spearman["attribution", "real_effect"]

    A list of texts (of any lengths) gives one `Rankings` per text, each ranked on its own.
    """
    from mechscope.attribution.dla import direct_logit_attribution

    items, single = split_inputs(text)
    if not single:
        return [rank_units(model, item, target, top, baseline, position, batch_size) for item in items]

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise MechscopeError(f"top={top!r} is invalid: it must be an integer of at least 1")
    if baseline not in BASELINES:
        raise MechscopeError(f"unknown baseline {baseline!r}: valid baselines are {one_of(BASELINES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MechscopeError(f"batch_size={batch_size!r} is invalid: it must be an integer of at least 1")
    ids = one_sequence(model, text)
    pos = check_position(position, ids.shape[1])
    t = single_token(model, target, text)

    # phase 1: direct logit attribution (of the logit)
    dla = direct_logit_attribution(model, ids, t, position=pos)
    # phase 2: attribution patching (of the log-probability)
    unembed = wide_unembed(model)  # final-norm outputs -> logits, in float32 or wider
    logprob, bases, attr_neurons, attr_heads = _attribution(model, unembed, ids, pos, t, baseline)

    # phase 3: the real effect of ablating each candidate, batch_size units per forward
    candidates = list(dict.fromkeys(_top_units(dla.neurons, dla.heads, top) + _top_units(attr_neurons, attr_heads, top)))
    prefix = ids[:, : pos + 1]
    clean = float(_final_logprob(model, unembed, prefix, t)[0])
    chunks = [candidates[i : i + batch_size] for i in range(0, len(candidates), batch_size)]
    ablated = torch.cat([_ablated_logprobs(model, unembed, prefix, t, chunk, bases) for chunk in chunks])
    real = clean - ablated

    def score(grid_neurons: Tensor, grid_heads: Tensor, unit: Unit) -> float:
        grid = grid_neurons if unit.kind == "neuron" else grid_heads
        return float(grid[unit.layer, unit.index])

    rows = [
        RankedUnit(str(u), u.kind, score(dla.neurons, dla.heads, u), score(attr_neurons, attr_heads, u), float(real[i]))
        for i, u in enumerate(candidates)
    ]
    rows.sort(key=lambda r: -abs(r.real_effect))
    columns = {m: torch.tensor([getattr(r, m) for r in rows], dtype=torch.float64) for m in METHODS}
    pairs = [(a, b) for i, a in enumerate(METHODS) for b in METHODS[i + 1 :]]
    correlations = {(a, b): spearman(columns[a], columns[b]) for a, b in pairs}
    return Rankings(target, pos, baseline, logprob, rows, correlations, dla.heads, dla.neurons, attr_heads, attr_neurons)


def rankings_table(r: Rankings):
    """A rich Table of the candidates: each method's score and the unit's rank under it (#1 = largest |score|)."""
    from rich.table import Table
    from rich.text import Text

    ranks = {m: r.ranks(m) for m in METHODS}
    corr = " · ".join(f"{a} ~ {b} {v:+.3f}" for (a, b), v in r.spearman.items())
    table = Table(
        title=Text(f"units ranked for log p({r.target!r}) at position {r.position} ({r.baseline} ablation)"),
        title_justify="left",
        caption=f"Spearman over {len(r.rows)} candidates: {corr}. DLA explains the logit; positive = the unit raises the target.",
        caption_justify="left",
    )
    table.add_column("unit")
    table.add_column("kind")
    for header in ("DLA (logit)", "attribution", "real effect"):
        table.add_column(header, justify="right")
    for row in r.rows:
        cells = [f"{getattr(row, m):+.4f} #{ranks[m][row.unit]}" for m in METHODS]
        table.add_row(row.unit, row.kind, *cells)
    return table
