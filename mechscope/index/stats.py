"""Running statistics of many units over a stream of tokens, exact and mergeable.

`UnitStats` holds, for every unit (a neuron, or one dimension of any site), everything the index
keeps about it, and `update` folds in one layer's activations for one batch:

1. count, sum and sum of squares (float64), and how many tokens exceed the activity threshold;
2. the exact top-k (value, token), under the total order "larger value first, then earlier token",
   each with the unit's activations on the tokens around it (float16; NaN where not scored);
3. a histogram over fixed bins shared by every unit (below), so histograms of shards simply add;
4. stratified samples: for each range of activation (every octave [2^e, 2^(e+1)) of either sign, and
   one range for |x| < 2^LOW_EXP), `n_samples` tokens drawn uniformly from the tokens in that range.
   Each (token, unit) gets a seeded pseudo-random priority, a hash of the token's global index and
   the unit, and each range keeps its tokens of smallest priority (a bottom-k sample). Which tokens
   are kept does not depend on the order they come in, so a sample is spread over the whole corpus
   in proportion to where the range's tokens are, and distinct units draw distinct tokens.

Every part is a deterministic function of the token stream, and every part merges exactly:
tops by re-selecting under the same total order, samples by keeping the smallest priorities of
both, counts and histograms by adding. So a resumed build equals an uninterrupted one, and two
shards merged equal one build over both (sums agree to float64 rounding).

Histogram bins are read straight off the float32 bit pattern: sign, exponent and the top two
mantissa bits give 4 bins per octave, over |x| in [2^-10, 2^16) on each side, plus one bin for
|x| < 2^-10 (values beyond 2^16 land in the outermost bins). A few integer operations per value,
no search, which keeps the whole update within a small fraction of the forward pass.

Shapes: U units, N tokens in a batch, D units in one site, K top examples, S strata, R samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

LOW_EXP, HIGH_EXP, PER_OCTAVE = -10, 16, 4  # |x| from ~1e-3 to 65536: neurons, and residual streams' massive activations
SIDE = (HIGH_EXP - LOW_EXP) * PER_OCTAVE  # bins on each side of zero
N_BINS = 2 * SIDE + 1
ZERO_BIN = SIDE
N_OCTAVES = HIGH_EXP - LOW_EXP
N_STRATA = 2 * N_OCTAVES + 1
"""Sample strata in order of value: negative octaves (largest magnitude first), |x| < 2^LOW_EXP, positive octaves."""
ZERO_STRATUM = N_OCTAVES
STRATUM_OF_BIN = torch.cat(
    [torch.arange(ZERO_BIN) // PER_OCTAVE, (torch.arange(ZERO_BIN, N_BINS) + PER_OCTAVE - 1) // PER_OCTAVE]
)
"""[N_BINS] the stratum holding each histogram bin (strata are whole octaves of bins)."""
BINS_OF_STRATUM = torch.stack(
    [torch.nonzero(STRATUM_OF_BIN.eq(s))[:, 0].repeat(PER_OCTAVE)[:PER_OCTAVE] for s in range(N_STRATA)]
)
"""[N_STRATA, PER_OCTAVE] the bins of each stratum (the middle stratum's one bin repeated)."""
_BINS_OF_STRATUM = BINS_OF_STRATUM.numpy()
_NO_BAR = torch.iinfo(torch.int16).max
NO_TOKEN = torch.iinfo(torch.int64).max
WINDOW_BEFORE, WINDOW_AFTER = 16, 4
WINDOW = WINDOW_BEFORE + 1 + WINDOW_AFTER
"""Each top example keeps the unit's activations on the WINDOW_BEFORE tokens before it and WINDOW_AFTER after."""


def bin_edges() -> Tensor:
    """[N_BINS + 1] bin edges (float64); the outer edges are +-inf.

    Bins are by magnitude, so a positive bin b holds [edges[b], edges[b+1]) and a negative one
    (edges[b], edges[b+1]]; the zero bin holds |x| < 2^-10.
    """
    steps = torch.arange(SIDE, dtype=torch.float64)
    mags = 2.0 ** (LOW_EXP + steps // PER_OCTAVE) * (1 + (steps % PER_OCTAVE) / PER_OCTAVE)
    low = 2.0**LOW_EXP
    inner = torch.cat([-mags.flip(0)[:-1], torch.tensor([-low, low]), mags[1:]])
    return torch.cat([torch.tensor([-torch.inf]), inner, torch.tensor([torch.inf])])


def stratum_range(stratum: int) -> tuple[float, float]:
    """(low, high) of a stratum: [low, high) for a positive one, (low, high] for a negative one, and
    (low, high) for the middle one (|x| < 2^LOW_EXP). The outermost strata reach -inf and inf."""
    if stratum == ZERO_STRATUM:
        return -(2.0**LOW_EXP), 2.0**LOW_EXP
    e = LOW_EXP + abs(stratum - ZERO_STRATUM) - 1  # the octave [2^e, 2^(e+1)) of |x|
    low, high = 2.0**e, (math.inf if e == HIGH_EXP - 1 else 2.0 ** (e + 1))
    return (low, high) if stratum > ZERO_STRATUM else (-high, -low)


def value_bins(x: Tensor) -> Tensor:
    """Histogram bin (int32) of each float32 value, from its sign, exponent and top two mantissa bits.

    `key` is the top 11 bits: sign, then exponent * 4 + two mantissa bits (the magnitude's step).
    Steps below 2^LOW_EXP go to the zero bin, steps beyond the last bin are clamped into it.
    """
    key = x.view(torch.int32) >> 21
    step = (key & 1023).sub_((127 + LOW_EXP) * PER_OCTAVE - 1).clamp_(0, SIDE)  # 0: |x| < 2^LOW_EXP
    sign = (key >> 31) | 1
    return step.mul_(sign).add_(ZERO_BIN)


_SIGN = np.uint64(1 << 63)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters nearby inputs over the whole range (wrapping)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def token_hashes(tokens: Tensor, seed: int) -> Tensor:
    """int64 hash of each global token index (a bijection of the index), seeded."""
    return torch.from_numpy(_hashes(tokens.numpy(), seed))


def _hashes(tokens: np.ndarray, seed: int) -> np.ndarray:
    key = _mix(np.array([seed], dtype=np.int64).view(np.uint64) ^ np.uint64(0x9E3779B97F4A7C15))
    return (_mix(np.asarray(tokens, dtype=np.int64).view(np.uint64) ^ key) ^ _SIGN).view(np.int64)


def unit_salts(units: Tensor, seed: int) -> Tensor:
    """int64 salt of each unit number, seeded: a unit's priorities are its tokens' hashes XOR its salt."""
    key = _mix(np.array([seed], dtype=np.int64).view(np.uint64) ^ np.uint64(0x632BE59BD9B4E019))
    return torch.from_numpy(_mix(_mix(units.numpy().astype(np.int64).view(np.uint64)) ^ key).view(np.int64))


def sample_priorities(tokens: Tensor, units: Tensor, seed: int) -> Tensor:
    """int64 priority of each (token, unit) pair (broadcast): strata keep their tokens of smallest priority.

    For one unit, distinct tokens get distinct priorities (a bijection of the token index), spread
    uniformly over the int64 range; distinct units order the same tokens independently.
    """
    return token_hashes(tokens, seed) ^ unit_salts(units, seed)


def _group_rank(keys: Tensor) -> Tensor:
    """For keys sorted into runs of equal values: each element's position within its run."""
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(len(keys)) - torch.repeat_interleave(starts, counts)


@dataclass
class UnitStats:
    """Statistics of `n_units` units. Build with `UnitStats.empty`; `update` with each site's activations."""

    tokens: Tensor  # [] int64: tokens seen (the same for every unit)
    total: Tensor  # [U] float64: sum of activations
    total_sq: Tensor  # [U] float64: sum of squares
    active: Tensor  # [U] int64: tokens with activation > threshold
    hist: Tensor  # [U, N_BINS] int64
    top_values: Tensor  # [U, K] float32, descending; -inf where fewer than K tokens were seen
    top_tokens: Tensor  # [U, K] int64 global token index (context * ctx_len + position)
    top_windows: Tensor  # [U, K, WINDOW] float16 activations around each top example; NaN where unknown
    sample_values: Tensor  # [U, S, R] float32; 0 where empty
    sample_tokens: Tensor  # [U, S, R] int64, each stratum's tokens by ascending priority; NO_TOKEN where empty (last)
    threshold: float = 0.0
    seed: int = 0
    """Seed of the sample priorities."""

    @classmethod
    def empty(cls, n_units: int, k: int = 20, n_samples: int = 5, threshold: float = 0.0, seed: int = 0) -> UnitStats:
        return cls(
            tokens=torch.tensor(0),
            total=torch.zeros(n_units, dtype=torch.float64),
            total_sq=torch.zeros(n_units, dtype=torch.float64),
            active=torch.zeros(n_units, dtype=torch.int64),
            hist=torch.zeros(n_units, N_BINS, dtype=torch.int64),
            top_values=torch.full((n_units, k), -torch.inf),
            top_tokens=torch.full((n_units, k), NO_TOKEN),
            top_windows=torch.full((n_units, k, WINDOW), torch.nan, dtype=torch.float16),
            sample_values=torch.zeros(n_units, N_STRATA, n_samples),
            sample_tokens=torch.full((n_units, N_STRATA, n_samples), NO_TOKEN),
            threshold=threshold,
            seed=seed,
        )

    @property
    def n_units(self) -> int:
        return self.total.shape[0]

    @property
    def k(self) -> int:
        return self.top_values.shape[1]

    @property
    def n_samples(self) -> int:
        return self.sample_values.shape[2]

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("threshold", "seed")}

    @cached_property
    def salts(self) -> Tensor:
        """[U] int64 each unit's priority salt (`unit_salts`)."""
        return unit_salts(torch.arange(self.n_units), self.seed)

    @cached_property
    def bars(self) -> Tensor:
        """[U, N_BINS] int16, derived: the top 16 bits of the priority of the last sample of each bin's stratum
        (int16 max while the stratum holds fewer than R). A token enters a stratum only at or below its bar."""
        return _bars(self.sample_tokens[:, :, -1], self.salts, self.seed)[:, STRATUM_OF_BIN].contiguous()

    # -- one site's activations for one batch ----------------------------------------------------------

    def update(self, offset: int, acts_ND: Tensor, tokens_N: Tensor, positions_N: Tensor, count_tokens: bool = True) -> None:
        """Fold in activations [N, D] of units offset..offset+D-1 at the tokens `tokens_N` (global indices, ascending).

        `positions_N` gives each token's position in its context; rows of one context are consecutive.
        One compiled pass (`kernels.fold`) adds the sums, counts and histograms and marks the few pairs
        that may enter a top-k or a sample; only those are sorted and merged here.
        """
        from mechscope.index import kernels

        acts_ND = acts_ND.float().contiguous()
        units = slice(offset, offset + acts_ND.shape[1])
        if count_tokens:
            self.tokens += acts_ND.shape[0]
        salts, bars = self.salts[units], self.bars[units]
        hashes = token_hashes(tokens_N, self.seed)
        top, at = kernels.fold(
            acts_ND.numpy(), self.threshold, self.top_values[units, self.k - 1].contiguous().numpy(),
            _high(hashes), _high(salts), bars.numpy(), self.total[units].numpy(), self.total_sq[units].numpy(),
            self.active[units].numpy(), self.hist[units].numpy(),
        )  # fmt: skip
        width = acts_ND.shape[1]
        top = torch.from_numpy(top)
        self._update_top(units, acts_ND, tokens_N, positions_N, top // width, top % width)
        self._update_samples(units, acts_ND, tokens_N, hashes, torch.from_numpy(at))

    def _update_top(self, units: slice, acts_ND: Tensor, tokens_N: Tensor, positions_N: Tensor, rows, cols) -> None:
        """Merge the pairs (rows, cols) at or above their unit's k-th value into the top-k."""
        k = self.k
        if len(cols) > 8 * k * acts_ND.shape[1]:  # early on: raise the bar to this batch's own k-th values
            bar = torch.maximum(self.top_values[units, k - 1], acts_ND.topk(min(k, acts_ND.shape[0]), dim=0).values[-1])
            rows, cols = (acts_ND >= bar).nonzero(as_tuple=True)
        if len(cols) == 0:
            return
        touched = torch.unique(cols)
        held = (
            touched.repeat_interleave(k),
            self.top_values[units][touched].flatten(),
            self.top_tokens[units][touched].flatten(),
        )
        unit = torch.cat([held[0], cols])
        value = torch.cat([held[1], acts_ND[rows, cols]])
        token = torch.cat([held[2], tokens_N[rows]])
        order = _total_order(unit, value, token)
        unit, value, token = unit[order], value[order], token[order]
        rank = _group_rank(unit)
        keep = rank < k
        flat = unit[keep] * k + rank[keep]
        windows = self._windows(units, touched, order[keep], acts_ND, rows, cols, positions_N)
        self.top_values[units].view(-1)[flat] = value[keep]
        self.top_tokens[units].view(-1)[flat] = token[keep]
        self.top_windows[units].view(-1, WINDOW)[flat] = windows

    def _windows(self, units, touched, source, acts_ND, rows, cols, positions_N) -> Tensor:
        """Windows of the kept examples: `source` < held count indexes the held ones (copied), the rest
        index this batch's candidates (read from the activations around their row)."""
        k, held = self.k, len(touched) * self.k
        out = torch.empty(len(source), WINDOW, dtype=torch.float16)
        old = source < held
        held_flat = touched[source[old] // k] * k + source[old] % k
        out[old] = self.top_windows[units].reshape(-1, WINDOW)[held_flat]
        new = source[~old] - held
        offsets = torch.arange(-WINDOW_BEFORE, WINDOW_AFTER + 1)
        around = rows[new, None] + offsets  # [n, WINDOW] rows of the same context, where in range
        at = positions_N[rows[new], None] + offsets
        inside = (at >= positions_N[0]) & (at <= positions_N[-1])  # every context's rows span the same positions
        values = acts_ND[around.clamp(0, len(acts_ND) - 1), cols[new, None]]
        out[~old] = torch.where(inside, values, torch.nan).half()
        return out

    def _update_samples(self, units: slice, acts_ND: Tensor, tokens_N: Tensor, hashes_N: Tensor, at: Tensor) -> None:
        """Offer the pairs at flat positions `at` of [N, D], those whose priority's top 16 bits pass the bar
        of their bin, to their strata; keep each stratum's R smallest priorities."""
        if len(at) == 0:
            return
        width = acts_ND.shape[1]
        if 4 * len(at) > acts_ND.numel() and len(acts_ND) > 64:  # early on: half the rows first fill strata and lower the bars
            from mechscope.index import kernels

            half = len(acts_ND) // 2
            for part in (slice(0, half), slice(half, None)):
                acts, hashes = acts_ND[part], hashes_N[part]
                at = kernels.screen(acts.numpy(), _high(hashes), _high(self.salts[units]), self.bars[units].numpy())
                self._update_samples(units, acts, tokens_N[part], hashes, torch.from_numpy(at))
            return
        rows, cols = at // width, at % width
        values = acts_ND.view(-1)[at]
        slot = cols * N_STRATA + STRATUM_OF_BIN[value_bins(values)]  # (unit, stratum) within the site
        salts = self.salts[units]
        new = (slot, hashes_N[rows] ^ salts[cols], tokens_N[rows], values)
        held = (self.sample_tokens[units].view(-1, self.n_samples), self.sample_values[units].view(-1, self.n_samples))
        self._keep_smallest(*held, salts, self.bars[units], new)

    def _keep_smallest(self, tokens_XR: Tensor, values_XR: Tensor, salts: Tensor, bars: Tensor, new: tuple) -> None:
        """Merge `new` (slot, priority, token, value) candidates into the rows X = (unit, stratum) of [X, R]
        samples, keeping each row's R smallest priorities in ascending order; update the units' `bars`.

        In numpy, on views of the tensors: the candidates are few once the strata fill, and numpy's
        small operations cost a fraction of torch's.
        """
        tokens_XR, values_XR, salts, bars = tokens_XR.numpy(), values_XR.numpy(), salts.numpy(), bars.numpy()
        slot, priority, token, value = (x.numpy() for x in new)
        r = tokens_XR.shape[1]
        order = _by_slot_then_priority(slot, priority)
        slot = slot[order]
        rank = _run_ranks(slot)
        first = np.flatnonzero(rank < r)  # the candidates' own R smallest per slot: at most 2R per slot to sort
        take, slot, rank = order[first], slot[first], rank[first]
        heads = rank == 0
        touched, row = slot[heads], np.cumsum(heads) - 1
        unit, held = touched // N_STRATA, tokens_XR[touched]  # [T], [T, R]
        tokens = np.full_like(held, NO_TOKEN)
        tokens[row, rank] = token[take]
        values = np.zeros((len(touched), r), np.float32)
        values[row, rank] = value[take]
        if (held != NO_TOKEN).any():
            keys = np.zeros_like(held)
            keys[row, rank] = priority[take]
            held_keys = _hashes(held, self.seed) ^ salts[unit, None]
            tokens, values = _merge_rows((held, values_XR[touched], held_keys), (tokens, values, keys))
        tokens_XR[touched], values_XR[touched] = tokens, values
        last = np.where(tokens[:, -1] == NO_TOKEN, _NO_BAR, (_hashes(tokens[:, -1], self.seed) ^ salts[unit]) >> 48)
        bars[unit[:, None], _BINS_OF_STRATUM[touched % N_STRATA]] = last[:, None]

    # -- combining -------------------------------------------------------------------------------------

    def merge(self, other: UnitStats) -> UnitStats:
        """Statistics of both streams together; `other` must cover tokens after all of this one's (for the top-k's ties)."""
        shape = (self.n_units, self.k, self.n_samples, self.threshold, self.seed)
        if shape != (other.n_units, other.k, other.n_samples, other.threshold, other.seed):
            raise ValueError("statistics differ in units, k, samples, threshold or seed")
        out = UnitStats.empty(*shape)
        for name in ("tokens", "total", "total_sq", "active", "hist"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        units = torch.arange(self.n_units).repeat_interleave(2 * self.k)
        value = torch.cat([self.top_values, other.top_values], 1).flatten()
        token = torch.cat([self.top_tokens, other.top_tokens], 1).flatten()
        order = _total_order(units, value, token)
        keep = _group_rank(units[order]) < self.k
        out.top_values = value[order][keep].view(self.n_units, self.k)
        out.top_tokens = token[order][keep].view(self.n_units, self.k)
        windows = torch.cat([self.top_windows, other.top_windows], 1).view(-1, WINDOW)
        out.top_windows = windows[order][keep].view(self.n_units, self.k, WINDOW)
        out.sample_tokens, out.sample_values = self.sample_tokens.clone(), self.sample_values.clone()
        there = other.sample_tokens != NO_TOKEN
        unit, stratum, _ = there.nonzero(as_tuple=True)
        token = other.sample_tokens[there]
        new = (unit * N_STRATA + stratum, token_hashes(token, self.seed) ^ out.salts[unit], token, other.sample_values[there])
        held = (out.sample_tokens.view(-1, self.n_samples), out.sample_values.view(-1, self.n_samples))
        out._keep_smallest(*held, out.salts, out.bars, new)
        return out


def _high(x: Tensor) -> np.ndarray:
    """int16 top 16 bits of int64 priorities, hashes or salts."""
    return (x >> 48).short().numpy()


def _bars(last: Tensor, salts: Tensor, seed: int) -> Tensor:
    """int16 top 16 bits of the priorities of strata's R-th samples `last` [..., S] of units with `salts` [...]."""
    salts = salts.view(*salts.shape, *[1] * (last.dim() - salts.dim()))
    high = ((token_hashes(last, seed) ^ salts) >> 48).short()
    return high.masked_fill_(last == NO_TOKEN, _NO_BAR)


def _by_slot_then_priority(slot: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Permutation sorting by slot, then priority (distinct within a slot), in one sort of int64 keys when it can.

    The key is the slot above the top 43 bits of the priority (read as unsigned); two priorities of
    one slot that agree in those bits (about one pair in 10^13) send it to two sorts instead.
    """
    if len(slot) and int(slot.max()) < 2**20:
        key = slot << 43 | ((priority ^ np.int64(-(2**63))) >> 21) & (2**43 - 1)
        order = np.argsort(key)
        ranked = key[order]
        if not (ranked[1:] == ranked[:-1]).any():
            return order
    order = np.argsort(priority)
    return order[np.argsort(slot[order], kind="stable")]


def _run_ranks(keys: np.ndarray) -> np.ndarray:
    """For keys sorted into runs of equal values: each element's position within its run."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))


def _merge_rows(held: tuple, new: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Rows of held samples and of new ones, each (tokens, values, priorities) [T, R] with empty places
    last: each row's R smallest priorities of both, ascending, empty places last."""
    r = held[0].shape[1]
    tokens, values, keys = (np.concatenate([a, b], 1) for a, b in zip(held, new, strict=True))  # [T, 2R]
    empty = tokens == NO_TOKEN
    clash = ((keys == NO_TOKEN) & ~empty).any()  # a token whose priority is the largest int64 (once in 2^64)
    keys[empty] = NO_TOKEN  # empty places last
    order = np.argsort(keys, axis=1)
    if clash:
        order = np.take_along_axis(order, np.argsort(np.take_along_axis(empty, order, 1), axis=1, kind="stable"), 1)
    order = order[:, :r]
    return np.take_along_axis(tokens, order, 1), np.take_along_axis(values, order, 1)


def _total_order(unit: Tensor, value: Tensor, token: Tensor) -> Tensor:
    """Permutation sorting by unit, then larger value first, then earlier token."""
    order = torch.argsort(token, stable=True)
    return order[_by_unit_then_value(unit[order], value[order])]


def _by_unit_then_value(unit: Tensor, value: Tensor) -> Tensor:
    """Stable permutation sorting by unit, then larger value first, in one sort of int64 keys.

    A float32's bits, with every bit flipped for negatives and the sign bit flipped for the rest,
    order as the floats do; flipping them all again orders larger values first.
    """
    bits = value.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    ascending = torch.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits ^ 0x80000000)
    return torch.argsort(unit.to(torch.int64) << 32 | (ascending ^ 0xFFFFFFFF), stable=True)
