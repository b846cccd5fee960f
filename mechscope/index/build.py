"""Building an index in one streaming pass, resuming it, and merging shards.

Phases of `build_index`:

1. plan: check the sites, number their units, and open (or create) the database. An existing
   database must be for the same model and settings; if it is unfinished, the build resumes.
2. stream: pack the corpus into contexts (seeded, reproducible), run the model on each batch,
   reading only the chosen sites and stopping after the deepest one, and fold every site's
   activations into `UnitStats`. The first `skip` positions of each context are left out of the
   statistics: the start token, and the first few text tokens, where a model without a BOS token
   parks its attention and its neurons take outlier values (SmolLM2: ~200 where ~40 is typical).
3. checkpoint: every `checkpoint_seconds`, and at the end, write the new contexts, the statistics
   and the progress in one transaction. A build killed at any moment resumes from its last
   checkpoint, re-reading the corpus to the same place, and ends identical to an uninterrupted one.
   Asking an existing index for more tokens continues it the same way.

`merge_indexes` joins shards built over disjoint ranges of the same packed corpus.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mechscope.data import corpus as make_corpus
from mechscope.data import pack
from mechscope.errors import MechscopeError
from mechscope.index import store
from mechscope.index.stats import HIGH_EXP, LOW_EXP, PER_OCTAVE, UnitStats
from mechscope.index.units import IndexedSite, plan_sites, unit_names
from mechscope.models.load import cache_dir

# Settings two builds must share to be resumed or merged.
SHARED = ("model_fingerprint", "sites", "corpus", "ctx_len", "batch_size", "seed", "skip", "k", "n_samples", "threshold", "bins")


@dataclass(frozen=True)
class IndexSettings:
    """How an index is built."""

    corpus: str | None = None
    """Corpus spec: None for the built-in CPython documentation, a .txt/.jsonl/.parquet file or folder, or hf:NAME."""
    field: str = "text"
    """Text field of JSONL records or Parquet rows."""
    tokens: int = 100_000
    """Tokens to read (rounded up to whole contexts), when `contexts` is not given."""
    ctx_len: int = 128
    """Tokens per context, the start token included."""
    batch_size: int = 8
    """Contexts per forward pass."""
    k: int = 20
    """Top examples kept per unit."""
    n_samples: int = 5
    """Samples kept per octave of activation per unit."""
    threshold: float = 0.0
    """A token counts towards a unit's density when its activation is above this."""
    seed: int = 0
    """Shuffle seed of the corpus's documents."""
    skip: int = 4
    """Positions at the start of each context that are not scored: the start token and the first text tokens."""
    contexts: tuple[int, int] | None = None
    """Build only contexts start..stop-1 (a shard); start must be a multiple of batch_size."""

    def __post_init__(self):
        if not 1 <= self.skip < self.ctx_len:
            raise MechscopeError(f"skip {self.skip} out of range: give 1..{self.ctx_len - 1} (the start token is never scored)")
        for name in ("tokens", "batch_size", "k", "n_samples"):
            if getattr(self, name) < 1:
                raise MechscopeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.contexts is not None:
            start, stop = self.contexts
            if not 0 <= start < stop:
                raise MechscopeError(f"bad context range {start}:{stop}: give START:STOP with 0 <= START < STOP")
            if start % self.batch_size:
                raise MechscopeError(f"shard start {start} is not a multiple of the batch size {self.batch_size}")

    def context_range(self) -> tuple[int, int]:
        return self.contexts or (0, -(-self.tokens // self.ctx_len))


def default_index_path(model_name: str) -> Path:
    """Where the CLI and the demo keep a model's index when no --db/--out is given."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    return cache_dir() / "index" / f"{safe}.duckdb"


def _version() -> str:
    try:
        return version("mechscope")
    except PackageNotFoundError:
        return "unknown"


def model_fingerprint(model) -> str:
    """A short hash of the model's configuration and of some of its weights."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version", "dtype")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for param in list(model.hf.parameters())[:3]:
        digest.update(param.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _meta(model, sites: list[IndexedSite], settings: IndexSettings, corpus_id: str) -> dict:
    return {
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


def _check_same(path: Path, have: dict, want: dict) -> None:
    if have.get("model_fingerprint") != want["model_fingerprint"]:
        raise MechscopeError(
            f"{str(path)!r} was built for another model ({have.get('model')}, fingerprint {have.get('model_fingerprint')}), "
            f"not {want['model']} ({want['model_fingerprint']}): pass that model or another --out"
        )
    for key in SHARED:
        if have.get(key) != want[key]:
            raise MechscopeError(
                f"{str(path)!r} was built with {key}={have.get(key)!r}, not {want[key]!r}: use the same settings or another --out"
            )


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]indexing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def build_index(
    model,
    out: Path | str,
    sites: list[str] | None = None,
    settings: IndexSettings | None = None,
    checkpoint_seconds: float = 60.0,
    progress: bool = True,
) -> Path:
    """Build (or resume) the index of `sites` (default: every MLP neuron) over a corpus into the DuckDB file `out`.

    >>> build_index(mechscope.load(), "neurons.duckdb", settings=IndexSettings(tokens=100_000))
    """
    settings = settings or IndexSettings()
    out = Path(out)
    planned = plan_sites(model, sites)
    source = make_corpus(settings.corpus, field=settings.field)
    want = _meta(model, planned, settings, source.id)
    start, stop = settings.context_range()

    existed = out.exists()
    con = store.open_index(out, read_only=False) if existed else store.create(out)
    try:
        if existed:
            have = store.read_meta(con)
            _check_same(out, have, want)
            done = have["contexts_done"]
            if have["contexts"][0] != start or stop < start + done:
                raise MechscopeError(
                    f"{str(out)!r} holds contexts {have['contexts'][0]}..{have['contexts'][0] + done - 1}, "
                    f"which a build of contexts {start}..{stop - 1} cannot continue: use another --out"
                )
            if stop != have["contexts"][1]:  # a longer build continues where the shorter one ended
                store.write_meta(con, {"contexts": [start, stop], "complete": False})
            stats = store.read_stats(con, settings.k, settings.n_samples, settings.threshold, settings.ctx_len)
        else:
            stats = UnitStats.empty(sum(s.width for s in planned), settings.k, settings.n_samples, settings.threshold)
            done = 0
            con.execute("BEGIN")
            store.write_meta(con, {**want, "contexts": [start, stop], "contexts_done": 0, "tokens_seen": 0, "complete": False})
            store.write_sites(con, [(s.site, s.layer, s.first_unit, s.width) for s in planned])
            store.write_stats(con, stats, unit_names(planned), settings.ctx_len)
            con.execute("COMMIT")
        if start + done < stop:
            _stream(model, con, planned, source, settings, stats, (start, stop), done, checkpoint_seconds, progress)
    finally:
        con.close()
    return out


def _stream(model, con, planned, source, settings, stats, span, done, checkpoint_seconds, progress) -> None:
    start, stop = span
    length = settings.ctx_len
    names = unit_names(planned)
    read = [s.site for s in planned]
    pending: list = []
    last = time.monotonic()
    stored = _stored_tokens(con, start, start + done, length) if done else None
    with _progress(progress) as bar, torch.inference_mode():
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
            _fold(model, stats, planned, read, batch.tokens, first * length, settings.skip)
            pending.append(batch)
            done += n
            bar.update(task, completed=done * length)
            if time.monotonic() - last > checkpoint_seconds or start + done >= stop:
                _checkpoint(con, stats, names, pending, done, start + done >= stop, length)
                pending, last = [], time.monotonic()
    if start + done < stop:  # the corpus ran out first
        _checkpoint(con, stats, names, pending, done, True, length)


def _fold(model, stats: UnitStats, planned: list[IndexedSite], read: list[str], tokens, first_token: int, skip: int) -> None:
    """Run one batch and fold every site's activations (positions skip.. only) into `stats`."""
    n, length = tokens.shape
    positions = torch.arange(skip, length).repeat(n)
    global_index = first_token + torch.arange(n).repeat_interleave(length - skip) * length + positions
    cache = model.run(tokens, read=read, logits=False).cache
    for i, site in enumerate(planned):
        acts = cache.pop(site.site)[:, skip:]
        stats.update(site.first_unit, acts.reshape(-1, site.width), global_index, positions, count_tokens=i == 0)


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
    """One index from shards of the same build settings over disjoint context ranges (in any order)."""
    if len(parts) < 2:
        raise MechscopeError(f"give at least two index databases to merge, got {len(parts)}")
    out = Path(out)
    if out.exists():
        raise MechscopeError(f"{str(out)!r} already exists: merge into a new file")
    metas, cons = [], []
    for part in parts:
        con = store.open_index(part)
        metas.append(store.read_meta(con))
        cons.append(con)
    order = sorted(range(len(parts)), key=lambda i: metas[i]["contexts"][0])
    first = metas[order[0]]
    for i in order:
        if not metas[i]["complete"]:
            raise MechscopeError(f"{str(parts[i])!r} is unfinished: run its build again to complete it before merging")
        for key in SHARED:
            if metas[i][key] != first[key]:
                raise MechscopeError(f"cannot merge {str(parts[i])!r}: its {key} is {metas[i][key]!r}, not {first[key]!r}")
    for a, b in zip(order, order[1:], strict=False):
        if metas[a]["contexts"][1] > metas[b]["contexts"][0]:
            raise MechscopeError(f"cannot merge: {str(parts[a])!r} and {str(parts[b])!r} overlap in contexts")
    args = (first["k"], first["n_samples"], first["threshold"], first["ctx_len"])
    stats = None
    for i in order:
        part = store.read_stats(cons[i], *args)
        stats = part if stats is None else stats.merge(part)
    sites = cons[order[0]].execute("SELECT site, layer, first_unit, width FROM sites ORDER BY first_unit").fetchall()
    planned = [IndexedSite(*row) for row in sites]
    merged = store.create(out)
    try:
        merged.execute("BEGIN")
        for i in order:
            rows = cons[i].execute("SELECT * FROM tokens ORDER BY ctx, pos").fetchnumpy()  # noqa: F841
            merged.execute("INSERT INTO tokens SELECT * FROM rows")
        store.write_sites(merged, sites)
        store.write_stats(merged, stats, unit_names(planned), first["ctx_len"])
        spans = [metas[i]["contexts"] for i in order]
        store.write_meta(
            merged,
            {
                **first,
                "contexts": [spans[0][0], spans[-1][1]] if _contiguous(spans) else spans[0],
                "shards": spans,
                "contexts_done": sum(metas[i]["contexts_done"] for i in order),
                "tokens_seen": int(stats.tokens),
                "complete": True,
                "corpus_hash": corpus_hash(merged),
            },
        )
        merged.execute("COMMIT")
    finally:
        merged.close()
        for con in cons:
            con.close()
    return out


def _contiguous(spans: list[list[int]]) -> bool:
    return all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
