"""Polysemanticity metrics from an index, each against an independent computation.

Two kinds of index: synthetic units written straight from chosen activations (a unit that is exactly
"token == X", one that is "A then B", noise, a dead one, a narrow one), and a real build over the tiny
Llama with a real tokenizer (`conftest.tiny_lm`), whose neurons are recomputed by a direct forward
pass over the stored tokens. Density, kurtosis, token entropy and context clusters are recomputed
from those activations with plain Python; the explanation's precision and recall are recomputed over
every held-out token of the corpus, and match exactly where the samples enumerate every range, and
within sampling error where they do not. Then the command line, and one line for each bad input.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import invoke_cli, tiny_lm

from mechscope import cli_poly
from mechscope.errors import MechscopeError
from mechscope.index import store
from mechscope.index.build import IndexSettings, build_index
from mechscope.index.polysemanticity import PolySettings, ngram_key, polysemanticity, summary
from mechscope.index.query import Index
from mechscope.index.stats import STRATUM_OF_BIN, WINDOW_AFTER, WINDOW_BEFORE, UnitStats, value_bins

SKIP, LENGTH = 4, 32
SITES = ["blocks.0.mlp.hook_post"]
X, A, B = 7, 11, 13  # token ids of the synthetic units


def synthetic_index(path, tokens: torch.Tensor, acts: torch.Tensor, k: int = 20, n_samples: int = 5, threshold=0.0):
    """An index database of synthetic units over the contexts `tokens` [C, L] with activations `acts` [C, L, D],
    written the way `build_index` writes one (positions before SKIP not scored)."""
    n_ctx, length, width = acts.shape
    stats = UnitStats.empty(width, k, n_samples, threshold)
    for first in range(0, n_ctx, 8):
        n = min(8, n_ctx - first)
        positions = torch.arange(SKIP, length).repeat(n)
        g = (first + torch.arange(n).repeat_interleave(length - SKIP)) * length + positions
        stats.update(0, acts[first : first + n, SKIP:].reshape(-1, width).float(), g, positions)
    con = store.create(path)
    meta = {"format": store.FORMAT, "model": "synthetic", "model_fingerprint": "0", "sites": ["synthetic"], "corpus": "random",
            "ctx_len": length, "batch_size": 8, "seed": 0, "skip": SKIP, "k": k, "n_samples": n_samples,
            "threshold": threshold, "contexts": [0, n_ctx], "contexts_done": n_ctx, "tokens_seen": int(stats.tokens),
            "complete": True}  # fmt: skip
    store.write_meta(con, meta)
    store.write_sites(con, [("synthetic", None, 0, width)])
    store.append_tokens(con, 0, tokens, torch.zeros_like(tokens))
    store.write_stats(con, stats, [("synthetic", None, i) for i in range(width)], length)
    con.close()
    return path


def _synthetic(n_ctx=96, seed=0):
    """Tokens from a vocabulary of 40, and units: 0 "token == X", 1 "A then B", 2 X or B (half each), 3 Gaussian,
    4 dead (never above 0), 5 narrow (5 + 0.01 noise), 6 heavy-tailed sparse."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 40, (n_ctx, LENGTH), generator=gen)
    noise = lambda: torch.rand(n_ctx, LENGTH, generator=gen)  # noqa: E731
    prev = torch.cat([torch.full((n_ctx, 1), -1), tokens[:, :-1]], 1)
    is_x, is_ab, is_b = tokens == X, (prev == A) & (tokens == B), tokens == B
    units = [
        torch.where(is_x, 1 + 0.2 * noise(), 0.05 * noise()),
        torch.where(is_ab, 2 + noise(), 0.1 * noise()),
        torch.where(is_x | is_b, 1 + 0.1 * noise(), 0.02 * noise()),
        torch.randn(n_ctx, LENGTH, generator=gen),
        -noise(),
        5 + 0.01 * noise(),
        torch.where(noise() < 0.02, torch.rand(n_ctx, LENGTH, generator=gen) ** 4 * 10, torch.zeros(n_ctx, LENGTH)),
    ]
    return tokens, torch.stack(units, -1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Units over 96 contexts with 5 samples per range, and over 36 contexts (1,008 tokens) with every token sampled."""
    root = tmp_path_factory.mktemp("poly")
    tokens, acts = _synthetic()
    small_tokens, small_acts = _synthetic(n_ctx=36, seed=1)
    return {
        "few": (tokens, acts, synthetic_index(root / "few.duckdb", tokens, acts), None),
        "all": (small_tokens, small_acts, None, synthetic_index(root / "all.duckdb", small_tokens, small_acts, n_samples=1024)),
    }


def test_synthetic_units_get_the_explanations_they_are_made_of(synthetic):
    _, _, few, _ = synthetic["few"]
    with Index(few) as index:
        rows = polysemanticity(index)
    x, ab, either, gauss, dead, narrow, sparse = rows
    assert x.ngram == (X,) and x.precision == 1 and x.recall == 1 and x.f1 == 1
    assert ab.ngram == (A, B) and ab.f1 == 1
    assert either.ngram in ((X,), (B,)) and 0.4 < either.recall < 0.6 and either.precision == 1
    assert gauss.f1 < 0.2 and abs(gauss.kurtosis) < 0.5
    assert dead.examples == 0 and dead.ngram == () and math.isnan(dead.f1) and math.isnan(dead.token_entropy)
    assert math.isnan(narrow.kurtosis) and sparse.kurtosis > 10
    assert x.token_entropy == 0 and x.clusters >= 1
    s = summary(rows, "synthetic")
    assert s.units == 7 and s.dead == 1 and s.explained == pytest.approx(3 / 6)


def _held_out(tokens, acts, unit, k=20, fire_share=0.5):
    """From the activations themselves: each held-out token's value, whether it fires, and whether it is one of
    the odd-ranked top examples (counted exactly), given the search tokens (the even-ranked examples' windows)."""
    n_ctx, length, _ = acts.shape
    values = acts[:, :, unit].flatten().float()
    scored = [g for g in range(n_ctx * length) if g % length >= SKIP]
    top = sorted(scored, key=lambda g: (-float(values[g]), g))[:k]  # larger first, then earlier
    tau = fire_share * float(values[top[0]])
    if tau <= 0:  # never active: nothing to explain
        return ()
    search = {g + off for g in top[0::2] for off in range(-WINDOW_BEFORE, WINDOW_AFTER + 1) if SKIP <= g % length + off < length}
    exact = set(top[1::2]) - search
    return [(g, float(values[g]), float(values[g]) >= tau, g in exact) for g in scored if g not in search]


def _matches(tokens, g, ngram) -> bool:
    flat, n = tokens.flatten(), len(ngram)
    return g % tokens.shape[1] >= n - 1 and flat[g - n + 1 : g + 1].tolist() == list(ngram)


def _stratum(value: float) -> int:
    return int(STRATUM_OF_BIN[value_bins(torch.tensor([value]))][0])


@pytest.mark.parametrize("which", ["all", "few"])
def test_weighted_precision_and_recall_match_the_whole_corpus(synthetic, which):
    """With every range enumerated (at most n_samples tokens each) the estimates are the counts; with 5 samples per
    range, the firing and matched tokens are within 4 standard errors of the stratified estimator."""
    tokens, acts, few, every = synthetic[which]
    with Index(every if which == "all" else few) as index:
        rows = polysemanticity(index)
    for unit, row in enumerate(rows):
        if not row.ngram:
            continue
        held = _held_out(tokens, acts, unit)
        fire = sum(f for _, _, f, _ in held)
        hit = sum(f and _matches(tokens, g, row.ngram) for g, _, f, _ in held)
        predicted = sum(_matches(tokens, g, row.ngram) for g, _, _, _ in held)
        if row.held_out_firing > 0:  # hits / matches = precision, with the matches counted, not sampled
            assert row.precision * predicted == pytest.approx(row.recall * row.held_out_firing)
        if which == "all":
            assert row.held_out_firing == pytest.approx(fire) and row.recall == pytest.approx(hit / fire)
            continue
        for estimate, truth, what in ((row.held_out_firing, fire, "fire"), (row.recall * row.held_out_firing, hit, "hit")):
            strata = Counter(), Counter()
            for g, v, f, exact in held:
                if not exact:
                    strata[0][_stratum(v)] += 1
                    strata[1][_stratum(v)] += f and (what == "fire" or _matches(tokens, g, row.ngram))
            var = sum(
                n * n * (1 - min(5, n) / n) * (strata[1][s] / n) * (1 - strata[1][s] / n) / min(5, n)
                for s, n in strata[0].items()
            )
            assert abs(estimate - truth) <= 4 * math.sqrt(var) + 1e-6, (unit, what)


# -- a real build: the tiny Llama's neurons and a random SAE's features ------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """An index of the tiny Llama's 48 neurons of block 0 and a random SAE's 64 features on block 1's residual stream,
    over 24 contexts of 32 tokens with every range's tokens sampled (672 tokens, n_samples 1024), and each unit's
    activations on every stored token from a forward pass of its own: (db, tokens [C, L], acts [C, L, 112])."""
    from test_index_features import random_dictionary

    root, m = tmp_path_factory.mktemp("real"), tiny_lm()
    sae = random_dictionary(["blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"])
    settings = IndexSettings(contexts=(0, 24), ctx_len=LENGTH, batch_size=4, k=20, n_samples=1024)
    db = build_index(m, root / "real.duckdb", sites=SITES, settings=settings, progress=False, dictionaries={"res1": sae})
    with Index(db) as index:
        tokens = index.con.execute("SELECT token FROM tokens ORDER BY ctx, pos").fetchnumpy()["token"]
    tokens = torch.from_numpy(tokens.astype(np.int64)).view(24, LENGTH)
    with torch.no_grad():
        cache = m.run(tokens, read=[SITES[0], sae.cfg.read_sites[0]], logits=False).cache
        acts = torch.cat([cache[SITES[0]], sae.encode_dense(cache[sae.cfg.read_sites[0]])], -1).float()
    return db, tokens, acts


def _scored(acts, unit) -> torch.Tensor:
    return acts[:, SKIP:, unit].flatten().double()


def test_density_kurtosis_and_entropy_against_a_direct_pass(real):
    db, tokens, acts = real
    with Index(db) as index:
        rows = polysemanticity(index)
    assert len(rows) == 48 + 64 and rows[48].unit.name == "f:res1:0"
    for unit, row in enumerate(rows):
        x = _scored(acts, unit)
        assert row.density == pytest.approx(float((x > 0).double().mean()), abs=1e-12)
        centred = x - x.mean()
        exact = float((centred**4).mean() / (centred**2).mean() ** 2 - 3) if x.std() > 0 else math.nan
        if x.std() > 0.25 * abs(x.mean()):  # wide enough for the histogram
            assert abs(row.kurtosis - exact) <= 0.05 * (exact + 3) + 0.05, unit
        else:
            assert math.isnan(row.kurtosis)
        values = acts[:, :, unit].flatten()
        top = sorted((g for g in range(tokens.numel()) if g % LENGTH >= SKIP), key=lambda g: (-float(values[g]), g))[:20]
        counts = Counter(int(tokens.flatten()[g]) for g in top if values[g] > 0)
        n = sum(counts.values())
        assert row.examples == n
        if n:
            assert row.token_entropy == pytest.approx(-sum(c / n * math.log2(c / n) for c in counts.values()), abs=1e-9)


def test_kurtosis_from_five_samples_per_range_is_within_a_few_percent(tmp_path):
    """The usual index: 5 samples per range over 96 contexts (2,688 tokens a unit), so most bins are estimated from
    their samples, not enumerated: within 8 % of 3 + kurtosis everywhere, within 2 % at the median."""
    from test_index_features import random_dictionary

    m = tiny_lm()
    sae = random_dictionary(["blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"])
    settings = IndexSettings(contexts=(0, 96), ctx_len=LENGTH, batch_size=8, k=20, n_samples=5)
    db = build_index(m, tmp_path / "few.duckdb", sites=SITES, settings=settings, progress=False, dictionaries={"res1": sae})
    with Index(db) as index:
        rows = polysemanticity(index)
        tokens = index.con.execute("SELECT token FROM tokens ORDER BY ctx, pos").fetchnumpy()["token"]
    with torch.no_grad():
        cache = m.run(
            torch.from_numpy(tokens.astype(np.int64)).view(96, LENGTH), read=[SITES[0], "blocks.1.hook_resid_post"]
        ).cache
        acts = torch.cat([cache[SITES[0]], sae.encode_dense(cache["blocks.1.hook_resid_post"])], -1).float()
    errors = []
    for unit, row in enumerate(rows):
        centred = _scored(acts, unit) - _scored(acts, unit).mean()
        if not math.isnan(row.kurtosis):
            exact = float((centred**4).mean() / (centred**2).mean() ** 2 - 3)
            errors.append(abs(row.kurtosis - exact) / (exact + 3))
    assert len(errors) > 50 and max(errors) < 0.08 and np.median(errors) < 0.02


def _average_linkage(sim: list[list[float]], threshold: float) -> int:
    """Clusters left after merging the pair of largest mean pairwise similarity while it is >= threshold (by definition)."""
    groups = [[i] for i in range(len(sim))]
    while len(groups) > 1:
        score, a, b = max(
            (sum(sim[i][j] for i in p for j in q) / (len(p) * len(q)), a, b)
            for a, p in enumerate(groups)
            for b, q in enumerate(groups)
            if a < b
        )
        if score < threshold:
            break
        groups[a] += groups.pop(b)
    return len(groups)


def test_context_clusters_against_their_definition(real):
    db, tokens, acts = real
    flat = tokens.flatten().tolist()
    seen = [t for g, t in enumerate(flat) if g % LENGTH >= 1]
    idf = {t: math.log(len(seen) / c) for t, c in Counter(seen).items()}
    with Index(db) as index:
        rows = polysemanticity(index, settings=PolySettings(similarity=0.2))
        for row in rows[::3]:
            examples = [ex for ex in index.top(row.unit, 20) if ex.value > 0]
            bags = [{flat[ex.ctx * LENGTH + p] for p in range(max(1, ex.pos - WINDOW_BEFORE), ex.pos + 1)} for ex in examples]
            norm = [math.sqrt(sum(idf[t] ** 2 for t in b)) for b in bags]
            sim = [
                [sum(idf[t] ** 2 for t in a & b) / (na * nb) for b, nb in zip(bags, norm, strict=True)]
                for a, na in zip(bags, norm, strict=True)
            ]
            assert row.clusters == _average_linkage(sim, 0.2), row.unit.name


def _best_ngram(tokens, acts, unit, k=20, fire_share=0.5):
    """The explanation chosen by brute force: the largest F1 on the even-ranked examples' windows, then the fewest
    tokens, the most firing tokens matched, the smallest key."""
    values = acts[:, :, unit].flatten()
    flat, length = tokens.flatten().tolist(), tokens.shape[1]
    top = sorted((g for g in range(len(flat)) if g % length >= SKIP), key=lambda g: (-float(values[g]), g))[:k]
    tau = fire_share * float(values[top[0]])
    if tau <= 0:  # never active: nothing to explain
        return ()
    search = {g + o for g in top[0::2] for o in range(-WINDOW_BEFORE, WINDOW_AFTER + 1) if SKIP <= g % length + o < length}
    firing = {g for g in search if values[g] >= tau}
    candidates = {tuple(flat[g - n + 1 : g + 1]) for g in top[0::2] if values[g] >= tau for n in (1, 2, 3)}
    scores = []
    for c in candidates:
        matched = {g for g in search if _matches(tokens, g, c)}
        tp = len(matched & firing)
        scores.append((-2 * tp / (len(matched) + len(firing)), len(c), -tp, ngram_key(c), c))
    return min(scores)[-1] if scores else ()


def test_the_explanation_is_the_best_ngram_and_its_scores_are_the_counts(real):
    db, tokens, acts = real
    with Index(db) as index:
        rows = polysemanticity(index)
    for unit, row in enumerate(rows):
        assert row.ngram == _best_ngram(tokens, acts, unit), row.unit.name
        if not row.ngram:
            continue
        held = _held_out(tokens, acts, unit)
        fire = sum(f for _, _, f, _ in held)
        hit = sum(f and _matches(tokens, g, row.ngram) for g, _, f, _ in held)
        predicted = sum(_matches(tokens, g, row.ngram) for g, _, _, _ in held)
        assert row.held_out_firing == pytest.approx(fire)
        assert _same(row.precision, hit / predicted if predicted else math.nan)
        assert _same(row.recall, hit / fire if fire else math.nan)
        assert _same(row.f1, 2 * hit / (predicted + fire) if predicted + fire else math.nan)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


def test_units_sites_and_dictionaries_select_the_same_rows(real):
    db, _, _ = real
    with Index(db, model=tiny_lm()) as index:
        every = {r.unit.name: r for r in polysemanticity(index)}
        assert [r.unit.name for r in polysemanticity(index, site="0")] == [f"0:{i}" for i in range(48)]
        for how in ({"dictionary": "res1"}, {"dictionary": "f:res1"}, {"site": "f:res1"}):
            assert [r.unit.name for r in polysemanticity(index, **how)] == [f"f:res1:{i}" for i in range(64)]
        picked = polysemanticity(index, units=["f:res1:3", "0:5", 7])
        assert [r.unit.name for r in picked] == ["0:5", "0:7", "f:res1:3"]
        for r in picked:
            assert str(r) == str(every[r.unit.name])
        named = [r for r in picked if r.ngram]
        assert named and all(r.ngram_tokens == tuple(index.decode(list(r.ngram))) for r in named)


@pytest.mark.parametrize(
    "how, message",
    [
        (
            {"site": "blocks.2.mlp.hook_post"},
            "site 'blocks.2.mlp.hook_post' is not in this index: it holds blocks.0.mlp.hook_post, f:res1",
        ),
        ({"units": ["0:48"]}, "unit '0:48' out of range: blocks.0.mlp.hook_post has units 0..47"),
        ({"units": ["f:res1:64"]}, "unit 'f:res1:64' out of range: f:res1 has units 0..63"),
        ({"dictionary": "res2"}, "dictionary 'res2' is not in this index: it holds res1"),
        ({"site": "0", "dictionary": "res1"}, "give one of units, site or dictionary, not site and dictionary"),
    ],
)
def test_bad_input_gets_one_line(real, how, message):
    with Index(real[0]) as index, pytest.raises(MechscopeError) as err:
        polysemanticity(index, **how)
    assert str(err.value) == message


def test_bad_settings_get_one_line():
    with pytest.raises(MechscopeError, match=r"^fire_share 0 is out of range: valid values are numbers in \(0, 1\]$"):
        PolySettings(fire_share=0)
    with pytest.raises(MechscopeError, match="similarity 'x' is out of range"):
        PolySettings(similarity="x")


# -- the command ----------------------------------------------------------------------------------------


@pytest.fixture
def run(monkeypatch, capsys):
    """The `mechscope` command in-process on the tiny model: (exit code, stdout, stderr)."""
    monkeypatch.setattr(cli_poly, "_load", lambda *_: tiny_lm())
    return lambda *args: invoke_cli(monkeypatch, capsys, *args, width=250, consoles=(cli_poly,))


def test_the_command_prints_the_headline_and_writes_every_file(real, run, tmp_path):
    db = real[0]
    out = tmp_path / "out"
    code, text, err = run("polysemanticity", "--db", db, "--site", "0", "--dict", "res1", "--unit", "0:5",
                          "--csv", out / "u.csv", "--json", out / "u.json", "--png", out / "u.png")  # fmt: skip
    assert code == 0, err
    with Index(db) as index:
        rows = polysemanticity(index, site="0")
        s = summary(rows, "blocks.0.mlp.hook_post")
    line = next(row for row in text.splitlines() if "blocks.0.mlp.hook_post" in row and "%" in row)
    assert f"{s.explained:.1%}" in line and f"{s.median_entropy:.2f}" in line and "0:5" in text
    payload = json.loads((out / "u.json").read_text())
    assert [g["group"] for g in payload["summaries"]] == ["blocks.0.mlp.hook_post", "f:res1"]
    assert len(payload["units"]) == 48 + 64 and payload["summaries"][0]["explained"] == pytest.approx(s.explained)
    with (out / "u.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert (
        len(table) == 48 + 64
        and table[5]["unit"] == "0:5"
        and float(table[5]["f1"] or "nan") == pytest.approx(rows[5].f1, nan_ok=True)
    )
    assert (out / "u.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--site", "9"], "site '9' is not in this index: it holds blocks.0.mlp.hook_post, f:res1"),
        (["--unit", "0:48"], "unit '0:48' out of range: blocks.0.mlp.hook_post has units 0..47"),
        (["--dict", "res2"], "dictionary 'res2' is not in this index: it holds res1"),
        (["--csv", "out.txt"], "--csv 'out.txt' does not end in .csv"),
        (["--fire-share", "2"], "--fire-share 2.0 is out of range: valid values are numbers in (0, 1]"),
        (["--unit", "0:1", "--png", "x.png"], "--png plots groups of units: give --site or --dict as well as --unit"),
    ],
)
def test_the_command_refuses_bad_input_in_one_line(real, run, args, message):
    code, out, err = run("polysemanticity", "--db", real[0], *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in out + err
