"""Running statistics of many units over a stream of tokens, exact and mergeable.

`UnitStats` holds, for every unit (a neuron, or one dimension of any site), everything the index
keeps about it, and `update` folds in one layer's activations for one batch:

1. count, sum and sum of squares (float64), and how many tokens exceed the activity threshold;
2. the exact top-k (value, token), under the total order "larger value first, then earlier token",
   each with the unit's activations on the tokens around it (float16; NaN where not scored);
3. a histogram over fixed bins shared by every unit (below), so histograms of shards simply add;
4. stratified samples: for each positive octave of activation [2^e, 2^(e+1)), the first `n_samples`
   tokens in corpus order whose activation falls in it. The corpus order is a seeded shuffle, so
   these are a random sample of each activation range, not only of the top.

Every part is a deterministic function of the token stream, and every part merges exactly:
tops by re-selecting under the same total order, samples by taking the earlier shard first,
counts and histograms by adding. So a resumed build equals an uninterrupted one, and two shards
merged equal one build over both (sums agree to float64 rounding).

Histogram bins are read straight off the float32 bit pattern: sign, exponent and the top two
mantissa bits give 4 bins per octave, over |x| in [2^-10, 2^16) on each side, plus one bin for
|x| < 2^-10 (values beyond 2^16 land in the outermost bins). A few integer operations per value,
no search, which keeps the whole update within a small fraction of the forward pass.

Shapes: U units, N tokens in a batch, D units in one site, K top examples, S strata, R samples.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

LOW_EXP, HIGH_EXP, PER_OCTAVE = -10, 16, 4  # |x| from ~1e-3 to 65536: neurons, and residual streams' massive activations
SIDE = (HIGH_EXP - LOW_EXP) * PER_OCTAVE  # bins on each side of zero
N_BINS = 2 * SIDE + 1
ZERO_BIN = SIDE
N_STRATA = HIGH_EXP - LOW_EXP
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


def stratum_edges() -> Tensor:
    """[N_STRATA] lower edge of each positive octave used for stratified samples."""
    return 2.0 ** torch.arange(LOW_EXP, HIGH_EXP, dtype=torch.float32)


def value_bins(x: Tensor) -> Tensor:
    """Histogram bin (int32) of each float32 value, from its sign, exponent and top two mantissa bits.

    `key` is the top 11 bits: sign, then exponent * 4 + two mantissa bits (the magnitude's step).
    Steps below 2^LOW_EXP go to the zero bin, steps beyond the last bin are clamped into it.
    """
    key = x.view(torch.int32) >> 21
    step = (key & 1023).sub_((127 + LOW_EXP) * PER_OCTAVE - 1).clamp_(0, SIDE)  # 0: |x| < 2^LOW_EXP
    sign = (key >> 31) | 1
    return step.mul_(sign).add_(ZERO_BIN)


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
    sample_values: Tensor  # [U, S, R] float32
    sample_tokens: Tensor  # [U, S, R] int64; NO_TOKEN where empty
    sample_fill: Tensor  # [U, S] int64: samples held in each stratum
    threshold: float = 0.0

    @classmethod
    def empty(cls, n_units: int, k: int = 20, n_samples: int = 5, threshold: float = 0.0) -> UnitStats:
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
            sample_fill=torch.zeros(n_units, N_STRATA, dtype=torch.int64),
            threshold=threshold,
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
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "threshold"}

    # -- one site's activations for one batch ----------------------------------------------------------

    def update(self, offset: int, acts_ND: Tensor, tokens_N: Tensor, positions_N: Tensor, count_tokens: bool = True) -> None:
        """Fold in activations [N, D] of units offset..offset+D-1 at the tokens `tokens_N` (global indices, ascending).

        `positions_N` gives each token's position in its context; rows of one context are consecutive.
        """
        acts_ND = acts_ND.float().contiguous()
        units = slice(offset, offset + acts_ND.shape[1])
        if count_tokens:
            self.tokens += acts_ND.shape[0]
        # One batch sums in float32 (exact enough for ~1e3 tokens), batches accumulate in float64.
        self.total[units] += acts_ND.sum(0)
        self.total_sq[units] += (acts_ND * acts_ND).sum(0)
        self.active[units] += (acts_ND > self.threshold).view(torch.uint8).sum(0, dtype=torch.int32)
        width = acts_ND.shape[1]
        flat_bins = value_bins(acts_ND).add_(torch.arange(0, width * N_BINS, N_BINS, dtype=torch.int32))
        self.hist[units].view(-1).add_(torch.bincount(flat_bins.view(-1), minlength=width * N_BINS))
        self._update_top(units, acts_ND, tokens_N, positions_N)
        self._update_samples(units, acts_ND, tokens_N)

    def _update_top(self, units: slice, acts_ND: Tensor, tokens_N: Tensor, positions_N: Tensor) -> None:
        k = self.k
        bar = self.top_values[units, k - 1]
        rows, cols = (acts_ND >= bar).nonzero(as_tuple=True)
        if len(cols) > 8 * k * acts_ND.shape[1]:  # early on: raise the bar to this batch's own k-th values
            bar = torch.maximum(bar, acts_ND.topk(min(k, acts_ND.shape[0]), dim=0).values[-1])
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

    def _update_samples(self, units: slice, acts_ND: Tensor, tokens_N: Tensor) -> None:
        """Fill each unit's strata with the earliest tokens in them; only values at or above the lowest
        stratum still open can change anything, so only those are looked at."""
        fill = self.sample_fill[units]
        r = self.n_samples
        open_ = fill < r
        first_open = torch.where(open_.any(1), open_.int().argmax(1), N_STRATA)
        floor = torch.cat([stratum_edges(), torch.tensor([torch.inf])])[first_open]
        rows, cols = (acts_ND >= floor).nonzero(as_tuple=True)
        if len(cols) == 0:
            return
        value = acts_ND[rows, cols]
        stratum = ((value_bins(value) - ZERO_BIN - 1) // PER_OCTAVE).clamp(0, N_STRATA - 1)
        slot = cols * N_STRATA + stratum
        wanted = fill.view(-1)[slot] < r
        slot, value, token = slot[wanted], value[wanted], tokens_N[rows[wanted]]
        order = torch.sort(slot, stable=True).indices  # rows come in token order already
        slot, value, token = slot[order], value[order], token[order]
        place = fill.view(-1)[slot] + _group_rank(slot)
        keep = place < r
        slot, place = slot[keep], place[keep]
        self.sample_values[units].view(-1)[slot * r + place] = value[keep]
        self.sample_tokens[units].view(-1)[slot * r + place] = token[keep]
        fill.view(-1).index_add_(0, slot, torch.ones_like(slot))

    # -- combining -------------------------------------------------------------------------------------

    def merge(self, other: UnitStats) -> UnitStats:
        """Statistics of both streams together; `other` must cover tokens after all of this one's."""
        if (self.n_units, self.k, self.n_samples, self.threshold) != (other.n_units, other.k, other.n_samples, other.threshold):
            raise ValueError("statistics differ in units, k, samples or threshold")
        out = UnitStats.empty(self.n_units, self.k, self.n_samples, self.threshold)
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
        both_v = torch.cat([self.sample_values, other.sample_values], 2)
        both_t = torch.cat([self.sample_tokens, other.sample_tokens], 2)
        order = both_t.argsort(dim=2, stable=True)[..., : self.n_samples]  # earliest tokens first; empty slots sort last
        out.sample_values = both_v.gather(2, order)
        out.sample_tokens = both_t.gather(2, order)
        out.sample_fill = (self.sample_fill + other.sample_fill).clamp(max=self.n_samples)
        return out


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
