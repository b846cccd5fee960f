"""Reading an index: one unit's statistics, top examples, samples and histogram; rankings and search.

`Index` opens a database built by `mechscope.index.build` read-only, and answers every question with
one or two small SQL queries. An unfinished index answers too, and says so on every query with an
`UnfinishedIndexWarning` (`Index.unfinished` holds the line); one that holds no token yet refuses.
The per-unit tables are written in unit order, so DuckDB's zone maps
skip all but the unit's rows; the contexts' tokens come from one join with the `tokens` table (a scan
of it: ~8 ms at 20M tokens on two cores). Token ids become text through a tokenizer: pass the `Model`
(its fingerprint is also checked against the one the index was built for) or a tokenizer.

>>> index = Index("neurons.duckdb", model=mechscope.load())
>>> index.stats("12:345").density
>>> [ex.value for ex in index.top("12:345", n=5)]
>>> index.search(" Python")[0].unit.name
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mechscope.errors import MechscopeError, one_of
from mechscope.index import store
from mechscope.index.settings import SettingError
from mechscope.index.stats import WINDOW_AFTER, WINDOW_BEFORE, ZERO_STRATUM, bin_edges, stratum_range
from mechscope.index.units import IndexedSite, parse_unit_id, unit_name

RANK_BY = ("density", "max", "mean")


class UnfinishedIndexWarning(UserWarning):
    """A query answered from an index whose build has not finished: it covers only part of its corpus."""


class UnitInfo(NamedTuple):
    id: int
    """Global unit number in this index."""
    name: str
    """`L:N` for a neuron, `SITE:I` for any other unit."""
    site: str
    layer: int | None
    """The site's layer (None for sites outside the blocks, e.g. hook_embed)."""
    index: int
    """The unit's index within its site (the neuron number for a neuron)."""


class UnitSummary(NamedTuple):
    unit: UnitInfo
    tokens: int
    """Tokens the statistics are over (the first `skip` positions of each context, start token included, excluded)."""
    mean: float
    std: float
    max: float
    """Largest activation seen (-inf if no tokens)."""
    density: float
    """Share of tokens with activation above the build's threshold."""
    active: int
    """Number of such tokens."""


class Example(NamedTuple):
    """One token where a unit was read, with the text around it."""

    rank: int
    """Rank among the unit's top examples (0 = highest), or the slot within a stratum for a sample."""
    value: float
    """The unit's activation on the token."""
    ctx: int
    """Stored context number (table `tokens`)."""
    pos: int
    """Position of the token in its context (0 is the start token; positions below the build's `skip` are never scored)."""
    token_id: int
    positions: list[int]
    """Positions of the shown window, around `pos`, within 1..ctx_len-1."""
    token_ids: list[int]
    """Token id at each of `positions`."""
    tokens: list[str] | None
    """Each of `token_ids` decoded, or None when the index has no tokenizer."""
    acts: np.ndarray
    """[len(positions)] float32 activation of the unit at each position; NaN where unknown."""

    @property
    def at(self) -> int:
        """Index of the example's own token within `positions`."""
        return self.positions.index(self.pos)


class Stratum(NamedTuple):
    """Samples drawn uniformly from one range of activation: an octave [low, high) of positive values,
    (low, high] of negative ones, or (low, high) = |x| < 2^-10 (see `stats.stratum_range`)."""

    stratum: int
    low: float
    """Lower edge (-inf for the most negative range, which holds everything below -2^15)."""
    high: float
    """Upper edge (inf for the most positive range, which holds everything from 2^15)."""
    q_low: float
    """Share of the unit's tokens in the ranges before this one, from its histogram."""
    q_high: float
    """Share of the unit's tokens in this range and the ones before it."""
    examples: list[Example]
    """Up to the index's `n_samples` tokens of this range, drawn uniformly over the whole corpus."""

    @property
    def text(self) -> str:
        """The range as an interval: '[0.5, 1)', '(-1, -0.5]', '(-0.000977, 0.000977)'."""
        left = "[" if self.stratum > ZERO_STRATUM else "("
        right = "]" if self.stratum < ZERO_STRATUM else ")"
        return f"{left}{_edge(self.low)}, {_edge(self.high)}{right}"


class Histogram(NamedTuple):
    edges: np.ndarray
    """[B + 1] float64 edges of the bins from the first to the last non-empty one (outer edges may be +-inf)."""
    counts: np.ndarray
    """[B] int64 tokens in each bin; they sum to the tokens the index has seen."""
    first_bin: int
    """Global bin number of counts[0] (see `stats.bin_edges`)."""


