"""Building an index in one streaming pass, resuming it, and merging shards.

Phases of `build_index`:

1. plan: check the settings against the model and the corpus, check the sites and the dictionaries
   and number their units (a dictionary's features after the sites: `features.py`), and only then
   open (or create) the database. An existing database must be for the same model, settings and
   dictionaries; if it is unfinished, the build resumes (one that holds no context yet is started
   afresh). A new database that a build leaves before its first checkpoint is removed.
2. stream: pack the corpus into contexts (seeded, reproducible), run the model on each batch,
   reading only the chosen sites and the dictionaries' read sites and stopping after the deepest one,
   encode the dictionaries' features, and fold every unit's activations into `UnitStats`. The first
   `skip` positions of each context are left out of the statistics: the start token, and the first
   few text tokens, where a model without a BOS token parks its attention and its neurons take
   outlier values (SmolLM2: ~200 where ~40 is typical).
3. checkpoint: every `checkpoint_seconds`, and at the end, write the new contexts, the statistics
   and the progress in one transaction. A build killed at any moment resumes from its last
   checkpoint, re-reading the corpus to the same place, and ends identical to an uninterrupted one.
   Asking an existing index for more tokens continues it the same way.
4. compact: a build that ends complete with more than a tenth of its file free (the space of rows
   replaced at checkpoints) copies the database into a fresh file that replaces it, so that an
   index resumed over many checkpoints takes no more disk than one written at once.

`merge_indexes` joins shards built over disjoint ranges of the same packed corpus. Under `torchrun`,
`build_index` shares the contexts out among the processes and merges their shards itself (`sharded.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mechscope.data import corpus as make_corpus
from mechscope.data import pack
from mechscope.errors import MechscopeError
from mechscope.index import store
from mechscope.index.features import DictionarySpec, IndexedDictionary, feature_acts, plan_dictionaries, read_sites
from mechscope.index.settings import IndexSettings, check_against
from mechscope.index.stats import HIGH_EXP, LOW_EXP, PER_OCTAVE, UnitStats
from mechscope.index.units import IndexedSite, plan_sites, unit_names
from mechscope.models.fingerprint import model_fingerprint
from mechscope.models.load import cache_dir
from mechscope.runtime import Ranks

__all__ = ["IndexSettings", "build_index", "default_index_path", "merge_indexes"]

# Settings two builds must share to be resumed or merged.
SHARED = (
    "model_fingerprint",
    "sites",
    "dictionaries",
    "corpus",
    "ctx_len",
    "batch_size",
    "seed",
    "skip",
    "k",
    "n_samples",
    "threshold",
    "bins",
)


def default_index_path(model_name: str) -> Path:
    """Where the CLI and the demo keep a model's index when no --db/--out is given."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    return cache_dir() / "index" / f"{safe}.duckdb"


def _version() -> str:
    try:
        return version("mechscope")
    except PackageNotFoundError:
        return "unknown"


def _meta(model, sites: list[IndexedSite], dicts: list[IndexedDictionary], settings: IndexSettings, corpus_id: str) -> dict:
    meta = {
        "format": store.FORMAT,
        "model": model.name,
        "model_fingerprint": model_fingerprint(model),
        "sites": [s.site for s in sites],
        "corpus": corpus_id,
        "ctx_len": settings.ctx_len,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "skip": settings.skip,
        "k": settings.k,
        "n_samples": settings.n_samples,
        "threshold": settings.threshold,
        "bins": [LOW_EXP, HIGH_EXP, PER_OCTAVE],
        "mechscope": _version(),
    }
    if dicts:  # an index without features has no such key, as before features were indexed
        meta["dictionaries"] = [d.meta() for d in dicts]
    return meta


def _check_same(path: Path, have: dict, want: dict) -> None:
    if have.get("model_fingerprint") != want["model_fingerprint"]:
        raise MechscopeError(
            f"{str(path)!r} was built for another model ({have.get('model')}, fingerprint {have.get('model_fingerprint')}), "
            f"not {want['model']} ({want['model_fingerprint']}): pass that model or another --out"
        )
    for key in SHARED:
        if have.get(key) != want.get(key):
            raise MechscopeError(
                f"{str(path)!r} was built with {key}={have.get(key)!r}, not {want.get(key)!r}: "
                "use the same settings or another --out"
            )


def _progress(title: str | None) -> Progress:
    """A progress bar headed `title`; None hides it."""
    return Progress(
        TextColumn(title or ""),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeRemainingColumn(),
        disable=title is None,
    )


