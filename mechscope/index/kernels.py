"""Compiled loops for the index build's hot path: one pass over a site's activations per batch.

`UnitStats.update` needs, for every (token, unit) of a batch, its histogram bin, the unit's running
sums, and whether the pair may enter the unit's top-k or a sample stratum. Written as tensor
operations that is some twenty passes over the [N, D] activations, several of them single-threaded;
here it is one pass, split over the cores by columns, compiled by numba. Results equal the tensor
definitions in `stats` (the tests check them against a brute-force computation).

Imported on first use: compiling takes a few seconds once, and numba caches the machine code.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

# numba starts its pool of NUMBA_NUM_THREADS threads (default: one per core) at the first parallel call,
# and threads left idle by `numba.set_num_threads` still spin between calls. Under torchrun, where each
# process gets OMP_NUM_THREADS=1, two processes then kept four threads busy on two cores and the build
# ran 5x slower. Unless the user chose, the pool is sized to torch's threads (read before numba loads).
os.environ.setdefault("NUMBA_NUM_THREADS", str(torch.get_num_threads()))

import numba  # noqa: E402
from numba import njit, prange  # noqa: E402

from mechscope.index.stats import LOW_EXP, N_BINS, PER_OCTAVE, SIDE, ZERO_BIN

_STEP0 = (127 + LOW_EXP) * PER_OCTAVE - 1  # the exponent-and-mantissa key of the first bin above zero, less one


@njit(inline="always")
def _flat_bin(bits: int, unit: int) -> int:
    """`stats.value_bins` of one float32 (its int32 bits), plus unit * N_BINS."""
    key = bits >> 21
    step = min(max((key & 1023) - _STEP0, 0), SIDE)
    return unit * N_BINS + ZERO_BIN + step * ((key >> 31) | 1)


@njit(parallel=True, cache=True, error_model="numpy")
def _fold(acts, threshold, top_bar, high_n, salt_high, bars, total, total_sq, active, hist, chunks):  # pragma: no cover
    n, d = acts.shape
    bits = acts.view(np.int32)
    width = (d + chunks - 1) // chunks
    found = np.empty((2, chunks, n * width), np.int64)  # per chunk: flat indices of top, sample candidates
    counts = np.zeros((2, chunks), np.int64)
    for c in prange(chunks):
        lo, hi = c * width, min(d, (c + 1) * width)
        w = max(hi - lo, 0)
        s, sq, act = np.zeros(w), np.zeros(w), np.zeros(w, np.int64)
        flat = np.empty(w, np.int64)
        n_top = n_sample = 0
        for i in range(n):
            row, row_bits = acts[i, lo:hi], bits[i, lo:hi]
            for j in range(w):  # vectorisable: sums, counts, bins
                x = row[j]
                s[j] += x
                sq[j] += x * x
                act[j] += x > threshold
                flat[j] = _flat_bin(row_bits[j], lo + j)
            h = high_n[i]
            for j in range(w):  # gathers, scatters and the rare candidates
                f = flat[j]
                hist[f] += 1
                if row[j] >= top_bar[lo + j]:
                    found[0, c, n_top] = i * d + lo + j
                    n_top += 1
                if (h ^ salt_high[lo + j]) <= bars[f]:
                    found[1, c, n_sample] = i * d + lo + j
                    n_sample += 1
        counts[0, c], counts[1, c] = n_top, n_sample
        total[lo:hi] += s
        total_sq[lo:hi] += sq
        active[lo:hi] += act
    return _gather(found, counts)


@njit(cache=True)
def _gather(found, counts):  # pragma: no cover
    out = []
    for kind in range(2):
        joined = np.empty(counts[kind].sum(), np.int64)
        at = 0
        for c in range(found.shape[1]):
            joined[at : at + counts[kind, c]] = found[kind, c, : counts[kind, c]]
            at += counts[kind, c]
        out.append(joined)
    return out[0], out[1]


@njit(parallel=True, cache=True, error_model="numpy")
def _screen(acts, high_n, salt_high, bars, mask):  # pragma: no cover
    n, d = acts.shape
    bits = acts.view(np.int32)
    for i in prange(n):
        h = high_n[i]
        for j in range(d):
            mask[i, j] = (h ^ salt_high[j]) <= bars[_flat_bin(bits[i, j], j)]


_LOCK = threading.Lock()
"""numba's default thread pool takes one parallel call at a time."""


def _threads() -> int:
    """As many threads as torch uses (numba's pool is its own)."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


def fold(
    acts_ND: np.ndarray,
    threshold: float,
    top_bar_D: np.ndarray,
    high_N: np.ndarray,
    salt_high_D: np.ndarray,
    bars_DB: np.ndarray,
    total_D: np.ndarray,
    total_sq_D: np.ndarray,
    active_D: np.ndarray,
    hist_DB: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold activations [N, D] (float32, C order) into the sums [D] (float64), counts of activations
    above `threshold` [D] and histograms [D, N_BINS] (int64), in place.

    Returns the candidates, as flat indices into [N, D] (int64, in no particular order): those at or
    above their unit's top-k bar `top_bar_D`, and those whose priority's top 16 bits (`high_N` of the
    token XOR `salt_high_D` of the unit, int16) are at most the bar `bars_DB` [D, N_BINS] (int16) of
    their value's bin. One batch's sums add in float64 per thread.
    """
    sums = (total_D, total_sq_D, active_D, hist_DB.reshape(-1))
    with _LOCK:
        threads = _threads()
        return _fold(acts_ND, np.float32(threshold), top_bar_D, high_N, salt_high_D, bars_DB.reshape(-1), *sums, threads)


def screen(acts_ND: np.ndarray, high_N: np.ndarray, salt_high_D: np.ndarray, bars_DB: np.ndarray) -> np.ndarray:
    """The sample candidates of `fold` alone, as flat indices (int64, ascending)."""
    mask = np.empty(acts_ND.shape, np.bool_)
    with _LOCK:
        _threads()
        _screen(acts_ND, high_N, salt_high_D, bars_DB.reshape(-1), mask)
    return np.flatnonzero(mask)