class SearchHit(NamedTuple):
    unit: UnitInfo
    hits: int
    """How many of the unit's top examples sit on the searched token (preceded by the rest of the string)."""
    best: float
    """The unit's largest activation among those examples."""
    max: float
    """The unit's largest activation overall."""


def _edge(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else ("-∞" if x < 0 else "∞")


def unfinished_note(meta: dict) -> str | None:
    """The line an unfinished index's queries carry (None for a finished one)."""
    if meta.get("complete", False):
        return None
    length, (start, stop), done = meta["ctx_len"], meta["contexts"], meta["contexts_done"]
    return (
        f"index built over {done * length:,} of {(stop - start) * length:,} tokens "
        "(unfinished: run the same `mechscope index build` again to continue)"
    )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class Index:
    """A read-only view of an index database; close it (or use `with`) when done.

    `warn=False` leaves out the `UnfinishedIndexWarning` of an unfinished index (the command line
    prints `unfinished` itself).
    """

    def __init__(self, path: Path | str, model=None, tokenizer=None, warn: bool = True):
        self.path = Path(path)
        self.con = store.open_index(self.path)
        self.meta = store.read_meta(self.con)
        self.unfinished = unfinished_note(self.meta)
        """A line saying how much of its corpus an unfinished index covers; None when finished."""
        self._warn = warn
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if model is not None:
            try:
                self._check_model(model)
            except MechscopeError:
                self.con.close()
                raise
        rows = self.con.execute("SELECT site, layer, first_unit, width FROM sites ORDER BY first_unit").fetchall()
        self.sites = [IndexedSite(*row) for row in rows]
        self.ctx_len = int(self.meta["ctx_len"])
        self._decoded: dict[int, str] = {}

    def _check_model(self, model) -> None:
        from mechscope.models.fingerprint import model_fingerprint

        have, want = self.meta.get("model_fingerprint"), model_fingerprint(model)
        if have != want:
            raise MechscopeError(
                f"{str(self.path)!r} was built for the model {self.meta.get('model')} (fingerprint {have}), "
                f"not {model.name} ({want}): pass --model {self.meta.get('model')} or build an index for this model"
            )

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_units(self) -> int:
        return sum(s.width for s in self.sites)

    def _ready(self) -> None:
        """Before a query: refuse an index that holds no token, and warn that an unfinished one is partial."""
        if not self.meta.get("tokens_seen", 0):
            raise MechscopeError(
                f"{str(self.path)!r} holds no tokens yet: its build stopped before its first checkpoint; "
                "run the same `mechscope index build` again"
            )
        if self.unfinished and self._warn:
            warnings.warn(self.unfinished, UnfinishedIndexWarning, stacklevel=3)

    def _count(self, n: int, most: int, what: str) -> None:
        """One line for a count `n` outside 1..most."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
            raise SettingError("n", n, f"1..{most:,}", what)

    # -- one unit ---------------------------------------------------------------------------------

    def unit(self, name: str | int | UnitInfo) -> UnitInfo:
        """The unit `L:N` (a neuron), `SITE:I`, or a global unit number; one-line error if the index lacks it."""
        if isinstance(name, UnitInfo):
            return name
        uid = parse_unit_id(name, self.sites)
        site = next(s for s in self.sites if s.first_unit <= uid < s.first_unit + s.width)
        index = uid - site.first_unit
        return UnitInfo(uid, unit_name(site, index), site.site, site.layer, index)

    def stats(self, unit: str | int | UnitInfo) -> UnitSummary:
        """The unit's statistics over every token the index has seen."""
        self._ready()
        u = self.unit(unit)
        row = self.con.execute("SELECT tokens, total, total_sq, active, max FROM units WHERE unit = ?", [u.id]).fetchone()
        return self._summary(u, *row)

    @staticmethod
    def _summary(u: UnitInfo, tokens, total, total_sq, active, max_) -> UnitSummary:
        n = max(int(tokens), 1)
        mean = float(total) / n
        std = math.sqrt(max(float(total_sq) / n - mean * mean, 0.0))
        return UnitSummary(u, int(tokens), mean, std, float(max_), int(active) / n, int(active))

    def top(self, unit: str | int | UnitInfo, n: int = 20) -> list[Example]:
        """The unit's n largest activations, best first, each with the tokens and activations around it.

        The window spans WINDOW_BEFORE tokens before and WINDOW_AFTER after (within the context, start
        token excluded); activations come from the stored window, NaN at positions never scored.
        `n` is 1..k (the index keeps each unit's top k); fewer come back while fewer tokens were seen.
        """
        self._ready()
        self._count(n, int(self.meta["k"]), f"the index keeps each unit's top {self.meta['k']}")
        u = self.unit(unit)
        rows = self.con.execute(
            "SELECT rank, value, ctx, pos, token, window_acts FROM top WHERE unit = ? AND rank < ? ORDER BY rank", [u.id, n]
        ).fetchall()
        spans = [self._span(int(row[3])) for row in rows]
        texts = self._texts([int(row[2]) for row in rows], spans)
        out = []
        for row, span, ids in zip(rows, spans, texts, strict=True):
            rank, value, ctx, pos, token = int(row[0]), float(row[1]), int(row[2]), int(row[3]), int(row[4])
            stored = np.frombuffer(row[5], dtype="<f2").astype(np.float32)  # positions pos-BEFORE .. pos+AFTER
            acts = stored[np.asarray(span) - pos + WINDOW_BEFORE]
            out.append(Example(rank, value, ctx, pos, token, span, ids, self.decode(ids), acts))
        return out

    def samples(self, unit: str | int | UnitInfo) -> list[Stratum]:
        """The unit's stratified samples, one `Stratum` per non-empty range of activation, lowest first."""
        self._ready()
        u = self.unit(unit)
        rows = self.con.execute(
            "SELECT stratum, slot, value, ctx, pos, token FROM samples WHERE unit = ? ORDER BY stratum, slot", [u.id]
        ).fetchall()
        spans = [self._span(int(row[4])) for row in rows]
        texts = self._texts([int(row[3]) for row in rows], spans)
        below = self._share_below(u)
        out: list[Stratum] = []
        for row, span, ids in zip(rows, spans, texts, strict=True):
            stratum, slot, value, ctx, pos, token = int(row[0]), int(row[1]), float(row[2]), int(row[3]), int(row[4]), int(row[5])
            if not out or out[-1].stratum != stratum:
                low, high = stratum_range(stratum)
                out.append(Stratum(stratum, low, high, below(low), below(high), []))
            acts = np.full(len(span), np.nan, np.float32)
            acts[span.index(pos)] = value
            out[-1].examples.append(Example(slot, value, ctx, pos, token, span, ids, self.decode(ids), acts))
        return out

    def histogram(self, unit: str | int | UnitInfo) -> Histogram:
        """The unit's histogram from its first to its last non-empty bin (bins: `stats.bin_edges()`)."""
        self._ready()
        u = self.unit(unit)
        got = self.con.execute("SELECT bin, count FROM hist WHERE unit = ? ORDER BY bin", [u.id]).fetchnumpy()
        edges = bin_edges().numpy()
        if len(got["bin"]) == 0:
            return Histogram(edges[:1], np.zeros(0, np.int64), 0)
        first, last = int(got["bin"][0]), int(got["bin"][-1])
        counts = np.zeros(last - first + 1, np.int64)
        counts[got["bin"].astype(np.int64) - first] = got["count"]
        return Histogram(edges[first : last + 2], counts, first)

    def _share_below(self, u: UnitInfo):
        """A function x -> share of the unit's tokens below x, exact at histogram edges (powers of 2 are edges)."""
        hist = self.histogram(u)
        total = max(int(hist.counts.sum()), 1)
        cumulative = np.concatenate([[0], np.cumsum(hist.counts)])

        def below(x: float) -> float:
            if len(hist.counts) == 0 or x <= hist.edges[0]:
                return 0.0
            return float(cumulative[min(np.searchsorted(hist.edges, x, side="right") - 1, len(hist.counts))]) / total

        return below

    # -- many units -------------------------------------------------------------------------------

    def rank(self, by: str = "density", n: int = 20, site: str | None = None, ascending: bool = False) -> list[UnitSummary]:
        """The n (1..units) units with the highest (or lowest) density, max or mean, optionally within one site."""
        self._ready()
        if by not in RANK_BY:
            raise MechscopeError(f"cannot rank by {by!r}: choose one of {one_of(RANK_BY)}")
        self._count(n, self.n_units, "units in this index")
        where, args = "", [n]
        if site is not None:
            where = "WHERE site = ?"
            args = [self._site(site).site, n]
        order = "ASC" if ascending else "DESC"
        rows = self.con.execute(
            f"SELECT unit, tokens, total, total_sq, active, max FROM units {where} ORDER BY {by} {order}, unit LIMIT ?", args
        ).fetchall()
        return [self._summary(self.unit(int(row[0])), *row[1:]) for row in rows]

    def _site(self, name: str) -> IndexedSite:
        for s in self.sites:
            if s.site == name or (s.is_neurons and name == str(s.layer)):
                return s
        raise MechscopeError(f"site {name!r} is not in this index: it holds {one_of([s.site for s in self.sites], 6)}")

    def search(self, text: str | int, n: int = 20) -> list[SearchHit]:
        """Units whose top examples sit most often on a token (or end a multi-token string), best first.

        Ties are broken by the largest activation on those examples. `text` is tokenised without
        special tokens, so mind a leading space (" Python" and "Python" are different tokens).
        `n` is 1..units.
        """
        self._ready()
        self._count(n, self.n_units, "units in this index")
        ids = self.search_ids(text)
        *before, last = ids
        joins = "".join(
            f" JOIN tokens p{j} ON p{j}.ctx = t.ctx AND p{j}.pos = t.pos - {len(before) - j} AND p{j}.token = {int(tid)}"
            for j, tid in enumerate(before)
        )
        rows = self.con.execute(
            f"WITH h AS (SELECT t.unit, count(*) AS hits, max(t.value) AS best FROM top t{joins} WHERE t.token = ? "
            "GROUP BY t.unit) SELECT h.unit, h.hits, h.best, u.max FROM h JOIN units u ON u.unit = h.unit "
            "ORDER BY h.hits DESC, h.best DESC, h.unit LIMIT ?",
            [int(last), n],
        ).fetchall()
        return [SearchHit(self.unit(int(u)), int(hits), float(best), float(top)) for u, hits, best, top in rows]

    def search_ids(self, text: str | int) -> list[int]:
        """Token ids of the search: a token id as it is, a string tokenised without special tokens."""
        if isinstance(text, int):
            vocab = len(self.tokenizer) if self.tokenizer is not None else None
            if text < 0 or (vocab is not None and text >= vocab):
                raise MechscopeError(f"token id {text} out of range: valid ids are 0..{(vocab or 1) - 1}")
            return [text]
        if self.tokenizer is None:
            raise MechscopeError("searching by text needs a tokenizer: open the index with a model, or search a token id")
        ids = self.tokenizer(text, add_special_tokens=False).input_ids if text else []
        if not ids:
            raise MechscopeError(f"search text {text!r} tokenises to nothing: give a token or a string, e.g. ' Python'")
        if len(ids) >= self.ctx_len:
            raise MechscopeError(f"search text {text!r} is {len(ids)} tokens, longer than a context ({self.ctx_len - 1})")
        return ids

    # -- tokens -----------------------------------------------------------------------------------

    def _span(self, pos: int) -> list[int]:
        return list(range(max(1, pos - WINDOW_BEFORE), min(self.ctx_len - 1, pos + WINDOW_AFTER) + 1))

    def _texts(self, ctxs: Sequence[int], spans: Sequence[list[int]]) -> list[list[int]]:
        """Token ids at each span of each context, in one query."""
        if not ctxs:
            return []
        unique = sorted(set(ctxs))
        lo, hi = min(s[0] for s in spans), max(s[-1] for s in spans)
        got = self.con.execute(  # a join, not IN (...): DuckDB scans a long IN list's table ~3x slower
            "SELECT t.ctx, t.pos, t.token FROM (SELECT unnest(?::INTEGER[]) AS ctx) w JOIN tokens t ON t.ctx = w.ctx "
            "WHERE t.pos BETWEEN ? AND ?",
            [unique, lo, hi],
        ).fetchnumpy()
        table = np.full((len(unique), self.ctx_len), -1, np.int64)
        table[np.searchsorted(unique, got["ctx"]), got["pos"].astype(np.int64)] = got["token"]
        return [table[unique.index(ctx), span].tolist() for ctx, span in zip(ctxs, spans, strict=True)]

    def decode(self, ids: Sequence[int]) -> list[str] | None:
        """Each token id as its text (cached), or None without a tokenizer."""
        if self.tokenizer is None:
            return None
        missing = [i for i in set(ids) if i not in self._decoded]
        for i, text in zip(missing, self.tokenizer.batch_decode([[i] for i in missing]) if missing else [], strict=True):
            self._decoded[i] = text
        return [self._decoded[i] for i in ids]

    def token_count(self, token_id: int) -> int:
        """How often a token occurs in the stored contexts (scored positions or not)."""
        return int(self.con.execute("SELECT count(*) FROM tokens WHERE token = ?", [int(token_id)]).fetchone()[0])

    def describe(self) -> dict:
        """The build's metadata (model, sites, corpus, tokens seen, ...), with the unit count."""
        return {**self.meta, "units": self.n_units}


def time_top_query(db: Path | str, unit: str | int = 0, n: int = 20, repeats: int = 20, tokenizer=None) -> float:
    """Median seconds of `Index.top(unit, n)` on an open index (the first, cold call is not counted).

    >>> time_top_query("neurons.duckdb", "12:345")   # ~0.003 on a 46,080-neuron index
    """
    with Index(db, tokenizer=tokenizer) as index:
        index.top(unit, n)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            index.top(unit, n)
            times.append(time.perf_counter() - start)
    return float(np.median(times))
