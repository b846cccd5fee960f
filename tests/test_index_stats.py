"""UnitStats against brute force: top-k with ties, windows, histograms, samples, sums; merging shards; and the
samples against synthetic units whose distribution over the corpus is known."""

from __future__ import annotations

import math

import pytest
import torch

from mechscope.index.stats import (
    N_STRATA,
    NO_TOKEN,
    STRATUM_OF_BIN,
    WINDOW_AFTER,
    WINDOW_BEFORE,
    ZERO_STRATUM,
    UnitStats,
    bin_edges,
    sample_priorities,
    stratum_range,
    value_bins,
)

CTX, N_CTX, UNITS, K, R = 12, 5, 9, 6, 3


def _batches(n_batches: int = 4, seed: int = 0):
    """Activations [contexts, CTX - 1, units] per batch, rounded so that ties are common."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N_CTX, CTX - 1, UNITS, generator=g) * 3).round(decimals=0) / 2 for _ in range(n_batches)]


def _fold(stats: UnitStats, batch: torch.Tensor, first_ctx: int) -> None:
    positions = torch.arange(1, CTX).repeat(N_CTX)
    tokens = (first_ctx + torch.arange(N_CTX).repeat_interleave(CTX - 1)) * CTX + positions
    flat = batch.reshape(-1, UNITS)
    stats.update(0, flat[:, :4], tokens, positions)  # two "sites" sharing the tokens
    stats.update(4, flat[:, 4:], tokens, positions, count_tokens=False)


def _build(batches, first_batch: int = 0) -> UnitStats:
    stats = UnitStats.empty(UNITS, k=K, n_samples=R)
    for i, batch in enumerate(batches):
        _fold(stats, batch, (first_batch + i) * N_CTX)
    return stats


def test_bins_follow_edges():
    x = torch.cat([torch.randn(20_000) * 10, torch.randn(2_000) * 1e-3, torch.tensor([0.0, -0.0, 1e-30, 2e3, -2e3, 1024.0])])
    edges = bin_edges()
    positive = torch.searchsorted(edges, x.double(), right=True) - 1  # [lo, hi) for x >= 0
    negative = torch.searchsorted(edges, x.double(), right=False) - 1  # (lo, hi] for x < 0
    assert torch.equal(value_bins(x).long(), torch.where(x < 0, negative, positive))


def test_update_matches_brute_force():
    batches = _batches()
    stats = _build(batches)
    acts = torch.cat(batches)  # [contexts, CTX - 1, units]
    flat = acts.reshape(-1, UNITS)
    pos = torch.arange(1, CTX).repeat(len(acts))
    token = torch.arange(len(acts)).repeat_interleave(CTX - 1) * CTX + pos
    assert int(stats.tokens) == len(flat)
    assert torch.allclose(stats.total, flat.double().sum(0)) and torch.allclose(stats.total_sq, (flat.double() ** 2).sum(0))
    assert torch.equal(stats.active, (flat > 0).sum(0))
    for u in range(UNITS):
        v = flat[:, u]
        best = sorted(range(len(v)), key=lambda i: (-float(v[i]), int(token[i])))[:K]
        assert stats.top_tokens[u].tolist() == [int(token[i]) for i in best]
        assert stats.top_values[u].tolist() == [float(v[i]) for i in best]
        for rank, i in enumerate(best):  # the window: this unit's activations around the example, in its context
            ctx, p = divmod(int(token[i]), CTX)
            want = [float(acts[ctx, q - 1, u]) if 1 <= q < CTX else None for q in range(p - WINDOW_BEFORE, p + WINDOW_AFTER + 1)]
            got = stats.top_windows[u, rank].float().tolist()
            assert [None if g != g else g for g in got] == want
        counts = torch.bincount(value_bins(v).long(), minlength=stats.hist.shape[1])
        assert torch.equal(stats.hist[u], counts)
        for s in range(N_STRATA):  # each stratum keeps its R tokens of smallest priority, in that order
            inside = [i for i in range(len(v)) if _stratum_of(float(v[i])) == s]
            prio = sample_priorities(token[inside], torch.tensor(u), seed=0).tolist()
            want = [int(token[inside[j]]) for j in sorted(range(len(inside)), key=lambda j: prio[j])[:R]]
            assert [t for t in stats.sample_tokens[u, s].tolist() if t != NO_TOKEN] == want
            assert stats.sample_tokens[u, s, len(want) :].eq(NO_TOKEN).all()
            assert stats.sample_values[u, s, : len(want)].tolist() == [float(flat[t_index(t), u]) for t in want]


def t_index(token: int) -> int:
    """Row of a global token index in the flattened activations of `_batches`."""
    ctx, pos = divmod(token, CTX)
    return ctx * (CTX - 1) + pos - 1


def _stratum_of(x: float) -> int:
    """The stratum holding x, from `stratum_range` (positive [low, high), negative (low, high], middle open)."""
    for s in range(N_STRATA):
        low, high = stratum_range(s)
        if s > ZERO_STRATUM and low <= x < high or s < ZERO_STRATUM and low < x <= high or s == ZERO_STRATUM and low < x < high:
            return s
    raise AssertionError(x)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_merged_shards_equal_one_pass(split):
    batches = _batches()
    whole = _build(batches)
    merged = _build(batches[:split]).merge(_build(batches[split:], first_batch=split))
    for name, tensor in whole.tensors().items():
        if tensor.dtype == torch.float64:
            assert torch.allclose(merged.tensors()[name], tensor, rtol=1e-12), name
        else:  # exactly equal (NaN marks the same window slots)
            assert torch.equal(merged.tensors()[name].nan_to_num(-99), tensor.nan_to_num(-99)), name


def test_strata_are_whole_octaves_of_bins():
    edges = bin_edges()
    for s in range(N_STRATA):
        bins = STRATUM_OF_BIN.eq(s).nonzero()[:, 0]
        assert bins.tolist() == list(range(int(bins[0]), int(bins[-1]) + 1))  # contiguous
        assert stratum_range(s) == (float(edges[bins[0]]), float(edges[bins[-1] + 1]))
    assert stratum_range(0)[0] == -math.inf and stratum_range(N_STRATA - 1)[1] == math.inf


# -- the samples are a uniform sample of each range ------------------------------------------------

N_CONTEXTS, SCORED, SAMPLES = 2000, 60, 100  # 120,000 tokens; 100 samples per range


def _synthetic() -> tuple[UnitStats, torch.Tensor, torch.Tensor]:
    """Three units over 2,000 contexts of 60 scored positions: (stats, activations [tokens, 3], global token index).

    Unit 0: N(0, 1) noise, the same law everywhere. Unit 1: a value in [1, 2) on 1 position in 60 in the first
    1,000 contexts and on 3 in 60 in the last 1,000 (so [1, 2) holds 25 % / 75 % from each half), else 0.
    Unit 2: minus unit 0 (negative values mirror the positive ones).
    """
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(N_CONTEXTS, SCORED, generator=g)
    sparse = torch.zeros(N_CONTEXTS, SCORED)
    per_context = torch.where(torch.arange(N_CONTEXTS) < N_CONTEXTS // 2, 1, 3)
    for c in range(N_CONTEXTS):
        where = torch.randperm(SCORED, generator=g)[: per_context[c]]
        sparse[c, where] = 1 + 0.99 * torch.rand(len(where), generator=g)
    acts = torch.stack([noise, sparse, -noise], -1).reshape(-1, 3)
    positions = torch.arange(4, 4 + SCORED).repeat(N_CONTEXTS)
    token = torch.arange(N_CONTEXTS).repeat_interleave(SCORED) * (4 + SCORED) + positions
    stats = UnitStats.empty(3, k=4, n_samples=SAMPLES, seed=7)
    for rows in torch.arange(len(acts)).split(50 * SCORED):  # 40 batches of 50 contexts
        stats.update(0, acts[rows], token[rows], positions[rows])
    return stats, acts, token


def _members(acts: torch.Tensor, unit: int, s: int) -> torch.Tensor:
    """Indices of the tokens whose activation of `unit` lies in stratum s (the population of the range)."""
    return (STRATUM_OF_BIN[value_bins(acts[:, unit]).long()] == s).nonzero()[:, 0]


def test_samples_spread_over_the_corpus_as_the_range_does():
    """Each well-filled range of unit 0 (either sign): its samples' mean context and mean position match the
    range's own within 4 standard errors, and a chi-square over context deciles stays below its 0.1 % point."""
    stats, acts, token = _synthetic()
    checked = 0
    for s in range(N_STRATA):
        population = _members(acts, 0, s)
        if len(population) < 10 * SAMPLES:
            continue
        kept = stats.sample_tokens[0, s]
        assert (kept != NO_TOKEN).all(), f"stratum {s} is not full"
        ctx, pos = kept // (4 + SCORED), kept % (4 + SCORED)
        pop_ctx, pop_pos = token[population] // (4 + SCORED), token[population] % (4 + SCORED)
        for got, pop in ((ctx.double(), pop_ctx.double()), (pos.double(), pop_pos.double())):
            error = pop.std() / math.sqrt(SAMPLES)
            assert abs(got.mean() - pop.mean()) < 4 * error, (s, float(got.mean()), float(pop.mean()))
        edges = torch.arange(1, 10) * N_CONTEXTS // 10
        decile = torch.bucketize(ctx, edges, right=True)
        expected = torch.bincount(torch.bucketize(pop_ctx, edges, right=True), minlength=10).double() / len(population) * SAMPLES
        chi2 = float(((torch.bincount(decile, minlength=10) - expected) ** 2 / expected).sum())
        assert chi2 < 27.88, (s, chi2)  # chi-square with 9 degrees of freedom: P(> 27.88) = 0.001
        assert len(set(ctx.tolist())) > 0.9 * SAMPLES  # not a few sentences
        checked += 1
    assert checked >= 6  # ranges of both signs around the mode


