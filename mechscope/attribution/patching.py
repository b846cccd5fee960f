"""Activation patching and attribution patching: which activations carry the difference between two prompts.

A clean prompt ("The capital of France is") and a corrupted one of the same length ("The capital of
Italy is") give different values of a metric on the next token: the logit difference between a
target and a `vs` token (" Paris" - " Rome"), or the target's probability. Patching asks which
activations of the clean run, put into the corrupted run, bring the metric back. It follows the
*denoising* form of activation patching (Meng et al. 2022, "causal tracing"; Heimersheim & Nanda 2024,
"How to use and interpret activation patching") and attribution patching (Nanda 2023; Syed et al.
2023, "Attribution Patching Outperforms Automated Circuit Discovery").

Phases:
1. Setup: both prompts are tokenised and checked to have equal lengths; the target and `vs` are
   turned into token ids; one clean forward reads every activation to be patched, one corrupted
   forward gives the corrupted metric. Results are reported raw (the metric of each patched run) and
   normalised, (patched - corrupted) / (clean - corrupted): 0 is no effect, 1 restores the clean run.
   Every forward runs in the model's dtype and stops at the final norm's output; the metric unembeds
   it in the wide dtype (float32 for a 16-bit model, `models.precision`) and computes in float64, so
   a 16-bit model's metric is not rounded to its logits' precision (bfloat16: 0.125 at a logit of 20).
2. Activation patching: for each site kind (`hook_resid_pre`, `hook_attn_out`, `hook_mlp_out` per
   layer x position; `attn.hook_z` per layer x head, all positions at once), the corrupted run with
   one clean activation patched in. The patched runs are batched: B copies of the corrupted ids run
   as one batch, and one write per site sets, in each batch element, the one patch that element is
   for (`batch_size` bounds B). `patch_naive` is the reference: one forward per patch.
3. Attribution patching: a first-order estimate of the same grids from the clean forward, one
   corrupted forward and one backward: at the corrupted run, the gradient of the metric with respect
   to each activation, times (clean - corrupted) activation, summed over d_model (over positions and
   d_head for heads). `compare` gives its Pearson correlation with real patching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mechscope.errors import MechscopeError, one_of
from mechscope.lens.predict import check_position, one_sequence, single_token
from mechscope.models import Inputs, Model
from mechscope.models.precision import wide_unembed

KINDS: tuple[str, ...] = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_z")
"""The site kinds that can be patched; all but `attn.hook_z` are patched per position."""
METRICS: tuple[str, ...] = ("logit_diff", "prob")
_FINAL = "ln_final.hook_normalized"


class PatchingResult(NamedTuple):
    """One grid of patching effects: rows are layers, columns are positions (or heads, for `attn.hook_z`)."""

    kind: str
    """The site kind patched, e.g. `hook_resid_pre`."""
    method: str
    """`activation` (real patching), `naive` (the same, one forward per patch) or `attribution` (first-order estimate)."""
    grid: Tensor
    """[n_rows, n_cols] normalised effect, (patched - corrupted) / (clean - corrupted): 0 none, 1 the whole clean metric."""
    raw: Tensor
    """[n_rows, n_cols] the metric of each patched run (for attribution: corrupted + the estimated change)."""
    layers: list[int]
    """Row labels: the layer of each row."""
    cols: list[int]
    """The position (or head, for `attn.hook_z`) of each column."""
    col_labels: list[str]
    """Column labels: the token at each position (`clean/corrupted` where the prompts differ), or `H<head>`."""
    clean: float
    """The metric on the clean prompt."""
    corrupt: float
    """The metric on the corrupted prompt."""
    metric: str
    """`logit_diff` (target - vs at the last position) or `prob` (target probability at the last position)."""


class _Setup(NamedTuple):
    clean_ids: Tensor
    """[1, pos]"""
    corrupt_ids: Tensor
    """[1, pos]"""
    metric: Callable[[Tensor], Tensor]
    """Last-position final-norm outputs [batch, d_model] -> metric [batch] (float64)."""
    metric_name: str
    clean: float
    corrupt: float
    tokens: list[str]
    """Column labels for positions."""


# -- phase 1: setup -----------------------------------------------------------------------------------


def _metric_fn(model: Model, target: str | int, vs: str | int | None, metric: str | None, prompt: Inputs | None = None):
    if metric is None:
        metric = "prob" if vs is None else "logit_diff"
    if metric not in METRICS:
        raise MechscopeError(f"unknown metric {metric!r}: valid metrics are {one_of(METRICS)}")
    t = single_token(model, target, prompt)
    unembed = wide_unembed(model)  # final-norm outputs -> logits, in float32 or wider
    if metric == "prob":
        if vs is not None:
            raise MechscopeError(f"vs={vs!r} is given but metric 'prob' does not use it: use metric 'logit_diff' or drop vs")
        return metric, lambda final: unembed(final).double().softmax(-1)[:, t]
    if vs is None:
        raise MechscopeError("metric 'logit_diff' needs a vs token: give vs, or use metric 'prob'")
    v = single_token(model, vs, prompt, "vs")
    if v == t:
        raise MechscopeError(f"vs {vs!r} is the same token as the target {target!r} (id {t}): choose a different token")

    def logit_diff(final: Tensor) -> Tensor:
        logits = unembed(final)
        return logits[:, t].double() - logits[:, v].double()

    return metric, logit_diff


def _final_normalized(model: Model, ids: Tensor, write: Mapping | None = None) -> Tensor:
    """Last-position final-norm outputs [batch, d_model] (the model's dtype) of one forward with `write` applied."""
    with torch.inference_mode():
        return model.run(ids, read=[_FINAL], write=write, logits=False).cache[_FINAL][:, -1]


def _setup(model: Model, clean: Inputs, corrupt: Inputs, target: str | int, vs: str | int | None, metric: str | None) -> _Setup:
    clean_ids, corrupt_ids = one_sequence(model, clean), one_sequence(model, corrupt)
    if clean_ids.shape[1] != corrupt_ids.shape[1]:
        raise MechscopeError(
            f"the clean prompt has {clean_ids.shape[1]} tokens and the corrupted prompt {corrupt_ids.shape[1]}: "
            "patching needs prompts of equal token length"
        )
    name, fn = _metric_fn(model, target, vs, metric, clean)
    clean_value = float(fn(_final_normalized(model, clean_ids))[0])
    corrupt_value = float(fn(_final_normalized(model, corrupt_ids))[0])
    if clean_value == corrupt_value:
        raise MechscopeError(
            f"the clean and corrupted prompts give the same {name} ({clean_value:.4g}): nothing to restore, "
            "choose prompts (or a target) that the model tells apart"
        )
    a, b = model.to_str_tokens(clean_ids[0]), model.to_str_tokens(corrupt_ids[0])
    tokens = [x if x == y else f"{x}/{y}" for x, y in zip(a, b, strict=True)]
    return _Setup(clean_ids, corrupt_ids, fn, name, clean_value, corrupt_value, tokens)


def _check_kinds(kinds: str | Iterable[str]) -> list[str]:
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise MechscopeError(f"cannot patch site kind {kind!r}: valid kinds are {one_of(KINDS)}")
    if not kinds:
        raise MechscopeError(f"no site kinds given: choose from {one_of(KINDS)}")
    return kinds


def _grid_axes(
    model: Model, setup: _Setup, kind: str, layers: Iterable[int] | None, positions: Iterable[int] | None
) -> tuple[list[int], list[int], list[str]]:
    rows = list(range(model.dims.n_layers)) if layers is None else [model.check_layer(layer) for layer in layers]
    if kind == "attn.hook_z":
        cols = list(range(model.dims.n_heads))
        return rows, cols, [f"H{h}" for h in cols]
    n_pos = setup.clean_ids.shape[1]
    cols = list(range(n_pos)) if positions is None else [check_position(p, n_pos) for p in positions]
    return rows, cols, [setup.tokens[p] for p in cols]


def _clean_cache(model: Model, setup: _Setup, kinds: list[str], layers_of: Mapping[str, list[int]]) -> dict[str, Tensor]:
    reads = [f"blocks.{layer}.{kind}" for kind in kinds for layer in layers_of[kind]]
    with torch.inference_mode():
        return model.run(setup.clean_ids, read=reads, logits=False).cache


def _result(setup: _Setup, kind: str, method: str, raw: Tensor, rows, cols, labels) -> PatchingResult:
    grid = (raw - setup.corrupt) / (setup.clean - setup.corrupt)
    return PatchingResult(kind, method, grid.float(), raw, rows, cols, labels, setup.clean, setup.corrupt, setup.metric_name)


# -- phase 2: activation patching ---------------------------------------------------------------------


def _patch_into(clean_value: Tensor, rows: Tensor, cols: Tensor, heads: bool):
    """A write setting, in batch element rows[i], position (or head) cols[i] to its clean value."""

    def write(x: Tensor) -> Tensor:
        x = x.clone()
        if heads:  # x: [batch, pos, n_heads, d_head]; patch one head at every position
            x[rows, :, cols] = clean_value[0].transpose(0, 1)[cols].to(x.dtype)
        else:  # x: [batch, pos, d_model]
            x[rows, cols] = clean_value[0, cols].to(x.dtype)
        return x

    return write


def _patch_batch(model: Model, setup: _Setup, kind: str, clean: Mapping[str, Tensor], patches: list[tuple[int, int]]) -> Tensor:
    """Metric of the corrupted run with each (layer, col) of `patches` patched in, one batch element each."""
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for i, (layer, col) in enumerate(patches):
        by_layer.setdefault(layer, []).append((i, col))
    write = {}
    for layer, items in by_layer.items():
        name = f"blocks.{layer}.{kind}"
        rows = torch.tensor([i for i, _ in items], device=model.device)
        cols = torch.tensor([c for _, c in items], device=model.device)
        write[name] = _patch_into(clean[name], rows, cols, kind == "attn.hook_z")
    ids = setup.corrupt_ids.expand(len(patches), -1)
    return setup.metric(_final_normalized(model, ids, write))


def _patch_one(model: Model, setup: _Setup, kind: str, clean: Mapping[str, Tensor], layer: int, col: int) -> Tensor:
    """The naive way, kept independent of `_patch_batch`: one forward with one patch."""
    name = f"blocks.{layer}.{kind}"

    def write(x: Tensor) -> Tensor:
        x = x.clone()
        if kind == "attn.hook_z":
            x[:, :, col] = clean[name][:, :, col]
        else:
            x[:, col] = clean[name][:, col]
        return x

    return setup.metric(_final_normalized(model, setup.corrupt_ids, {name: write}))


def _activation_patching(model, clean, corrupt, target, vs, kinds, layers, positions, metric, batch_size, naive):
    if batch_size < 1:
        raise MechscopeError(f"batch_size={batch_size} is invalid: it must be at least 1")
    kinds = _check_kinds(kinds)
    setup = _setup(model, clean, corrupt, target, vs, metric)
    axes = {kind: _grid_axes(model, setup, kind, layers, positions) for kind in kinds}
    cache = _clean_cache(model, setup, kinds, {kind: axes[kind][0] for kind in kinds})
    results = {}
    for kind in kinds:
        rows, cols, labels = axes[kind]
        patches = [(layer, col) for layer in rows for col in cols]
        if naive:
            values = [_patch_one(model, setup, kind, cache, layer, col) for layer, col in patches]
        else:
            chunks = [patches[i : i + batch_size] for i in range(0, len(patches), batch_size)]
            values = [_patch_batch(model, setup, kind, cache, chunk) for chunk in chunks]
        raw = torch.cat(values).reshape(len(rows), len(cols)).cpu()
        results[kind] = _result(setup, kind, "naive" if naive else "activation", raw, rows, cols, labels)
    return results


def activation_patching(
    model: Model,
    clean: Inputs,
    corrupt: Inputs,
    target: str | int,
    vs: str | int | None = None,
    kinds: str | Sequence[str] = KINDS,
    layers: Iterable[int] | None = None,
    positions: Iterable[int] | None = None,
    metric: str | None = None,
    batch_size: int = 32,
) -> dict[str, PatchingResult]:
    """Denoising activation patching: the corrupted run with one clean activation patched in, for every cell of each grid.

    `kinds` picks the grids (default: all of `KINDS`); `layers` and `positions` restrict rows and
    columns. The metric is `logit_diff` (target - vs) when `vs` is given, else `prob` (the target's
    probability), both at the last position. Patched runs go `batch_size` at a time in one forward.

    >>> r = mechscope.activation_patching(model, "The capital of France is", "The capital of Italy is", " Paris", " Rome")
    >>> r["hook_resid_pre"].grid   # [30, 5]; about 1 at position 3 (France/Italy) in the early layers
    """
    return _activation_patching(model, clean, corrupt, target, vs, kinds, layers, positions, metric, batch_size, False)


def patch_naive(
    model: Model,
    clean: Inputs,
    corrupt: Inputs,
    target: str | int,
    vs: str | int | None = None,
    kinds: str | Sequence[str] = KINDS,
    layers: Iterable[int] | None = None,
    positions: Iterable[int] | None = None,
    metric: str | None = None,
) -> dict[str, PatchingResult]:
    """The reference for `activation_patching`: the same grids from one forward pass per patch (slow)."""
    return _activation_patching(model, clean, corrupt, target, vs, kinds, layers, positions, metric, 1, True)


def patched_metric(
    model: Model,
    clean: Inputs,
    corrupt: Inputs,
    target: str | int,
    vs: str | int | None = None,
    sites: str | Iterable[str] = (),
    positions: Sequence[int] | None = None,
    metric: str | None = None,
) -> tuple[float, float]:
    """Patch several whole sites at once (at `positions`, default all) from the clean run: (raw, normalised) metric.

    >>> patched_metric(model, clean, corrupt, " Paris", " Rome", sites=["blocks.0.hook_resid_pre"])  # (clean, 1.0)
    """
    sites = [sites] if isinstance(sites, str) else list(sites)  # one name is one site
    if not sites:
        raise MechscopeError("no sites given: give the sites to patch, e.g. sites=['blocks.0.hook_resid_pre']")
    if positions is not None and not list(positions):
        raise MechscopeError("no positions given (an empty list): give positions to patch, or None for all")
    setup = _setup(model, clean, corrupt, target, vs, metric)
    sites = [model.site(s) for s in sites]
    for site in sites:
        _check_kinds(site.kind)
    n_pos = setup.clean_ids.shape[1]
    cols = list(range(n_pos)) if positions is None else [check_position(p, n_pos) for p in positions]
    with torch.inference_mode():
        cache = model.run(setup.clean_ids, read=sites, logits=False).cache
    index = torch.tensor(cols, device=model.device)

    def patch(name: str):
        def write(x: Tensor) -> Tensor:
            x = x.clone()
            x[:, index] = cache[name][:, index].to(x.dtype)
            return x

        return write

    raw = float(setup.metric(_final_normalized(model, setup.corrupt_ids, {s.name: patch(s.name) for s in sites}))[0])
    return raw, (raw - setup.corrupt) / (setup.clean - setup.corrupt)


# -- phase 3: attribution patching --------------------------------------------------------------------


def attribution_patching(
    model: Model,
    clean: Inputs,
    corrupt: Inputs,
    target: str | int,
    vs: str | int | None = None,
    kinds: str | Sequence[str] = KINDS,
    layers: Iterable[int] | None = None,
    positions: Iterable[int] | None = None,
    metric: str | None = None,
) -> dict[str, PatchingResult]:
    """First-order estimate of `activation_patching`: grad of the metric at the corrupted run x (clean - corrupted) activation.

    Two forward passes (clean, corrupted) and one backward give every grid at once.

    >>> a = mechscope.attribution_patching(model, clean, corrupt, " Paris", " Rome", kinds="hook_resid_pre")
    >>> compare(a["hook_resid_pre"], activation_patching(...)["hook_resid_pre"])   # Pearson r
    """
    kinds = _check_kinds(kinds)
    setup = _setup(model, clean, corrupt, target, vs, metric)
    axes = {kind: _grid_axes(model, setup, kind, layers, positions) for kind in kinds}
    names = [f"blocks.{layer}.{kind}" for kind in kinds for layer in axes[kind][0]]
    clean_cache = _clean_cache(model, setup, kinds, {kind: axes[kind][0] for kind in kinds})

    # The parameters are frozen, so the graph starts at the embeddings: make them a leaf that needs grad.
    def track(x: Tensor) -> Tensor:
        return x.detach().requires_grad_(True)

    out = model.run(setup.corrupt_ids, read=[*names, _FINAL], write={"hook_embed": track}, logits=False, grad=True)
    value = setup.metric(out.cache[_FINAL][:, -1])[0]
    grads = torch.autograd.grad(value, [out.cache[n] for n in names])
    corrupt_value = float(value.detach())
    grad_of = dict(zip(names, grads, strict=True))
    results = {}
    for kind in kinds:
        rows, cols, labels = axes[kind]
        effects = []
        for layer in rows:
            name = f"blocks.{layer}.{kind}"
            delta = (clean_cache[name].double() - out.cache[name].detach().double()) * grad_of[name].double()
            effect = delta[0].sum((0, 2)) if kind == "attn.hook_z" else delta[0].sum(-1)  # [n_heads] or [pos]
            effects.append(effect[torch.tensor(cols, device=effect.device)])
        raw = corrupt_value + torch.stack(effects).cpu()
        results[kind] = _result(setup, kind, "attribution", raw, rows, cols, labels)
    return results


def compare(grid_a: PatchingResult | Tensor, grid_b: PatchingResult | Tensor) -> float:
    """Pearson correlation of two grids of the same shape (e.g. attribution vs activation patching); nan if one is constant."""
    a = (grid_a.grid if isinstance(grid_a, PatchingResult) else grid_a).double().flatten()
    b = (grid_b.grid if isinstance(grid_b, PatchingResult) else grid_b).double().flatten()
    if a.shape != b.shape:
        raise MechscopeError(f"cannot compare grids of {a.numel()} and {b.numel()} cells: give grids of the same shape")
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


# -- plotting -----------------------------------------------------------------------------------------