class _Plan(NamedTuple):
    """What a build reads and records, every check passed and nothing written yet."""

    sites: list[IndexedSite]
    """The chosen sites, then one site per dictionary: its features."""
    dicts: list[IndexedDictionary]
    """The dictionaries whose features are indexed."""
    source: object
    """The corpus (`mechscope.data.corpus`)."""
    meta: dict
    """The settings an existing database must share to be resumed (`_meta`)."""


def build_index(
    model,
    out: Path | str,
    sites: list[str] | None = None,
    settings: IndexSettings | None = None,
    checkpoint_seconds: float = 60.0,
    progress: bool = True,
    dictionaries: DictionarySpec | None = None,
) -> Path:
    """Build (or resume) the index of `sites` and of `dictionaries`' features over a corpus into the DuckDB file `out`.

    `sites` defaults to every MLP neuron, or to none when dictionaries are given. `dictionaries` are
    folders in any format `load_any` reads (named after the folder), or a mapping NAME -> folder or
    `Dictionary`; feature F of NAME is the unit `f:NAME:F` (see `features.py`).

    Every check (settings, sites, corpus, the output path, an existing file's settings) comes before
    anything is written; bad input raises `MechscopeError` (`SettingError` for a setting out of range).

    Under `torchrun` (WORLD_SIZE > 1), every process calls this with the same arguments: each builds its
    share of the contexts beside `out`, and rank 0 merges the shares into `out` (see `sharded.py`).

    >>> build_index(mechscope.load(), "neurons.duckdb", settings=IndexSettings(tokens=100_000))
    >>> build_index(model, "features.duckdb", dictionaries={"res5": "runs/res5/dictionary"})
    """
    settings = settings or IndexSettings()
    out = _writable(Path(out))
    plan = _plan(model, sites, settings, dictionaries)
    from mechscope.index import sharded  # it builds on this module, so it is imported here, not at the top

    ranks = Ranks.from_environment()
    sharded.check_other_shards(out, ranks.world)
    if ranks.world > 1:
        return sharded.build_sharded(model, out, plan, settings, checkpoint_seconds, progress, ranks)
    _build_file(model, out, plan, settings, settings.context_range(), checkpoint_seconds, "[bold]indexing" if progress else None)
    return out


def _plan(model, sites: list[str] | None, settings: IndexSettings, dictionaries: DictionarySpec | None) -> _Plan:
    """Check the sites, the dictionaries, the corpus and the settings against the model (phase 1)."""
    planned = plan_sites(model, sites) if sites or not dictionaries else []
    dicts = plan_dictionaries(model, dictionaries, sum(s.width for s in planned))
    planned += [d.site for d in dicts]
    source = make_corpus(settings.corpus, field=settings.field)
    check_against(settings, model, source)
    return _Plan(planned, dicts, source, _meta(model, planned, dicts, settings, source.id))


def _build_file(model, out: Path, plan: _Plan, settings: IndexSettings, span, checkpoint_seconds, title: str | None) -> None:
    """Build (or resume) contexts `span` (start, stop) into the database `out` (phases 2-4), under a progress
    bar headed `title` (None: no bar)."""
    fresh = not out.exists() or _holds_nothing(out)
    con = store.create(out) if fresh else store.open_index(out, read_only=False)
    try:
        stats, done = (
            _begin(con, plan.sites, settings, plan.meta, span) if fresh else _resume(con, out, settings, plan.meta, span)
        )
        stale = out.with_name(out.name + ".compact").exists()  # a compaction that was cut short
        if span[0] + done < span[1]:
            _stream(model, con, plan.sites, plan.dicts, plan.source, settings, stats, span, done, checkpoint_seconds, title)
        if (span[0] + done < span[1] or stale) and store.read_meta(con)["complete"] and store.free_share(con) > 0.1:
            store.compact(con, out)
    except BaseException:
        if fresh:
            _discard_if_empty(con, out)
        raise
    finally:
        con.close()


