"""How polysemantic each unit is, measured from what an index already stores (no model pass).

For every unit (a neuron, any site's dimension, a dictionary feature), from the index's statistics,
histogram, top examples (with the activations around them), stratified samples and stored tokens:

1. density: share of tokens above the build's activity threshold (stored);
2. kurtosis: excess kurtosis of the unit's activations over the corpus, estimated from the histogram,
   its bins' samples and the exact top-k values (`_kurtosis`);
3. token entropy (our own): bits, of the token ids the unit's active top examples sit on;
4. context clusters (our own): groups among the contexts of its active top examples, by average-linkage
   agglomeration of IDF-weighted token-set cosine similarities (`_clusters`);
5. explanation: the n-gram (n <= 3, ending at the firing token) that best separates firing tokens
   (activation >= fire_share x max) in the windows of the even-ranked top examples, scored as a
   detector of firing over the rest of the corpus: the odd-ranked top examples exactly, every other
   token through the stratified samples, each weighted by the tokens of its range over the samples
   drawn there, and the n-gram's exact count in the stored tokens (`_explain`).

Phases of `polysemanticity`: read the stored tokens once (n-gram keys, counts, IDF), then for each
chunk of units read its rows of `units`, `hist`, `top` and `samples` and compute every metric as array
operations over the chunk. docs/polysemanticity.md defines each metric and cites its sources.

Shapes: U units in a chunk, K top examples, W window positions, J search tokens, C candidates, B bins, S strata.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from mechscope.errors import MechscopeError, one_of
from mechscope.index.features import PREFIX
from mechscope.index.query import Index, UnitInfo
from mechscope.index.stats import N_STRATA, STRATUM_OF_BIN, WINDOW, WINDOW_AFTER, WINDOW_BEFORE, bin_edges, value_bins

CHUNK = 256  # units computed together, at most
WORK = 4_000_000  # and about this many candidate-token comparisons
TOKEN_BITS = 20  # an n-gram key holds n in its top bits and up to three token ids of 20 bits
NARROW = 0.25  # kurtosis is not estimated where std < NARROW * |mean|: the histogram cannot resolve the spread


@dataclass(frozen=True)
class PolySettings:
    """How the metrics are measured. Raises `MechscopeError` for a value out of range."""

    fire_share: float = 0.5
    """A token counts as firing for the explanation score when the unit's activation is at least this share of its max."""
    similarity: float = 0.3
    """Context clusters: groups of top examples merge while their average cosine similarity is at least this."""

    def __post_init__(self):
        for name in ("fire_share", "similarity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise MechscopeError(f"{name} {value!r} is out of range: valid values are numbers in (0, 1]")


class UnitPolysemanticity(NamedTuple):
    unit: UnitInfo
    density: float
    """Share of the index's tokens on which the unit is above the build's activity threshold."""
    kurtosis: float
    """Excess kurtosis (0 for a Gaussian) of the unit's activations, estimated from its histogram with the top-k exact;
    NaN for a unit that never varies, or whose std is under a quarter of |mean| (too narrow for the histogram)."""
    token_entropy: float
    """Entropy in bits of the token ids its active top examples sit on (0: all one token; log2(examples) at most); NaN if dead."""
    examples: int
    """Active top examples (above the threshold) that the entropy and the clusters are over."""
    clusters: int
    """Groups among the contexts of those examples (singletons count); 0 if dead."""
    ngram: tuple[int, ...]
    """Token ids of the best explanation, the firing token last; () when the unit has none (it never fired)."""
    ngram_tokens: tuple[str, ...] | None
    """The same tokens as text (None without a tokenizer)."""
    fire_threshold: float
    """fire_share x the unit's max: a token fires when the unit's activation is at least this."""
    precision: float
    """Estimated share of held-out tokens matching the n-gram that fire (NaN if none match)."""
    recall: float
    """Estimated share of held-out firing tokens that match the n-gram (NaN if none fire)."""
    f1: float
    """Harmonic mean of precision and recall (0 when either is 0 or undefined with the other positive; NaN when both are)."""
    held_out_firing: float
    """Estimated held-out tokens that fire: how much evidence recall rests on."""


class PolySummary(NamedTuple):
    group: str
    units: int
    dead: int
    """Units never above the activity threshold; left out of every median and of `explained`."""
    median_density: float
    median_kurtosis: float
    median_entropy: float
    median_clusters: float
    median_f1: float
    explained: float
    """Share of the live units whose explanation has F1 >= 0.5: the headline number."""


def polysemanticity(
    index: Index,
    units: Sequence[str | int] | None = None,
    site: str | None = None,
    dictionary: str | None = None,
    settings: PolySettings | None = None,
) -> list[UnitPolysemanticity]:
    """Every metric for `units` (names or numbers), or every unit of `site`, or of `dictionary` (its name in the
    index, `NAME` or `f:NAME`), or, with none of them, every unit of the index.

    >>> rows = polysemanticity(index, site="blocks.15.mlp.hook_post")
    >>> summary(rows).explained
    """
    settings = settings or PolySettings()
    index._ready()
    ids = _unit_ids(index, units, site, dictionary)
    corpus = _Corpus(index)
    k = int(index.meta["k"])
    chunk = max(1, min(CHUNK, WORK // (k * k * WINDOW)))  # the search compares ~k/2 * 3 candidates with ~k/2 * W tokens
    out: list[UnitPolysemanticity] = []
    for start in range(0, len(ids), chunk):
        out += _measure(index, corpus, ids[start : start + chunk], settings)
    return out


def summary(rows: Sequence[UnitPolysemanticity], group: str = "") -> PolySummary:
    """Medians over the live units, and the share of them with explanation F1 >= 0.5."""
    live = [r for r in rows if r.examples > 0]

    def median(values) -> float:
        values = np.array(values, np.float64)
        return float(np.median(values[~np.isnan(values)])) if (~np.isnan(values)).any() else math.nan

    f1 = np.array([r.f1 for r in live], np.float64)
    return PolySummary(
        group, len(rows), len(rows) - len(live), median([r.density for r in live]), median([r.kurtosis for r in live]),
        median([r.token_entropy for r in live]), median([r.clusters for r in live]), median(f1),
        float(np.mean(np.nan_to_num(f1, nan=0.0) >= 0.5)) if live else math.nan,
    )  # fmt: skip


def _unit_ids(index: Index, units, site, dictionary) -> np.ndarray:
    given = [name for name, value in (("units", units), ("site", site), ("dictionary", dictionary)) if value is not None]
    if len(given) > 1:
        raise MechscopeError(f"give one of units, site or dictionary, not {' and '.join(given)}")
    if units is not None:
        return np.array(sorted({index.unit(u).id for u in units}), np.int64)
    if dictionary is not None:
        name = dictionary if dictionary.startswith(PREFIX) else PREFIX + dictionary
        held = [s.site for s in index.sites if s.site.startswith(PREFIX)]
        if name not in held:
            holds = f"it holds {one_of([h[len(PREFIX) :] for h in held])}" if held else "it holds no dictionary's features"
            raise MechscopeError(f"dictionary {dictionary!r} is not in this index: {holds}")
        site = name
    chosen = [index._site(site)] if site is not None else index.sites
    return np.concatenate([np.arange(s.first_unit, s.first_unit + s.width) for s in chosen]).astype(np.int64)


# -- the stored tokens ------------------------------------------------------------------------------


def ngram_key(ids: Sequence[int]) -> int:
    """The key of an n-gram of token ids (n = 1..3): n in the top bits, then the ids, the last lowest."""
    key = len(ids) << 60
    for i, t in enumerate(reversed(ids)):
        key |= int(t) << (TOKEN_BITS * i)
    return key


def ngram_ids(key: int) -> tuple[int, ...]:
    n, mask = key >> 60, (1 << TOKEN_BITS) - 1
    return tuple((key >> (TOKEN_BITS * i)) & mask for i in reversed(range(n)))


class _Corpus:
    """The index's stored tokens, flat by global token index (ctx * ctx_len + pos) from the first stored context."""

    def __init__(self, index: Index):
        got = index.con.execute("SELECT ctx, pos, token FROM tokens").fetchnumpy()
        self.length = length = index.ctx_len
        skip = int(index.meta["skip"])
        ctx = got["ctx"].astype(np.int64)
        self.first = int(ctx.min()) * length
        self.ids = np.full((int(ctx.max()) + 1) * length - self.first, -1, np.int64)  # [G]
        self.ids[ctx * length + got["pos"] - self.first] = got["token"]
        if self.ids.max() >= 1 << TOKEN_BITS:
            raise MechscopeError(f"token id {self.ids.max()} is beyond the 2^{TOKEN_BITS} ids that n-gram keys hold")
        pos = (np.arange(len(self.ids)) + self.first) % length
        self.keys = np.full((3, len(self.ids)), -1, np.int64)  # [n, G]
        for n in (1, 2, 3):
            key, ok = np.full(len(self.ids), n << 60, np.int64), pos >= n - 1
            for back in range(n):
                before = np.roll(self.ids, back)
                key |= before << (TOKEN_BITS * back)
                ok &= before >= 0
            self.keys[n - 1, ok] = key[ok]
        scored_keys = self.keys[:, (pos >= skip) & (self.ids >= 0)].ravel()
        self.sorted_keys = np.sort(scored_keys[scored_keys >= 0])
        seen = self.ids[(pos >= 1) & (self.ids >= 0)]  # every token but the start token
        counts = np.bincount(seen, minlength=int(self.ids.max()) + 1)
        self.idf = np.log(len(seen) / np.maximum(counts, 1))  # [V]

    def keys_at(self, g: np.ndarray) -> np.ndarray:
        """[..., 3] keys of the 1-, 2- and 3-grams ending at global token indices `g` (-1 where g is -1 or none)."""
        at = np.where(g >= 0, g - self.first, 0)
        return np.where((g >= 0)[..., None], np.moveaxis(self.keys[:, at], 0, -1), -1)

    def ids_at(self, g: np.ndarray) -> np.ndarray:
        return np.where(g >= 0, self.ids[np.where(g >= 0, g - self.first, 0)], -1)

    def count(self, keys: np.ndarray) -> np.ndarray:
        """How often each key occurs at the scored positions of the stored tokens."""
        return np.searchsorted(self.sorted_keys, keys, "right") - np.searchsorted(self.sorted_keys, keys, "left")


# -- one chunk of units ------------------------------------------------------------------------------


class _Rows(NamedTuple):
    """What the index holds on a chunk of U units, as arrays."""

    ids: np.ndarray  # [U] global unit numbers
    tokens: int
    mean: np.ndarray  # [U] float64
    var: np.ndarray  # [U] float64, exact from the stored sums
    active: np.ndarray  # [U] int64
    max: np.ndarray  # [U] float64
    hist: np.ndarray  # [U, B] int64
    top_values: np.ndarray  # [U, K] float32; -inf where not held
    top_g: np.ndarray  # [U, K] int64 global token index; -1 where not held
    windows: np.ndarray  # [U, K, W] float32 activations around each top example; NaN where unknown
    samples: tuple  # (row [R], stratum [R], value [R], g [R]) of every stored sample


def _read(index: Index, ids: np.ndarray) -> _Rows:
    con, length, k = index.con, index.ctx_len, int(index.meta["k"])
    where = "WHERE unit BETWEEN ? AND ? AND unit IN (SELECT unnest(?::INTEGER[]))"  # the range lets zone maps skip blocks
    args = [int(ids[0]), int(ids[-1]), ids.tolist()]
    u = con.execute(f"SELECT unit, tokens, total, total_sq, active, max FROM units {where} ORDER BY unit", args).fetchnumpy()
    n = max(int(u["tokens"][0]), 1)
    mean = u["total"] / n
    row = {int(unit): i for i, unit in enumerate(ids)}
    rows = lambda units: np.array([row[int(x)] for x in units], np.int64)  # noqa: E731
    hist = np.zeros((len(ids), len(bin_edges()) - 1), np.int64)
    h = con.execute(f"SELECT unit, bin, count FROM hist {where}", args).fetchnumpy()
    hist[rows(h["unit"]), h["bin"].astype(np.int64)] = h["count"]
    top_values, top_g = np.full((len(ids), k), -np.inf, np.float32), np.full((len(ids), k), -1, np.int64)
    windows = np.full((len(ids), k, WINDOW), np.nan, np.float32)
    t = con.execute(f"SELECT unit, rank, value, ctx, pos, window_acts FROM top {where}", args).fetchnumpy()
    r, rank = rows(t["unit"]), t["rank"].astype(np.int64)
    top_values[r, rank] = t["value"]
    top_g[r, rank] = t["ctx"].astype(np.int64) * length + t["pos"]
    if len(r):
        windows[r, rank] = np.frombuffer(b"".join(t["window_acts"]), "<f2").reshape(-1, WINDOW)
    s = con.execute(f"SELECT unit, stratum, value, ctx, pos FROM samples {where}", args).fetchnumpy()
    samples = (rows(s["unit"]), s["stratum"].astype(np.int64), s["value"], s["ctx"].astype(np.int64) * length + s["pos"])
    max_ = np.where(np.isnan(u["max"].astype(np.float64)), -np.inf, u["max"].astype(np.float64))
    return _Rows(ids, n, mean, u["total_sq"] / n - mean**2, u["active"].astype(np.int64), max_, hist, top_values, top_g,
                 windows, samples)  # fmt: skip


def _measure(index: Index, corpus: _Corpus, ids: np.ndarray, settings: PolySettings) -> list[UnitPolysemanticity]:
    rows = _read(index, ids)
    threshold = float(index.meta["threshold"])
    active_ex = (rows.top_g >= 0) & (rows.top_values > threshold)  # [U, K]
    tokens = corpus.ids_at(rows.top_g)
    entropy = _entropy(tokens, active_ex)
    clusters = _clusters(corpus, rows.top_g, active_ex, settings.similarity)
    kurtosis = _kurtosis(rows)
    best, scores = _explain(corpus, rows, settings.fire_share)
    out = []
    for i, uid in enumerate(ids):
        ngram = ngram_ids(int(best[i])) if best[i] >= 0 else ()
        text = None if index.tokenizer is None else tuple(index.decode(list(ngram)))
        live = bool(active_ex[i].any())
        out.append(
            UnitPolysemanticity(
                index.unit(int(uid)),
                float(rows.active[i] / rows.tokens),
                float(kurtosis[i]),
                float(entropy[i]) if live else math.nan,
                int(active_ex[i].sum()),
                int(clusters[i]),
                ngram,
                text,
                float(settings.fire_share * rows.max[i]) if live else math.nan,
                *(float(x[i]) for x in scores),
            )
        )
    return out


# -- the metrics -------------------------------------------------------------------------------------


def _entropy(tokens_UK: np.ndarray, active_UK: np.ndarray) -> np.ndarray:
    """[U] bits of the token distribution over each unit's active examples: -(1/n) sum_i log2(c_i / n), where c_i
    counts the examples on example i's token (each distinct token t then adds -(c_t/n) log2(c_t/n))."""
    same = (tokens_UK[:, :, None] == tokens_UK[:, None, :]) & active_UK[:, None, :]  # [U, K, K]
    count = same.sum(-1)
    n = active_UK.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = -np.where(active_UK, np.log2(np.maximum(count, 1) / np.maximum(n, 1)), 0.0).sum(-1) / n[:, 0]
    return np.where(n[:, 0] > 0, bits + 0.0, np.nan)


def _kurtosis(rows: _Rows) -> np.ndarray:
    """[U] excess kurtosis m4 / m2^2 - 3, with central moments about the exact mean estimated from the histogram: the
    top-k values exactly, and every other token of a bin at the mean over that bin's samples (the samples of a range
    are uniform over its tokens, so uniform over each bin's), or at the bin's middle where none fell in it."""
    edges = bin_edges().numpy()
    inner = np.clip(edges, edges[1], edges[-2])  # the outermost, unbounded bins at their inner edge
    dev = (inner[:-1] + inner[1:])[None, :] / 2 - rows.mean[:, None]  # [U, B]
    moments = [dev**2, dev**4]
    hist = rows.hist.astype(np.float64)
    held = np.isfinite(rows.top_values)
    r, _ = np.nonzero(held)
    np.subtract.at(hist, (r, _bins(rows.top_values[held])), 1)
    sr, _, sv, sg = rows.samples
    apart = ~np.isin(_codes(sr, sg), _codes(r, rows.top_g[held]))  # samples that are not top examples
    sr, sv = sr[apart], sv[apart].astype(np.float64)
    at = sr * hist.shape[1] + _bins(sv)
    drawn = np.bincount(at, minlength=hist.size).reshape(hist.shape)
    for i, power in enumerate((2, 4)):
        mean = np.bincount(at, (sv - rows.mean[sr]) ** power, hist.size).reshape(hist.shape) / np.maximum(drawn, 1)
        moments[i] = np.where(drawn > 0, mean, moments[i])
    top = np.where(held, rows.top_values.astype(np.float64) - rows.mean[:, None], 0.0)  # [U, K]
    m2 = ((hist * moments[0]).sum(-1) + (top**2).sum(-1)) / rows.tokens
    m4 = ((hist * moments[1]).sum(-1) + (top**4).sum(-1)) / rows.tokens
    narrow = np.sqrt(np.maximum(rows.var, 0.0)) < NARROW * np.abs(rows.mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((m2 > 0) & ~narrow & (rows.var > 0), m4 / m2**2 - 3.0, np.nan)


def _bins(values: np.ndarray) -> np.ndarray:
    """The histogram bin of each value."""
    return value_bins(torch.from_numpy(np.ascontiguousarray(values, np.float32))).numpy().astype(np.int64)


def _clusters(corpus: _Corpus, top_g: np.ndarray, active_UK: np.ndarray, similarity: float) -> np.ndarray:
    """[U] groups among the active examples' contexts: each context is the set of token ids from WINDOW_BEFORE before
    the example to the example itself (the start token left out), weighted by IDF; cosine similarity; average linkage."""
    u, k = active_UK.shape
    offsets = np.arange(-WINDOW_BEFORE, 1)
    g = top_g[:, :, None] + offsets  # [U, K, W]
    inside = active_UK[:, :, None] & ((top_g % corpus.length)[:, :, None] + offsets >= 1)  # within the context, after its start
    ids = np.where(inside, corpus.ids_at(np.where(inside, g, -1)), -1).reshape(u, -1)  # [U, K*W]
    order = np.argsort(ids, axis=1, kind="stable")
    ranked = np.take_along_axis(ids, order, 1)
    new = np.ones_like(ranked, bool)
    new[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    local = np.empty_like(order)
    np.put_along_axis(local, order, np.cumsum(new, 1) - 1, 1)  # each token's column in the unit's own vocabulary
    weight = np.where(ids >= 0, corpus.idf[np.maximum(ids, 0)], 0.0)
    bags = np.zeros((u, k, local.max() + 1 if local.size else 1))
    example = np.broadcast_to(np.repeat(np.arange(k), len(offsets))[None], ids.shape)
    bags[np.arange(u)[:, None], example, local] = weight  # a set: a repeated token is written once
    gram = np.einsum("ukv,ulv->ukl", bags, bags)
    norm = np.sqrt(np.einsum("ukk->uk", gram))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = gram / (norm[:, :, None] * norm[:, None, :])
    return average_linkage(np.nan_to_num(cos), active_UK, similarity)


def average_linkage(sim_UKK: np.ndarray, alive_UK: np.ndarray, threshold: float) -> np.ndarray:
    """[U] clusters left after merging, in each unit, the two clusters of largest average similarity while it is at
    least `threshold` (average linkage; a cluster's similarity to another is the mean over their members' pairs)."""
    u, k = alive_UK.shape
    sim = np.where(alive_UK[:, :, None] & alive_UK[:, None, :] & ~np.eye(k, dtype=bool), sim_UKK, -np.inf)
    size = alive_UK.astype(np.float64)
    rows = np.arange(u)
    for _ in range(max(k - 1, 0)):
        flat = sim.reshape(u, -1).argmax(-1)
        merge = sim.reshape(u, -1)[rows, flat] >= threshold
        if not merge.any():
            break
        r, (i, j) = rows[merge], np.divmod(flat[merge], k)
        si, sj = size[r, i][:, None], size[r, j][:, None]
        joined = (si * sim[r, i] + sj * sim[r, j]) / (si + sj)  # Lance-Williams update of average linkage
        sim[r, i], sim[r, :, i] = joined, joined
        sim[r, j], sim[r, :, j] = -np.inf, -np.inf
        sim[r, i, i] = -np.inf
        size[r, i] += size[r, j]
        size[r, j] = 0
    return (size > 0).sum(-1)


class _Search(NamedTuple):
    best: np.ndarray  # [U] the chosen n-gram's key; -1 where the unit has none
    matched: np.ndarray  # [U] search tokens it matches
    g: np.ndarray  # [U, J] the search tokens' global indices, each once; -1 in the gaps
    acts: np.ndarray  # [U, J] the unit's activations there


def _explain(corpus: _Corpus, rows: _Rows, fire_share: float) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Each unit's best n-gram key [U] (-1 where none) and its (precision, recall, f1, held_out_firing) [U] each."""
    tau = fire_share * rows.max
    found = _search(corpus, rows, tau)
    none = found.best < 0
    return np.where(none, -1, found.best), tuple(np.where(none, np.nan, x) for x in _score(corpus, rows, tau, found))


def _search(corpus: _Corpus, rows: _Rows, tau: np.ndarray) -> _Search:
    """The tokens in the windows of the even-ranked top examples (each once), labelled firing at >= tau; candidates are
    the 1-, 2- and 3-grams ending at the firing examples; the best has the largest F1 on those tokens, then the fewest
    tokens, the most firing tokens matched, the smallest key."""
    u, k = rows.top_values.shape
    search = (rows.top_g >= 0) & (np.arange(k) % 2 == 0)
    acts = rows.windows.copy()
    acts[:, :, WINDOW_BEFORE] = rows.top_values  # the example itself exactly (windows are stored as float16)
    g = rows.top_g[:, :, None] + np.arange(-WINDOW_BEFORE, WINDOW_AFTER + 1)
    g_j, a_j = _unique_rows(np.where(search[:, :, None] & ~np.isnan(acts), g, -1).reshape(u, -1), acts.reshape(u, -1))
    fires_j = (g_j >= 0) & (a_j >= tau[:, None])  # [U, J]
    keys_j = corpus.keys_at(g_j)  # [U, J, 3]
    firing = search & (rows.top_values >= tau[:, None]) & ((rows.max > 0) & (rows.active > 0))[:, None]
    cand = np.where(firing[:, :, None], corpus.keys_at(rows.top_g), -1).reshape(u, -1)  # [U, C]
    match = (keys_j[:, None, :, :] == cand[:, :, None, None]).any(-1) & (cand >= 0)[:, :, None]  # [U, C, J]
    tp, m = (match & fires_j[:, None, :]).sum(-1), match.sum(-1)
    f1 = np.where(cand >= 0, 2 * tp / np.maximum(m + fires_j.sum(-1)[:, None], 1), -1.0)
    pick = np.lexsort((cand, -tp, np.where(cand >= 0, cand >> 60, 9), -f1), axis=-1)[:, 0]
    return _Search(cand[np.arange(u), pick], m[np.arange(u), pick], g_j, a_j)


def _score(corpus: _Corpus, rows: _Rows, tau: np.ndarray, found: _Search) -> tuple[np.ndarray, ...]:
    """(precision, recall, f1, firing) of each unit's n-gram on the held-out tokens: the odd-ranked top examples outside
    the search tokens exactly, every other token through the samples outside both, each weighted by its range's
    tokens over the samples drawn there; the n-gram's matches counted exactly from the stored tokens."""
    u, k = rows.top_values.shape
    units = np.arange(u)
    n = np.clip(found.best >> 60, 1, 3) - 1  # [U] which of a token's keys to compare
    searched = found.g >= 0
    test = (rows.top_g >= 0) & (np.arange(k) % 2 == 1) & ~(rows.top_g[:, :, None] == found.g[:, None, :]).any(-1)
    t_match = test & (corpus.keys_at(rows.top_g)[units, :, n] == found.best[:, None])
    t_fire = test & (rows.top_values >= tau[:, None])
    sr, ss, sv, sg = rows.samples
    s_rows, t_rows = np.broadcast_to(units[:, None], found.g.shape), np.broadcast_to(units[:, None], test.shape)
    out = _codes(np.concatenate([s_rows[searched], t_rows[test]]), np.concatenate([found.g[searched], rows.top_g[test]]))
    keep = ~np.isin(_codes(sr, sg), out)
    sr, ss, sv, sg = sr[keep], ss[keep], sv[keep], sg[keep]
    left = rows.hist @ np.eye(N_STRATA, dtype=np.int64)[STRATUM_OF_BIN.numpy()]  # [U, S] tokens of each range
    np.subtract.at(left, (s_rows[searched], _strata(found.acts[searched])), 1)
    np.subtract.at(left, (t_rows[test], _strata(rows.top_values[test])), 1)
    drawn = np.bincount(sr * N_STRATA + ss, minlength=u * N_STRATA).reshape(u, N_STRATA)
    weight = np.where(drawn > 0, np.maximum(left, drawn) / np.maximum(drawn, 1), 0.0)[sr, ss]
    s_fire = sv >= tau[sr]
    s_match = corpus.keys_at(sg)[np.arange(len(sg)), n[sr]] == found.best[sr]
    firing = np.bincount(sr, weight * s_fire, u) + t_fire.sum(-1)
    predicted = corpus.count(found.best) - found.matched  # the matches outside the search tokens, counted exactly
    hit = np.minimum(np.bincount(sr, weight * (s_fire & s_match), u) + (t_match & t_fire).sum(-1), predicted)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (
            np.where(predicted > 0, hit / predicted, np.nan),
            np.where(firing > 0, hit / firing, np.nan),
            np.where(predicted + firing > 0, 2 * hit / (predicted + firing), np.nan),
            firing,
        )


def _codes(rows: np.ndarray, g: np.ndarray) -> np.ndarray:
    """One int64 per (row of a chunk, global token index) pair; rows < CHUNK, and g < 2^46 (2^31 contexts of 2^15)."""
    return rows.astype(np.int64) << 46 | g


def _strata(values: np.ndarray) -> np.ndarray:
    """The sample range (stratum) of each value."""
    return STRATUM_OF_BIN.numpy()[_bins(values)]


def _unique_rows(g: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of global token indices `g` [U, J] sorted with repeats (and -1) set to -1, and `values` alike."""
    order = np.argsort(g, axis=1, kind="stable")
    g, values = np.take_along_axis(g, order, 1), np.take_along_axis(values, order, 1)
    repeat = np.zeros_like(g, bool)
    repeat[:, 1:] = g[:, 1:] == g[:, :-1]
    return np.where(repeat, -1, g), values
