"""Building one index over several processes (`torchrun`): each builds a shard, rank 0 merges them.

`build_index` comes here when WORLD_SIZE > 1; every process runs it with the same arguments.

1. plan: every rank checks the settings (`build.py`'s phase 1) and reads what `out` holds already:
   nothing, or a complete index of the same settings over the first contexts (only the rest is then
   built, and merged with it). An `out` that holds every context is left alone: a rerun does nothing.
2. share: the contexts left are split into one contiguous share of whole batches per rank, as even
   as can be (`shard_spans`), so that every process runs the very batches one process would.
3. build: rank R builds its share into `shard_path(out, R, world)` (idx.rank0-of-2.duckdb beside
   idx.duckdb) with the usual checkpoints. Rerunning the same command after a rank died resumes
   every shard from its last checkpoint; shards of another number of processes are refused.
4. merge: every rank waits for the slowest (`Ranks.wait_for_all`, no time limit), then rank 0 merges
   `out` and the shards exactly (`merge_indexes`) into a hidden file beside `out` and renames it to
   `out`, so that `out` is the old index or the whole new one, never part of one; then it removes the
   shards. Every rank waits for the merge, and returns `out`.

Rank 0 shows the progress of its own share and then one line of timings (its build, its wait for the
others, the merge); the other ranks are quiet. Over several nodes, `out` must
be in a folder every node shares: rank 0 reads every shard.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import rich

from mechscope.errors import MechscopeError
from mechscope.index import store
from mechscope.index.build import _build_file, _check_same, _Plan, _remove, merge_indexes
from mechscope.index.settings import IndexSettings
from mechscope.runtime import Ranks

__all__ = ["build_sharded", "shard_path", "shard_spans"]


def build_sharded(
    model, out: Path, plan: _Plan, settings: IndexSettings, checkpoint_seconds: float, progress: bool, ranks: Ranks
) -> Path:
    """`build_index` as rank `ranks.rank` of `ranks.world` processes (phases in the module docstring); returns `out`."""
    span = settings.context_range()
    held = _held(out, plan.meta, span, settings.batch_size)
    shards = [shard_path(out, rank, ranks.world) for rank in range(ranks.world)]
    if span[0] + held >= span[1]:
        if ranks.main:
            _remove_merged(shards, span[0] + held)
        return out
    share = shard_spans((span[0] + held, span[1]), settings.batch_size, ranks.world)[ranks.rank]
    title = f"[bold]indexing[/] rank 0 of {ranks.world}" if progress and ranks.main else None
    started = time.perf_counter()
    _build_file(model, shards[ranks.rank], plan, settings, share, checkpoint_seconds, title)
    built = time.perf_counter()
    ranks.wait_for_all()
    waited = time.perf_counter()
    if ranks.main:
        parts = ([out] if held else []) + shards
        _merge_in_place(parts, out)
        if progress:
            rich.get_console().print(
                f"rank 0: its share built in {built - started:.1f} s, waited {waited - built:.1f} s for the other "
                f"ranks, {len(parts)} parts merged in {time.perf_counter() - waited:.1f} s", soft_wrap=True,
            )  # fmt: skip
    ranks.wait_for_all()
    return out


def shard_spans(span: tuple[int, int], batch_size: int, world: int) -> list[tuple[int, int]]:
    """The contexts `span` (start, stop) in `world` contiguous shares of whole batches, as even as can be.

    Batches are counted from `span`'s start (a multiple of `batch_size`), so that every process runs the
    very batches one process would; the last share ends with the partial batch, if there is one.

    >>> shard_spans((0, 38), 4, 2)
    [(0, 20), (20, 38)]
    """
    start, stop = span
    batches = -(-(stop - start) // batch_size)
    if batches < world:
        contexts = f"{stop - start} contexts make" if stop - start != 1 else "1 context makes"
        raise MechscopeError(
            f"{contexts} {batches} batch{'es' * (batches != 1)} of {batch_size}, fewer than the {world} processes: "
            "give each process at least one batch (more tokens, a smaller batch size, or fewer processes)"
        )
    edges = [min(stop, start + batches * rank // world * batch_size) for rank in range(world + 1)]
    return list(zip(edges, edges[1:], strict=False))


def shard_path(out: Path, rank: int, world: int) -> Path:
    """Where rank `rank` of `world` processes builds its share of `out`: idx.duckdb -> idx.rank0-of-2.duckdb."""
    return out.with_name(f"{out.stem}.rank{rank}-of-{world}{out.suffix}")


def check_other_shards(out: Path, world: int) -> None:
    """Refuse to build `out` beside the shards of a build over another number of processes: only that
    number resumes them, and a build over this one would leave them behind."""
    pattern = re.compile(re.escape(out.stem) + r"\.rank\d+-of-(\d+)" + re.escape(out.suffix))
    for path in sorted(out.parent.iterdir()):
        found = pattern.fullmatch(path.name)
        if found and int(found[1]) != world:
            raise MechscopeError(
                f"{str(path)!r} is a shard of an unfinished build of {str(out)!r} over {found[1]} processes: "
                f"resume it over {found[1]} processes, or remove its shards to start over with {world}"
            )


def _held(out: Path, want: dict, span, batch_size: int) -> int:
    """How many contexts of `span` the index `out` holds (0 when there is none), if a sharded build can
    continue it: complete, of the same settings, over the first contexts, ending at a whole batch."""
    if not out.exists():
        return 0
    con = store.open_index(out)
    try:
        have = store.read_meta(con)
    finally:
        con.close()
    _check_same(out, have, want)
    (start, stop), done = span, have["contexts_done"]
    if not have["complete"]:
        raise MechscopeError(
            f"{str(out)!r} is an unfinished index: finish it with one process (the same build without torchrun) "
            "or use another --out"
        )
    if have["contexts"][0] != start or stop < start + done or (start + done < stop and (start + done) % batch_size):
        raise MechscopeError(
            f"{str(out)!r} holds contexts {have['contexts'][0]}..{have['contexts'][0] + done - 1}, which a build of "
            f"contexts {start}..{stop - 1} in batches of {batch_size} cannot continue: use another --out"
        )
    return done


def _merge_in_place(parts: list[Path], out: Path) -> None:
    """Merge `parts` into `out` through a hidden file renamed to `out`, then remove the parts (but `out`)."""
    missing = [part for part in parts if not part.is_file()]
    if missing:
        raise MechscopeError(
            f"rank 0 cannot see {str(missing[0])!r}: over several nodes, --out must be in a folder every node shares"
        )
    merging = out.with_name(f".{out.name}.merging")
    _remove(merging)  # left behind by a merge that was cut short
    merge_indexes(parts, merging)
    os.replace(merging, out)
    for part in parts:
        if part != out:
            _remove(part)


def _remove_merged(shards: list[Path], stop: int) -> None:
    """Remove the shards that hold no context from `stop` on: merged already, by a merge cut short after its rename."""
    for shard in shards:
        if shard.is_file():
            con = store.open_index(shard)
            try:
                merged = store.read_meta(con)["contexts"][1] <= stop
            finally:
                con.close()
            if merged:
                _remove(shard)