def _writable(out: Path) -> Path:
    """`out` if a database file can be written there; one line naming the path otherwise."""
    if out.is_dir():
        raise MechscopeError(store.not_a_file(out))
    if not out.parent.is_dir():
        raise MechscopeError(f"cannot write {str(out)!r}: the folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise MechscopeError(f"cannot write {str(out)!r}: no permission to write there")
    return out


def _holds_nothing(out: Path) -> bool:
    """True (and the file removed) for an index that holds no context yet: a new build starts afresh there."""
    con = store.open_index(out)
    try:
        empty = store.read_meta(con).get("contexts_done", 0) == 0
    finally:
        con.close()
    if empty:
        _remove(out)
    return empty


def _remove(out: Path) -> None:
    for path in (out, out.with_name(out.name + ".wal")):
        path.unlink(missing_ok=True)


def _discard_if_empty(con, out: Path) -> None:
    """Remove a database this build created if the build stopped before its first checkpoint."""
    with contextlib.suppress(Exception):  # no transaction was open
        con.execute("ROLLBACK")
    try:
        done = store.read_meta(con).get("contexts_done", 0)
    except Exception:  # noqa: BLE001 (cannot tell what it holds: leave it)
        return
    if done == 0:
        con.close()
        _remove(out)


def _begin(con, planned: list[IndexedSite], settings: IndexSettings, want: dict, span) -> tuple[UnitStats, int]:
    """Write a new index's settings, sites and empty statistics; (statistics, contexts done = 0)."""
    stats = UnitStats.empty(sum(s.width for s in planned), settings.k, settings.n_samples, settings.threshold, settings.seed)
    con.execute("BEGIN")
    store.write_meta(con, {**want, "contexts": list(span), "contexts_done": 0, "tokens_seen": 0, "complete": False})
    store.write_sites(con, [(s.site, s.layer, s.first_unit, s.width) for s in planned])
    store.write_stats(con, stats, unit_names(planned), settings.ctx_len)
    con.execute("COMMIT")
    return stats, 0


def _resume(con, out: Path, settings: IndexSettings, want: dict, span) -> tuple[UnitStats, int]:
    """An existing index's statistics and contexts done, after checking it was built the same way."""
    have = store.read_meta(con)
    _check_same(out, have, want)
    (start, stop), done = span, have["contexts_done"]
    if have["contexts"][0] != start or stop < start + done:
        raise MechscopeError(
            f"{str(out)!r} holds contexts {have['contexts'][0]}..{have['contexts'][0] + done - 1}, "
            f"which a build of contexts {start}..{stop - 1} cannot continue: use another --out"
        )
    if stop != have["contexts"][1]:  # a longer build continues where the shorter one ended
        store.write_meta(con, {"contexts": [start, stop], "complete": False})
    s = settings
    return store.read_stats(con, s.k, s.n_samples, s.threshold, s.ctx_len, s.seed), done


def _stream(model, con, planned, dicts, source, settings, stats, span, done, checkpoint_seconds, title: str | None) -> None:
    start, stop = span
    length = settings.ctx_len
    names = unit_names(planned)
    sites = [s for s in planned if not any(s is d.site for d in dicts)]
    read = list(dict.fromkeys([*(s.site for s in sites), *read_sites(dicts)]))
    pending: list = []
    last = time.monotonic()
    stored = _stored_tokens(con, start, start + done, length) if done else None
    with _progress(title) as bar, torch.inference_mode():
        task = bar.add_task("index", total=(stop - start) * length, completed=done * length)
        for batch in pack(source, model.tokenizer, length, seed=settings.seed, batch_size=settings.batch_size, max_contexts=stop):
            first, n = batch.start, len(batch.tokens)
            if first + n <= start:
                continue
            if first < start + done:  # re-read on resume: it must be the corpus the build began with
                if not torch.equal(batch.tokens, stored[first - start : first - start + n]):
                    raise MechscopeError(
                        f"the corpus {source.id} has changed since this index was begun: rebuild it into another --out"
                    )
                continue
            _fold(model, stats, sites, dicts, read, batch.tokens, first * length, settings.skip)
            pending.append(batch)
            done += n
            bar.update(task, completed=done * length)
            if time.monotonic() - last > checkpoint_seconds or start + done >= stop:
                _checkpoint(con, stats, names, pending, done, start + done >= stop, length)
                pending, last = [], time.monotonic()
    if start + done < stop:  # the corpus ran out first
        _checkpoint(con, stats, names, pending, done, True, length)


def _fold(
    model,
    stats: UnitStats,
    sites: list[IndexedSite],
    dicts: list[IndexedDictionary],
    read: list[str],
    tokens,
    first_token: int,
    skip: int,
) -> None:
    """Run one batch and fold every site's and feature's activations (positions skip.. only) into `stats`.

    The model (and the dictionaries) run on the model's device; the statistics are kept on the CPU."""
    n, length = tokens.shape
    positions = torch.arange(skip, length).repeat(n)
    global_index = first_token + torch.arange(n).repeat_interleave(length - skip) * length + positions
    cache = model.run(tokens, read=read, logits=False).cache
    for i, d in enumerate(dicts):  # before the sites' activations are popped: a dictionary may read one of them
        acts = feature_acts(d.dictionary, cache, skip).cpu()
        stats.update(d.site.first_unit, acts, global_index, positions, count_tokens=i == 0)
    for i, site in enumerate(sites):
        acts = cache.pop(site.site)[:, skip:].cpu()
        stats.update(site.first_unit, acts.reshape(-1, site.width), global_index, positions, count_tokens=i == 0 and not dicts)


def _checkpoint(con, stats: UnitStats, names, pending, done: int, complete: bool, length: int) -> None:
    con.execute("BEGIN")
    for batch in pending:
        store.append_tokens(con, batch.start, batch.tokens, batch.docs)
    store.write_stats(con, stats, names, length)
    meta = {"contexts_done": done, "tokens_seen": int(stats.tokens), "complete": complete}
    if complete:
        meta["corpus_hash"] = corpus_hash(con)
    store.write_meta(con, meta)
    con.execute("COMMIT")


def _stored_tokens(con, first: int, stop: int, length: int) -> torch.Tensor:
    got = con.execute("SELECT token FROM tokens WHERE ctx >= ? AND ctx < ? ORDER BY ctx, pos", [first, stop]).fetchnumpy()
    return torch.from_numpy(got["token"].astype(np.int64)).view(-1, length)


def corpus_hash(con) -> str:
    """sha256 of every stored context's token ids in order: equal for one build and for merged shards."""
    got = con.execute("SELECT token FROM tokens ORDER BY ctx, pos").fetchnumpy()
    return hashlib.sha256(got["token"].astype("<i4").tobytes()).hexdigest()[:16]


def merge_indexes(parts: list[Path | str], out: Path | str) -> Path:
    """One index from shards of the same build settings over disjoint context ranges (in any order).

    Raises `MechscopeError` for fewer than two shards, an unfinished one, different settings or
    overlapping contexts, and for an `out` that exists; a merge that fails leaves no `out` behind.
    """
    if len(parts) < 2:
        raise MechscopeError(f"give at least two index databases to merge, got {len(parts)}")
    out = _writable(Path(out))
    if out.exists():
        raise MechscopeError(f"{str(out)!r} already exists: merge into a new file")
    cons = []
    try:
        for part in parts:
            cons.append(store.open_index(part))
        metas = [store.read_meta(con) for con in cons]
        order = _check_shards(parts, metas)
        merged = store.create(out)
        try:
            _write_merged(merged, [cons[i] for i in order], [metas[i] for i in order])
        except BaseException:
            merged.close()
            _remove(out)
            raise
        merged.close()
    finally:
        for con in cons:
            con.close()
    return out


def _check_shards(parts: list, metas: list[dict]) -> list[int]:
    """The shards in context order, after checking they are complete, alike and disjoint."""
    order = sorted(range(len(parts)), key=lambda i: metas[i]["contexts"][0])
    first = metas[order[0]]
    for i in order:
        if not metas[i]["complete"]:
            raise MechscopeError(f"{str(parts[i])!r} is unfinished: run its build again to complete it before merging")
        for key in SHARED:
            if metas[i].get(key) != first.get(key):
                raise MechscopeError(
                    f"cannot merge {str(parts[i])!r}: its {key} is {metas[i].get(key)!r}, not {first.get(key)!r}"
                )
    for a, b in zip(order, order[1:], strict=False):
        if metas[a]["contexts"][1] > metas[b]["contexts"][0]:
            raise MechscopeError(f"cannot merge: {str(parts[a])!r} and {str(parts[b])!r} overlap in contexts")
    return order


def _write_merged(merged, cons: list, metas: list[dict]) -> None:
    """Write the shards (in context order) into the new database `merged`, in one transaction."""
    first = metas[0]
    args = (first["k"], first["n_samples"], first["threshold"], first["ctx_len"], first["seed"])
    stats = None
    for con in cons:
        part = store.read_stats(con, *args)
        stats = part if stats is None else stats.merge(part)
    sites = cons[0].execute("SELECT site, layer, first_unit, width FROM sites ORDER BY first_unit").fetchall()
    merged.execute("BEGIN")
    for con in cons:
        rows = con.execute("SELECT * FROM tokens ORDER BY ctx, pos").fetchnumpy()  # noqa: F841
        merged.execute("INSERT INTO tokens SELECT * FROM rows")
    store.write_sites(merged, sites)
    store.write_stats(merged, stats, unit_names([IndexedSite(*row) for row in sites]), first["ctx_len"])
    spans = [meta["contexts"] for meta in metas]
    done = sum(meta["contexts_done"] for meta in metas)
    store.write_meta(
        merged,
        {
            **first,
            "contexts": [spans[0][0], spans[-1][1]] if _contiguous(spans) else spans[0],
            "shards": spans,
            "contexts_done": done,
            "tokens_seen": int(stats.tokens),
            "complete": True,
            "corpus_hash": corpus_hash(merged),
        },
    )
    merged.execute("COMMIT")


def _contiguous(spans: list[list[int]]) -> bool:
    return all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
