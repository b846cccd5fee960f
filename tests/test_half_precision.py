"""Half precision: every method runs on float16 and bfloat16 models, its reductions in float32.

Each method runs on the embedded SmolLM2 loaded in float16 and in bfloat16 and is compared with the
same method on SmolLM2 in float32 (the same weights; the half models hold them rounded), and on tiny
models of every family against their float64 originals. Two kinds of check:

- Inside the half model, identities its forward's rounding cannot break: DLA's parts add up to the
  logit they explain, and the lens's probabilities equal float64 arithmetic on the same residual
  stream. These are tight.
- Against float32: a half forward rounds every activation to its dtype and the rounding compounds
  over the layers, so results differ by it. Tolerances are `k * eps * scale`: `eps` is the dtype's
  machine epsilon (2^-10 for float16, 2^-7 for bfloat16), `scale` the quantity's own size (the
  largest unit score, a normalised grid's 1, a statistic's std), and k is the same for both dtypes
  and at least twice the worst error measured on either (noted at each constant). Logits are
  compared in ulps of the model's largest |logit| at that position: the spacing of the dtype's
  numbers there, the precision of the model's own logits.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from conftest import FAMILIES, smollm2_model, tiny_case

import mechscope as ms
from mechscope.attribution import direct_logit_attribution
from mechscope.attribution.patching import activation_patching, attribution_patching
from mechscope.attribution.rankings import rank_units
from mechscope.index import store
from mechscope.index.build import IndexSettings, build_index
from mechscope.index.card import output_direction
from mechscope.lens.logit_lens import logit_lens
from mechscope.models.norms import freeze_norm

DTYPES = ("float16", "bfloat16")
TEXT, TARGET, VS = "The reliability of Wikipedia is very", " questionable", " high"
CLEAN, CORRUPT, PARIS, ROME = "The capital of France is", "The capital of Italy is", " Paris", " Rome"

LOGIT_ULPS = 3
"""A half model's logit-scale results (DLA total, log p, real effects, patching metrics) vs float32: at most
LOGIT_ULPS ulps. Measured up to 1.35 ulps (a real effect, float16) and 1.03 (the clean patching metric, float16)."""
UNIT_K = 16
"""Unit scores (DLA) vs float32 (float64 for tiny models): max |error| <= UNIT_K eps * max |score|. Measured:
2.6 eps (float16) and 2.5 eps (bfloat16) on SmolLM2; up to 8.0 eps on the tiny models (Phi-3, bfloat16)."""
ATTRIBUTION_K = 40
"""Attribution scores (gradients, from the half model's backward, which rounds again): measured 16.9 eps (float16)."""
GRID_K = 6
"""Normalised patching grids vs float32: max |error| <= GRID_K eps. Measured 2.7 eps (float16), 1.7 eps (bfloat16)."""
LENS_K = 8
"""Lens probabilities vs float32 (float64): max |error| <= LENS_K eps. Measured 0.6 eps (SmolLM2), 2.3 (tiny Gemma 3)."""


def eps(dtype: str) -> float:
    return torch.finfo(getattr(torch, dtype)).eps


def ulp(dtype: str, x: float) -> float:
    """The spacing of `dtype`'s numbers at |x|."""
    return eps(dtype) * 2.0 ** math.floor(math.log2(abs(x)))


def logit_ulp(model: ms.Model, text, dtype: str) -> float:
    """One ulp of `dtype` at the largest |logit| after `text` in the model's own forward: its logits' precision."""
    with torch.inference_mode():
        return ulp(dtype, float(model.run(text).logits[0, -1].abs().max()))


def assert_close_scores(got: torch.Tensor, ref: torch.Tensor, dtype: str, k: int = UNIT_K) -> None:
    """Per-unit scores of a half model against the wide model's: small error, same order, same top units."""
    got, ref = got.double().flatten(), ref.double().flatten()
    assert torch.isfinite(got).all()
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= k * eps(dtype) * scale
    # 1 - r is about half the squared relative rms error: measured at most 0.18 eps (tiny Phi-3, bfloat16)
    assert 1 - float(torch.corrcoef(torch.stack([got, ref]))[0, 1]) <= eps(dtype)
    top = lambda x: set(x.abs().topk(10).indices.tolist())  # noqa: E731
    assert len(top(got) & top(ref)) >= 8  # measured at least 9


@functools.cache
def smollm2(dtype: str) -> ms.Model:
    return smollm2_model() if dtype == "float32" else ms.load(dtype=dtype)


# -- tiny models of every family, and the norm itself (fast) ---------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])  # RMSNorm, Gemma's 1 + weight, LayerNorm
def test_freeze_norm_past_float16s_range(family, dtype):
    """A residual stream whose sum of squares (~3e6) overflows float16: the frozen norm is float32 and exact."""
    model = ms.load(tiny_case(family).reference, dtype=getattr(torch, dtype))
    norm = model.module(model.adapter.final_norm)
    x = (300 * torch.randn(3, model.dims.d_model, generator=torch.Generator().manual_seed(0))).to(model.hf.dtype)
    frozen = freeze_norm(norm, x)
    assert frozen.scale.dtype == frozen.weight.dtype == torch.float32
    exact = copy.deepcopy(norm).double()(x.double())  # float64 arithmetic on the same inputs and weights
    torch.testing.assert_close(frozen.apply(x).double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_dla_and_lens(family, dtype):
    case = tiny_case(family)
    ids = case.ids[:1]
    model = ms.load(case.reference, dtype=getattr(torch, dtype))  # the float64 weights, rounded
    a, ref = direct_logit_attribution(model, ids, 7, vs=11), direct_logit_attribution(case.model, ids, 7, vs=11)
    assert abs(a.total - a.logit) <= logit_ulp(model, ids, dtype)  # measured up to 0.84 ulp (Gemma 2, float16)
    assert_close_scores(
        torch.cat([a.heads.flatten(), a.neurons.flatten()]), torch.cat([ref.heads.flatten(), ref.neurons.flatten()]), dtype
    )
    lens, lens_ref = logit_lens(model, ids, [7]), logit_lens(case.model, ids, [7])
    assert lens.probs.dtype == torch.float32
    assert float((lens.probs - lens_ref.probs).abs().max()) <= LENS_K * eps(dtype)


# -- SmolLM2 (slow) --------------------------------------------------------------------------------
# Each method runs once per dtype, float32 included (cached), to keep the file within a minute.


@functools.cache
def dla(dtype: str):
    return direct_logit_attribution(smollm2(dtype), TEXT, TARGET, vs=VS)


@functools.cache
def lens(dtype: str):
    return logit_lens(smollm2(dtype), TEXT, [TARGET])


@functools.cache
def rankings(dtype: str):
    return rank_units(smollm2(dtype), TEXT, TARGET, top=4)


@functools.cache
def patching(dtype: str) -> dict:
    args = (smollm2(dtype), CLEAN, CORRUPT, PARIS, ROME)
    act = activation_patching(*args, kinds=["hook_resid_pre", "attn.hook_z"], layers=[0, 29])
    return {
        **{f"activation {k}": r for k, r in act.items()},
        **{f"attribution {k}": r for k, r in attribution_patching(*args).items()},
    }


def scores(result, kind: str) -> torch.Tensor:
    """Every head's and neuron's score of one kind (`dla` or `attribution`) from `Rankings`, or DLA's from `Attribution`."""
    if kind == "direct":
        return torch.cat([result.heads.flatten(), result.neurons.flatten()])
    return torch.cat([getattr(result, f"{kind}_heads").flatten(), getattr(result, f"{kind}_neurons").flatten()])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_dla(dtype):
    """The reported case: in float16 DLA was all zeros, its final norm's sum of squares (5.3e5) overflowing."""
    model, a, ref = smollm2(dtype), dla(dtype), dla("float32")
    t, v = model.token_ids(TARGET)[0], model.token_ids(VS)[0]
    step = logit_ulp(model, TEXT, dtype)
    assert a.heads.dtype == a.neurons.dtype == torch.float32
    assert a.neurons.abs().max() > 0 and a.heads.abs().max() > 0
    with torch.inference_mode():
        own = model.run(TEXT).logits[0, -1]
    # the half model's own logit difference, and its parts, to its own logits' precision.
    # Measured: logit vs own 0.54 ulp (float16), 0.20 (bfloat16); total vs logit 0.69 and 0.70 ulp.
    assert abs(a.logit - float(own[t] - own[v])) <= step
    assert abs(a.total - a.logit) <= step
    assert abs(a.total - ref.total) <= LOGIT_ULPS * step  # measured 0.73 ulp (float16), 0.44 (bfloat16)
    assert_close_scores(scores(a, "direct"), scores(ref, "direct"), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_logit_lens(dtype):
    model, got, ref = smollm2(dtype), lens(dtype), lens("float32")
    # each row at the last position is float64 arithmetic on the half model's own residual stream, to float32 rounding
    with torch.inference_mode():
        cache = model.run(TEXT, read=got.sites).cache
        resid = torch.stack([cache[s][0, -1] for s in got.sites]).double()  # [row, d_model]
        logits = copy.deepcopy(model.hf.model.norm).double()(resid) @ model.hf.lm_head.weight.double().T
    exact = logits.log_softmax(-1)[:, got.target_ids[0]].exp()
    torch.testing.assert_close(got.probs[:, -1, 0].double(), exact, rtol=1e-4, atol=1e-30)
    assert float((got.probs - ref.probs).abs().max()) <= LENS_K * eps(dtype)
    assert got.top_ids[-1, -1, 0] == ref.top_ids[-1, -1, 0]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_rankings(dtype):
    got, ref = rankings(dtype), rankings("float32")
    step = logit_ulp(smollm2(dtype), TEXT, dtype)
    assert abs(got.logprob - ref.logprob) <= LOGIT_ULPS * step
    assert_close_scores(scores(got, "dla"), scores(ref, "dla"), dtype)
    assert_close_scores(scores(got, "attribution"), scores(ref, "attribution"), dtype, k=ATTRIBUTION_K)
    # a real effect is log p(clean) - log p(ablated): two forwards, each rounded to the model's precision
    real = {r.unit: r.real_effect for r in got.rows}
    both = [r for r in ref.rows if r.unit in real]
    assert len(both) >= 4
    assert all(abs(real[r.unit] - r.real_effect) <= LOGIT_ULPS * step for r in both)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_patching(dtype):
    step = logit_ulp(smollm2(dtype), CORRUPT, dtype)
    for name, got in patching(dtype).items():
        ref = patching("float32")[name]
        assert abs(got.clean - ref.clean) <= LOGIT_ULPS * step and abs(got.corrupt - ref.corrupt) <= LOGIT_ULPS * step, name
        assert torch.isfinite(got.grid).all() and float((got.grid - ref.grid).abs().max()) <= GRID_K * eps(dtype), name


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_unit_card_output_direction(dtype):
    """What a neuron writes to each logit (the index's unit cards): d_vocab dot products over d_model."""
    got, ref = output_direction(smollm2(dtype), 29, 288), output_direction(smollm2("float32"), 29, 288)
    assert got.dtype == torch.float32
    assert_close_scores(got, ref, dtype)


def _index_stats(dtype: str, folder):
    settings = IndexSettings(contexts=(0, 16), ctx_len=64, batch_size=8, k=5, n_samples=2)  # 960 scored tokens
    sites = ["blocks.0.mlp.hook_post", "blocks.3.hook_resid_post"]
    path = build_index(smollm2(dtype), folder / f"{dtype}.duckdb", sites=sites, settings=settings, progress=False)
    con = store.open_index(path)
    try:
        return store.read_stats(con, settings.k, settings.n_samples, settings.threshold, settings.ctx_len)
    finally:
        con.close()


@pytest.fixture(scope="module")
def index_float32(tmp_path_factory):
    return _index_stats("float32", tmp_path_factory.mktemp("index"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_index_stats(dtype, index_float32, tmp_path):
    got, ref = _index_stats(dtype, tmp_path), index_float32
    assert got.tokens == ref.tokens
    for name in ("total", "total_sq", "top_values", "sample_values"):
        assert torch.isfinite(getattr(got, name)).all(), name
    n = float(ref.tokens)
    std = (ref.total_sq / n - (ref.total / n) ** 2).clamp(min=0).sqrt()
    half_std = (got.total_sq / n - (got.total / n) ** 2).clamp(min=0).sqrt()
    e = eps(dtype)
    # Measured, in eps: the mean 0.80 (float16) / 1.00 (bfloat16) of the std away, the std 1.25 / 0.83
    # of itself, the max 3.5 / 3.6 of max(|max|, std), the density 4.3 / 1.3 (a token crosses the
    # threshold only when its value lies within its rounding of it; one token of 960 is 1.07 eps in float16).
    assert ((got.total - ref.total).abs() / n <= 4 * e * std).all()
    assert ((half_std - std).abs() <= 4 * e * std).all()
    top, top_ref = got.top_values[:, 0].double(), ref.top_values[:, 0].double()
    assert ((top - top_ref).abs() <= 8 * e * torch.maximum(top_ref.abs(), std)).all()
    assert ((got.active - ref.active).abs() / n <= 10 * e).all()
    # A value changes bin only when it lies within its rounding of a bin edge (4 bins an octave).
    # Measured: at most 3.8% (float16) and 8.9% (bfloat16) of a unit's tokens.
    moved = 0.5 * (got.hist - ref.hist).abs().sum(1) / n
    assert (moved <= 0.2).all()
