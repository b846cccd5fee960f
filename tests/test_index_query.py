"""Reading an index: every answer checked against the model's own activations on the stored contexts,
or against the tables read back with numpy; the unit card's output tokens against the weights by hand."""

from __future__ import annotations

import functools

import duckdb
import numpy as np
import pytest
import torch
from conftest import index_for_another_model

from mechscope.errors import MechscopeError
from mechscope.index.build import IndexSettings, build_index
from mechscope.index.card import output_direction, output_tokens, unit_card
from mechscope.index.query import Index, time_top_query
from mechscope.index.stats import WINDOW_AFTER, WINDOW_BEFORE, value_bins
from mechscope.viz import index_views

pytestmark = pytest.mark.slow

SITES = ["blocks.0.mlp.hook_post", "blocks.5.mlp.hook_post"]
SETTINGS = IndexSettings(tokens=2048, ctx_len=128)
SKIP = SETTINGS.skip  # positions never scored at the start of each context


@functools.cache
def small_index(model, folder) -> str:
    """One small real index per session (2 sites, 16 contexts of 128 tokens), shared with the CLI tests."""
    return str(build_index(model, folder / "small.duckdb", sites=SITES, settings=SETTINGS, progress=False))


@pytest.fixture(scope="session")
def db(smollm2, tmp_path_factory) -> str:
    return small_index(smollm2, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def index(smollm2, db):
    with Index(db, model=smollm2) as opened:
        yield opened


@pytest.fixture(scope="module")
def acts(smollm2, db) -> dict[str, torch.Tensor]:
    """Independent recomputation: each site's activations [ctx, pos, unit] on the stored contexts."""
    con = duckdb.connect(db, read_only=True)
    tokens = con.execute("SELECT token FROM tokens ORDER BY ctx, pos").fetchnumpy()["token"]
    con.close()
    ids = torch.from_numpy(tokens.astype(np.int64)).view(-1, SETTINGS.ctx_len)
    with torch.no_grad():
        cache = smollm2.run(ids, read=SITES, logits=False).cache
    return {"ids": ids, **{site: value.float() for site, value in cache.items()}}


def _unit_acts(acts, unit) -> torch.Tensor:
    """[ctx, pos] activations of one unit; the first SKIP positions (start token included) are never scored."""
    return acts[unit.site][:, :, unit.index]


@pytest.mark.parametrize("name", ["0:5", "5:10", "5:1535"])
def test_top_matches_the_model(index, acts, name):
    unit = index.unit(name)
    values = _unit_acts(acts, unit)
    examples = index.top(unit, n=20)
    assert [ex.rank for ex in examples] == list(range(20))
    assert all(a.value >= b.value for a, b in zip(examples, examples[1:], strict=False))
    best = values[:, SKIP:].flatten().topk(20).values
    np.testing.assert_allclose([ex.value for ex in examples], best.numpy(), atol=1e-4)
    for ex in examples:
        assert abs(float(values[ex.ctx, ex.pos]) - ex.value) <= 1e-4
        assert ex.token_id == int(acts["ids"][ex.ctx, ex.pos]) and ex.positions[ex.at] == ex.pos
        assert ex.token_ids == acts["ids"][ex.ctx, ex.positions].tolist()
        assert ex.tokens == [index.tokenizer.decode([t]) for t in ex.token_ids]
        assert ex.positions == list(range(max(1, ex.pos - WINDOW_BEFORE), min(SETTINGS.ctx_len - 1, ex.pos + WINDOW_AFTER) + 1))
        want = values[ex.ctx, ex.positions].numpy().copy()
        want[np.array(ex.positions) < SKIP] = np.nan  # never scored, so not stored
        np.testing.assert_allclose(ex.acts, want, rtol=2e-3, atol=1e-4)  # float16
    assert len(index.top(unit, n=3)) == 3


def test_stats_and_histogram_match_the_model(index, acts):
    for name in ("0:5", "0:1194", "5:10"):
        unit = index.unit(name)
        v = _unit_acts(acts, unit)[:, SKIP:].flatten().double()
        s = index.stats(unit)
        assert s.tokens == v.numel() == index.meta["tokens_seen"]
        assert s.mean == pytest.approx(float(v.mean()), abs=1e-5) and s.std == pytest.approx(float(v.std(correction=0)), rel=1e-4)
        assert s.max == pytest.approx(float(v.max()), abs=1e-4) and s.active == int((v > 0).sum())
        assert s.density == pytest.approx(s.active / s.tokens)
        hist = index.histogram(unit)
        assert hist.counts.sum() == s.tokens and hist.counts[0] > 0 and hist.counts[-1] > 0
        assert len(hist.edges) == len(hist.counts) + 1
        want = torch.bincount(value_bins(v.float()).long() - hist.first_bin, minlength=len(hist.counts))
        assert np.abs(hist.counts - want.numpy()).sum() <= 2  # a value within float noise of an edge may switch bins


def test_samples_sit_in_their_range_with_their_quantiles(index, acts):
    unit = index.unit("5:10")
    v = _unit_acts(acts, unit)[:, SKIP:].flatten()
    strata = index.samples(unit)
    assert strata and [s.stratum for s in strata] == sorted(s.stratum for s in strata)
    assert strata[0].low < 0 < strata[-1].high  # ranges of either sign
    for s in strata:
        assert 1 <= len(s.examples) <= index.meta["n_samples"]
        for ex in s.examples:  # negative ranges are (low, high], positive ones [low, high), the middle one (low, high)
            inside = (
                s.low < ex.value <= s.high if s.high < 0 else s.low <= ex.value < s.high if s.low > 0 else abs(ex.value) < s.high
            )
            assert inside and abs(float(_unit_acts(acts, unit)[ex.ctx, ex.pos]) - ex.value) <= 1e-4
            assert np.isnan(ex.acts).sum() == len(ex.acts) - 1 and ex.acts[ex.at] == np.float32(ex.value)
        assert s.q_low == pytest.approx(float((v < s.low).float().mean()), abs=2 / len(v))
        assert s.q_high == pytest.approx(float((v < s.high).float().mean()), abs=2 / len(v))


@pytest.mark.parametrize("by", ["density", "max", "mean"])
def test_rank_orders_units(index, acts, by):
    values = torch.cat([acts[site][:, SKIP:].flatten(0, 1) for site in SITES], dim=1)  # [tokens, units] in unit order
    score = {"density": (values > 0).double().mean(0), "max": values.max(0).values.double(), "mean": values.double().mean(0)}[by]
    got = index.rank(by=by, n=10)
    assert [r.unit.id for r in got] == score.topk(10).indices.tolist()
    low = index.rank(by=by, n=5, ascending=True, site="5")
    assert all(r.unit.site == SITES[1] for r in low)
    assert [getattr(r, by) for r in low] == sorted(getattr(r, by) for r in low)
    with pytest.raises(MechscopeError, match="cannot rank by 'median'"):
        index.rank(by="median")
    with pytest.raises(MechscopeError, match="site 'blocks.7.mlp.hook_post' is not in this index"):
        index.rank(site="blocks.7.mlp.hook_post")


def _expected_search(db: str, ids: list[int], n: int) -> list[tuple[int, int, float]]:
    """The search recomputed with numpy from the top and tokens tables: (unit, hits, best)."""
    con = duckdb.connect(db, read_only=True)
    top = con.execute("SELECT unit, value, ctx, pos FROM top").fetchnumpy()
    tokens = con.execute("SELECT token FROM tokens ORDER BY ctx, pos").fetchnumpy()["token"].reshape(-1, SETTINGS.ctx_len)
    con.close()
    ctx, pos = top["ctx"].astype(np.int64), top["pos"].astype(np.int64)
    match = np.ones(len(ctx), bool)
    for back, token in enumerate(reversed(ids)):
        inside = pos - back >= 0
        match &= inside & (tokens[ctx, np.clip(pos - back, 0, None)] == token)
    hits: dict[int, list[float]] = {}
    for unit, value in zip(top["unit"][match].tolist(), top["value"][match].tolist(), strict=True):
        hits.setdefault(unit, []).append(value)
    ranked = sorted(hits.items(), key=lambda kv: (-len(kv[1]), -max(kv[1]), kv[0]))[:n]
    return [(unit, len(values), max(values)) for unit, values in ranked]


@pytest.mark.parametrize("text", [" the", ".\n", " of the", "(self"])
def test_search_matches_numpy(index, db, text):
    ids = index.tokenizer(text, add_special_tokens=False).input_ids
    want = _expected_search(db, ids, 15)
    got = index.search(text, n=15)
    assert want, f"no top example sits on {text!r}"
    assert [(h.unit.id, h.hits) for h in got] == [(u, h) for u, h, _ in want]
    np.testing.assert_allclose([h.best for h in got], [b for _, _, b in want], rtol=1e-6)
    assert all(h.max >= h.best for h in got)
    if len(ids) == 1:
        assert [h.unit.id for h in index.search(ids[0], n=15)] == [u for u, _, _ in want]


def test_search_bad_input(index):
    with pytest.raises(MechscopeError, match="tokenises to nothing"):
        index.search("")
    with pytest.raises(MechscopeError, match="token id 10000000 out of range"):
        index.search(10_000_000)


def test_unit_names_and_errors(index):
    assert index.unit("5:10") == index.unit(1536 + 10) and index.unit("5:10").name == "5:10"
    assert index.unit("blocks.5.mlp.hook_post:10").id == 1546
    for bad, message in [
        ("5:1536", "out of range"),
        ("3:7", "not in this index"),
        ("twelve", "bad unit 'twelve'"),
        (3072, "unit number 3072 out of range"),
    ]:
        with pytest.raises(MechscopeError, match=message) as err:
            index.unit(bad)
        assert "\n" not in str(err.value)


def test_bad_databases_one_line(smollm2, db, tmp_path):
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"\x00not a database\xff" * 200)
    other = index_for_another_model(db, tmp_path)
    for path, message in [
        (tmp_path / "missing.duckdb", "no index database at"),
        (garbage, "is not a readable mechscope index"),
        (other, "was built for the model OtherLM-1B (fingerprint feedfacefeedface), not SmolLM2-135M-Instruct"),
    ]:
        with pytest.raises(MechscopeError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            Index(path, model=smollm2)
        assert "\n" not in str(err.value)
    Index(other).close()  # without a model to check against, it opens


def test_time_top_query_runs(db):  # the latency itself is measured in bench/bench_index.py, not asserted here
    assert time_top_query(db, "5:10", 20, repeats=2) > 0


def test_card(index, smollm2):
    card = unit_card(index, "5:10")
    assert card.stats == index.stats("5:10") and card.histogram.counts.sum() == card.stats.tokens
    hf = smollm2.hf
    manual = hf.lm_head.weight @ (hf.model.norm.weight * hf.model.layers[5].mlp.down_proj.weight[:, 10])
    manual = manual - manual.mean()  # centred: softmax ignores a shift shared by every logit
    assert [t.token_id for t in card.promoted] == manual.topk(10).indices.tolist()
    assert [t.token_id for t in card.suppressed] == (-manual).topk(10).indices.tolist()
    np.testing.assert_allclose([t.weight for t in card.promoted], manual.topk(10).values.numpy(), rtol=1e-5)
    assert card.promoted[0].token == smollm2.tokenizer.decode([card.promoted[0].token_id])
    # input tokens: the mean over the top examples and active samples (each token place once) that sit on the token
    active = [e for s in index.samples("5:10") for e in s.examples if e.value > 0]
    places = {(ex.ctx, ex.pos): ex for ex in index.top("5:10", 20) + active}
    first = card.input_tokens[0]
    on_it = [ex.value for ex in places.values() if ex.token_id == first.token_id]
    assert first.count == len(on_it) and first.mean == pytest.approx(np.mean(on_it))
    assert [t.mean for t in card.input_tokens] == sorted((t.mean for t in card.input_tokens), reverse=True)
    assert unit_card(index, "5:10", model=None).promoted is not None  # the index's own model
    with Index(index.path) as bare:
        assert unit_card(bare, "5:10").promoted is None


def test_output_tokens_of_other_families(tiny_model):
    """GPT-2's Conv1D [d_mlp, d_model] with a LayerNorm (centred); Gemma 2's branch norm before the residual."""
    gpt2 = tiny_model("gpt2").hf
    w = gpt2.transformer.h[1].mlp.c_proj.weight[7]
    manual = gpt2.lm_head.weight @ (gpt2.transformer.ln_f.weight * (w - w.mean()))
    torch.testing.assert_close(output_direction(tiny_model("gpt2"), 1, 7), manual.float())
    gemma2 = tiny_model("gemma2").hf
    layer = gemma2.model.layers[2]
    w = (1 + layer.post_feedforward_layernorm.weight) * layer.mlp.down_proj.weight[:, 5]
    manual = gemma2.lm_head.weight @ ((1 + gemma2.model.norm.weight) * w)
    torch.testing.assert_close(output_direction(tiny_model("gemma2"), 2, 5), manual.float())
    up, down = output_tokens(tiny_model("gemma2"), 2, 5, n=3)
    assert [t.token_id for t in up] == manual.topk(3).indices.tolist() and up[0].token.startswith("<")
    centred = manual - manual.mean()  # a shift shared by every logit changes no probability
    assert up[0].weight == pytest.approx(float(centred.max()), rel=1e-5) and down[0].weight == pytest.approx(float(centred.min()))


def test_views(index, tmp_path):
    examples, strata, card = index.top("5:10", 5), index.samples("5:10"), unit_card(index, "5:10")
    text = index_views.examples_text(examples)
    assert text.plain.count("\n") >= 5 and examples[0].tokens[examples[0].at].strip() in text.plain
    assert "quantiles" in index_views.strata_text(strata).plain
    assert len(index_views.card_tables(card)) == 3 and "(log counts)" in index_views.histogram_text(card.histogram).plain
    fake = examples[0]._replace(tokens=["<script>alert(1)</script>" if i == 0 else t for i, t in enumerate(examples[0].tokens)])
    page = index_views.unit_page(tmp_path / "u.html", card, [fake, *examples[1:]], strata).read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<svg" in page and "<script" not in page and "quantiles" in page and "class='tok at'" in page  # light: no plotly.js
    png = index_views.histogram_png(card.histogram, tmp_path / "h.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_counts_are_checked_before_the_query(index):
    for call, message in [
        (lambda: index.top("5:10", n=0), "n 0 is out of range: valid values are 1..20 (the index keeps each unit's top 20)"),
        (lambda: index.top("5:10", n=21), "n 21 is out of range: valid values are 1..20"),
        (lambda: index.rank(n=-1), "n -1 is out of range: valid values are 1..3,072 (units in this index)"),
        (lambda: index.search(" the", n=-1), "n -1 is out of range: valid values are 1..3,072"),
    ]:
        with pytest.raises(MechscopeError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            call()
        assert "\n" not in str(err.value) and "SELECT" not in str(err.value)
