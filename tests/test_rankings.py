"""Unit rankings: DLA, attribution patching and real ablation effects, checked against independent computations."""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch
from conftest import smollm2_model, tiny_case
from rich.console import Console
from test_load import tiny_llama

import mechscope as ms
from mechscope.attribution import Intervention, direct_logit_attribution, intervene
from mechscope.attribution.rankings import METHODS, Rankings, rank_units, rankings_table, spearman
from mechscope.attribution.units import parse_unit

PROMPT, TARGET = "The reliability of Wikipedia is very", " questionable"
TOP = 8


@functools.cache
def smol(baseline: str) -> Rankings:
    return rank_units(smollm2_model(), PROMPT, TARGET, top=TOP, baseline=baseline)


@functools.cache
def tiny_llama_model() -> ms.Model:
    return ms.load(tiny_llama(), dtype="float32")


def manual(model: ms.Model, ids: torch.Tensor, pos: int, t: int, unit: str, baseline: str) -> tuple[float, float]:
    """(d log p / d alpha at alpha = 1, log p(clean) - log p(alpha = 0)) for the unit written as base + alpha (x - base)."""
    u = parse_unit(unit, model)
    site = u.site.name
    with torch.no_grad():
        act = model.run(ids, read=[site]).cache[site][0]
    base = act.double().mean(0).to(act.dtype) if baseline == "mean" else torch.zeros_like(act[0])

    def logprob(alpha: torch.Tensor) -> torch.Tensor:
        def write(x: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros_like(x)
            mask[:, :, u.index] = 1  # neuron: [b, pos, d_mlp]; head: [b, pos, n_heads, d_head]
            return x + (alpha.to(x.dtype) - 1) * mask * (x - base)

        logits = model.run(ids, write={site: write}, logits=True, grad=alpha.requires_grad).logits
        return logits[0, pos].double().log_softmax(-1)[t]

    alpha = torch.ones((), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(logprob(alpha), alpha)
    clean = float(logprob(torch.ones((), dtype=torch.float64)))
    return float(grad), clean - float(logprob(torch.zeros((), dtype=torch.float64)))


# -- SmolLM2 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_smollm2_real_effect_matches_intervene(baseline):
    r = smol(baseline)
    model = smollm2_model()
    heads = [row for row in r.rows if row.kind == "head"][:1]
    for row in [*r.rows[:2], *heads, r.rows[-1]]:
        iv = Intervention.zero(row.unit) if baseline == "zero" else Intervention.mean_ablate(row.unit)
        delta = intervene(model, PROMPT, [iv], targets=[TARGET]).targets[0].delta_logprob
        assert row.real_effect == pytest.approx(-delta, abs=1e-4), row


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_smollm2_attribution_matches_autograd(baseline):
    r = smol(baseline)
    model = smollm2_model()
    ids = model.to_ids(PROMPT)
    t = model.token_ids(TARGET)[0]
    # the best-attributed head (not always a candidate) and the top candidate neuron
    best = int(r.attribution_heads.abs().flatten().argmax())
    head = f"{best // model.dims.n_heads}.{best % model.dims.n_heads}"
    neuron = next(row.unit for row in r.rows if row.kind == "neuron")
    rows = {row.unit: row for row in r.rows}
    for unit in (head, neuron):
        grad, real = manual(model, ids, -1, t, unit, baseline)
        u = parse_unit(unit, model)
        grid = r.attribution_neurons if u.kind == "neuron" else r.attribution_heads
        assert float(grid[u.layer, u.index]) == pytest.approx(grad, rel=1e-3, abs=1e-4), unit
        if unit in rows:
            assert rows[unit].attribution == float(grid[u.layer, u.index])
            assert rows[unit].real_effect == pytest.approx(real, abs=1e-4), unit


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_smollm2_correlations(baseline):
    r = smol(baseline)
    assert set(r.spearman) == {("dla", "attribution"), ("dla", "real_effect"), ("attribution", "real_effect")}
    for value in r.spearman.values():
        assert -1 <= value <= 1
    assert r.spearman["attribution", "real_effect"] > 0.5
    print(baseline, {f"{a}~{b}": round(v, 3) for (a, b), v in r.spearman.items()})


def test_smollm2_candidates_and_tensors():
    r = smol("zero")
    model = smollm2_model()
    d = model.dims
    assert r.dla_neurons.shape == r.attribution_neurons.shape == (d.n_layers, d.d_mlp)
    assert r.dla_heads.shape == r.attribution_heads.shape == (d.n_layers, d.n_heads)
    dla = direct_logit_attribution(model, PROMPT, TARGET)
    torch.testing.assert_close(r.dla_neurons, dla.neurons)
    units = {row.unit for row in r.rows}
    assert {name for name, _ in dla.top(TOP)} <= units
    assert TOP <= len(r.rows) <= 2 * TOP and len(units) == len(r.rows)
    real = [abs(row.real_effect) for row in r.rows]
    assert real == sorted(real, reverse=True)
    # the top attribution scores are among the candidates, and no unit outside them scores higher
    attr = torch.cat([r.attribution_neurons.flatten(), r.attribution_heads.flatten()]).abs()
    assert sum(abs(row.attribution) >= float(attr.topk(TOP).values[-1]) for row in r.rows) >= TOP
    assert r.logprob == pytest.approx(math.log(ms.predict(model, PROMPT, targets=[TARGET]).targets[0].prob), abs=1e-4)


def test_rankings_table():
    r = smol("zero")
    table = rankings_table(r)
    assert len(table.columns) == 5 and table.row_count == len(r.rows)
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert r.rows[0].unit in text and "#1" in text and "Spearman" in text
    for m in METHODS:
        assert sorted(r.ranks(m).values()) == list(range(1, len(r.rows) + 1))


# -- tiny Llama models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["zero", "mean"])
@pytest.mark.parametrize("position", [-1, 4])
def test_tiny_llama_matches_manual(baseline, position):
    """float64 tiny Llama (conftest): ids and an integer target; small batches so the candidates span several."""
    model = tiny_case("llama").model
    ids = tiny_case("llama").ids[:1]
    t = 7
    r = rank_units(model, ids, t, top=3, baseline=baseline, position=position, batch_size=2)
    assert len(r.rows) >= 3 and any(row.kind == "head" for row in r.rows)
    for row in r.rows:
        grad, real = manual(model, ids, position, t, row.unit, baseline)
        assert row.attribution == pytest.approx(grad, rel=1e-6, abs=1e-9), row
        assert row.real_effect == pytest.approx(real, abs=1e-9), row
    if position == -1:
        for row in r.rows:
            iv = Intervention.zero(row.unit) if baseline == "zero" else Intervention.mean_ablate(row.unit)
            delta = intervene(model, ids, [iv], targets=[t]).targets[0].delta_logprob
            assert row.real_effect == pytest.approx(-delta, abs=1e-4), row
    for value in r.spearman.values():
        assert math.isnan(value) or -1 <= value <= 1


def test_tiny_llama_from_test_load():
    model = tiny_llama_model()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    r = rank_units(model, ids, 5, top=4, baseline="mean", batch_size=3)
    for row in r.rows[:3]:
        delta = intervene(model, ids, [Intervention.mean_ablate(row.unit)], targets=[5]).targets[0].delta_logprob
        assert row.real_effect == pytest.approx(-delta, abs=1e-4), row
        grad, _ = manual(model, ids, -1, 5, row.unit, "mean")
        assert row.attribution == pytest.approx(grad, rel=1e-3, abs=1e-6), row


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(1.0)
    assert math.isnan(spearman(a, torch.ones(4)))


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(top=0), "top=0 is invalid: it must be an integer of at least 1"),
        (dict(top=-3), "top=-3 is invalid"),
        (dict(baseline="median"), "unknown baseline 'median': valid baselines are zero, mean"),
        (dict(batch_size=0), "batch_size=0 is invalid"),
        (dict(position=50), "position 50 out of range"),
    ],
)
def test_bad_input(kwargs, message):
    model = tiny_case("llama").model
    with pytest.raises(ms.MechscopeError, match=message) as err:
        rank_units(model, tiny_case("llama").ids[:1], 7, **kwargs)
    assert "\n" not in str(err.value)


def test_unknown_method():
    with pytest.raises(ms.MechscopeError, match="unknown method 'kl'"):
        smol("zero").ranks("kl")