def test_samples_follow_the_range_not_the_corpus_order():
    """Unit 1's [1, 2) range has 1/4 of its tokens in the first half of the corpus: so do its samples
    (binomial, 100 draws: 25 +- 13 is beyond 3 standard deviations), where the first tokens seen would all be."""
    stats, acts, token = _synthetic()
    s = ZERO_STRATUM + 1 + 10  # [2^0, 2^1)
    assert stratum_range(s) == (1.0, 2.0)
    population = _members(acts, 1, s)
    assert len(population) == 4000
    kept = stats.sample_tokens[1, s]
    first_half = int((kept // (4 + SCORED) < N_CONTEXTS // 2).sum())
    assert 12 <= first_half <= 38, first_half
    assert set(kept.tolist()) <= set(token[population].tolist())


def test_negative_ranges_get_samples_and_units_draw_their_own():
    stats, acts, token = _synthetic()
    for s in range(N_STRATA):  # unit 2 is minus unit 0: every range holds as many tokens as its mirror
        n = len(_members(acts, 2, s))
        assert int((stats.sample_tokens[2, s] != NO_TOKEN).sum()) == min(n, SAMPLES)
        low, high = stratum_range(s)
        values = stats.sample_values[2, s][stats.sample_tokens[2, s] != NO_TOKEN]
        assert ((values > low) & (values <= high) if s < ZERO_STRATUM else (values >= low) & (values < high)).all()
    negative = stats.sample_tokens[2, :ZERO_STRATUM]
    assert int((negative != NO_TOKEN).sum()) > 5 * SAMPLES
    # same tokens in the mirrored range, but drawn with the unit's own priorities: hardly any in common
    s = ZERO_STRATUM + 1 + 9  # [0.5, 1) of unit 0 is (-1, -0.5] of unit 2: the same 18,000 tokens or so
    shared = set(stats.sample_tokens[0, s].tolist()) & set(stats.sample_tokens[2, N_STRATA - 1 - s].tolist())
    assert torch.equal(_members(acts, 0, s), _members(acts, 2, N_STRATA - 1 - s)) and len(shared) < 10
