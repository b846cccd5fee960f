"""UnitStats against brute force: top-k with ties, windows, histograms, samples, sums; merging shards."""

from __future__ import annotations

import pytest
import torch

from mechscope.index.stats import (
    N_STRATA,
    NO_TOKEN,
    WINDOW_AFTER,
    WINDOW_BEFORE,
    UnitStats,
    bin_edges,
    stratum_edges,
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
        edges = stratum_edges().tolist() + [float("inf")]
        for s in range(N_STRATA):
            upper = edges[s + 1] if s < N_STRATA - 1 else float("inf")
            first = [int(token[i]) for i in range(len(v)) if edges[s] <= v[i] < upper][:R]
            assert [t for t in stats.sample_tokens[u, s].tolist() if t != NO_TOKEN] == first
            assert int(stats.sample_fill[u, s]) == len(first)


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
