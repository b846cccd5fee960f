"""The index database: one DuckDB file that any SQL tool can read.

Tables (a unit is a neuron, or one dimension of a site; `unit` numbers them globally):

| table | columns | one row per |
| --- | --- | --- |
| `meta` | key, value (JSON) | setting: model, fingerprint, sites, corpus, ctx_len, k, ... |
| `sites` | site, layer, first_unit, width | site read (units first_unit .. first_unit+width-1) |
| `units` | unit, site, layer, idx, tokens, total, total_sq, active, max, mean, density | unit |
| `top` | unit, rank, value, ctx, pos, token, window_acts | one of a unit's top-k examples |
| `samples` | unit, stratum, slot, value, ctx, pos, token | a stratified sample (strata: `stats.stratum_range`) |
| `hist` | unit, bin, count | non-empty histogram bin (edges: `stats.bin_edges()`) |
| `tokens` | ctx, pos, token, doc | token of a stored context (doc -1: start token or separator) |

Position 0 of every context is the start token; it and the next `skip - 1` positions (meta `skip`)
are stored in `tokens` but never counted in statistics. Every write of the statistics happens in
one transaction with the new contexts and the progress counters, so a build killed at any moment
leaves the last checkpoint intact.

Samples: stratum 0..52 runs over the ranges of activation in order of value (26 negative octaves,
|x| < 2^-10, 26 positive octaves); slot 0..R-1 orders a stratum's samples by their priority.
A unit's `max` is NULL while the index has seen no tokens.

DuckDB does not give back the space of replaced rows, so a finished build whose file is more than
a tenth free space is copied into a fresh file (`compact`), which then replaces the old one atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import numpy as np
import torch

from mechscope.errors import MechscopeError
from mechscope.index.stats import NO_TOKEN, WINDOW, UnitStats

FORMAT = "mechscope-index/3"  # 2: histogram and strata reach 2^16; 3: samples from every range of either sign, uniform
_REBUILD = "rebuild it with `mechscope index build`"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS sites (site VARCHAR, layer INTEGER, first_unit INTEGER, width INTEGER);
CREATE TABLE IF NOT EXISTS units (unit INTEGER, site VARCHAR, layer INTEGER, idx INTEGER, tokens BIGINT, total DOUBLE,
    total_sq DOUBLE, active BIGINT, max REAL, mean DOUBLE, density DOUBLE);
CREATE TABLE IF NOT EXISTS top (unit INTEGER, rank SMALLINT, value REAL, ctx INTEGER, pos SMALLINT, token INTEGER,
    window_acts BLOB);
CREATE TABLE IF NOT EXISTS samples (unit INTEGER, stratum SMALLINT, slot SMALLINT, value REAL, ctx INTEGER, pos SMALLINT,
    token INTEGER);
CREATE TABLE IF NOT EXISTS hist (unit INTEGER, bin SMALLINT, count BIGINT);
CREATE TABLE IF NOT EXISTS tokens (ctx INTEGER, pos SMALLINT, token INTEGER, doc INTEGER);
"""


def create(path: Path | str) -> duckdb.DuckDBPyConnection:
    """A new (or existing) index database with every table present."""
    con = duckdb.connect(str(path))
    con.execute(SCHEMA)
    return con


def open_index(path: Path | str, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """Open an existing index; one-line errors for a missing file or one that is not a mechscope index."""
    path = Path(path)
    if path.is_dir():
        raise MechscopeError(not_a_file(path))
    if not path.is_file():
        raise MechscopeError(f"no index database at {str(path)!r}: build one with `mechscope index build --out {path}`")
    try:
        con = duckdb.connect(str(path), read_only=read_only)
        fmt = con.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    except duckdb.IOException as err:
        if "lock" in str(err).lower():
            raise MechscopeError(
                f"{str(path)!r} is in use by another process (a build still running?): wait for it, or work on a copy"
            ) from None
        raise MechscopeError(f"{str(path)!r} is not a readable mechscope index ({_first_line(err)}): {_REBUILD}") from None
    except duckdb.Error as err:
        reason = _first_line(err)
        raise MechscopeError(
            f"{str(path)!r} is not a readable mechscope index ({reason}): rebuild it with `mechscope index build`"
        ) from None
    if fmt is None or json.loads(fmt[0]) != FORMAT:
        con.close()
        raise MechscopeError(
            f"{str(path)!r} is not a mechscope index of format {FORMAT}: rebuild it with `mechscope index build`"
        )
    return con


def not_a_file(path: Path) -> str:
    """The one line for a directory given where an index database file belongs."""
    inside = sorted(p.name for p in path.glob("*.duckdb"))[:4]
    hint = f"it holds {', '.join(inside)}" if inside else f"e.g. {str(path / 'index.duckdb')!r}"
    return f"{str(path)!r} is a directory, not an index database: give the database file ({hint})"


def stored_format(path: Path | str) -> str | None:
    """The index format a database file says it has (None if it is not an index at all)."""
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            row = con.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    except duckdb.Error:
        return None
    return json.loads(row[0]) if row else None


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:120]


def read_meta(con: duckdb.DuckDBPyConnection) -> dict:
    return {key: json.loads(value) for key, value in con.execute("SELECT key, value FROM meta").fetchall()}


def write_meta(con: duckdb.DuckDBPyConnection, meta: dict) -> None:
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])


def write_sites(con: duckdb.DuckDBPyConnection, sites: list[tuple[str, int | None, int, int]]) -> None:
    con.execute("DELETE FROM sites")
    con.executemany("INSERT INTO sites VALUES (?, ?, ?, ?)", sites)


def append_tokens(con: duckdb.DuckDBPyConnection, start: int, tokens: torch.Tensor, docs: torch.Tensor) -> None:
    """Store contexts start.. ([n, ctx_len] token ids and document ids)."""
    n, length = tokens.shape
    rows = {  # noqa: F841
        "ctx": np.repeat(np.arange(start, start + n, dtype=np.int32), length),
        "pos": np.tile(np.arange(length, dtype=np.int16), n),
        "token": tokens.numpy().astype(np.int32).ravel(),
        "doc": docs.numpy().astype(np.int32).ravel(),
    }
    con.execute("INSERT INTO tokens SELECT * FROM rows")


def _blobs(rows: np.ndarray) -> np.ndarray:
    """Each row of a 2-D float16 array as little-endian bytes (a BLOB)."""
    rows = rows.astype("<f2")
    return np.array([row.tobytes() for row in rows], dtype=object)


def _split(token: np.ndarray, ctx_len: int) -> tuple[np.ndarray, np.ndarray]:
    return (token // ctx_len).astype(np.int32), (token % ctx_len).astype(np.int16)


def _insert_with_tokens(con: duckdb.DuckDBPyConnection, table: str, rows: dict, columns: str) -> None:
    """Insert `rows` (a dict of arrays) into `table`, looking up each (ctx, pos)'s token id in `tokens`.

    DuckDB does the lookup as a join, which keeps memory bounded whatever the corpus size, and the
    rows land sorted by unit, so a query for one unit reads only the blocks holding it.
    """
    new_rows = rows  # noqa: F841 (DuckDB reads local dicts of arrays by name)
    con.execute(
        f"INSERT INTO {table} SELECT {columns} FROM new_rows r JOIN tokens t ON t.ctx = r.ctx AND t.pos = r.pos ORDER BY r.unit"
    )


def write_stats(
    con: duckdb.DuckDBPyConnection, stats: UnitStats, unit_sites: list[tuple[str, int | None, int]], ctx_len: int
) -> None:
    """Replace the statistics tables with `stats` (call inside a transaction).

    `unit_sites` gives, for each unit in order, its (site, layer, index within the site).
    """
    for table in ("units", "top", "samples", "hist"):
        con.execute(f"DELETE FROM {table}")
    n_units, tokens = stats.n_units, int(stats.tokens)
    unit = np.arange(n_units, dtype=np.int32)
    top_values = stats.top_values.numpy()
    unit_rows = {  # noqa: F841 (DuckDB reads local dicts of arrays by name)
        "unit": unit,
        "site": np.array([s for s, _, _ in unit_sites], dtype=object),
        "layer": np.array([-1 if layer is None else layer for _, layer, _ in unit_sites], dtype=np.int32),
        "idx": np.array([i for _, _, i in unit_sites], dtype=np.int32),
        "tokens": np.full(n_units, tokens, np.int64),
        "total": stats.total.numpy(),
        "total_sq": stats.total_sq.numpy(),
        "active": stats.active.numpy(),
        "max": top_values[:, 0],
        "mean": stats.total.numpy() / max(tokens, 1),
        "density": stats.active.numpy() / max(tokens, 1),
    }
    con.execute("INSERT INTO units SELECT * REPLACE (CASE WHEN tokens = 0 THEN NULL ELSE max END AS max) FROM unit_rows")

    held = stats.top_tokens.numpy() != NO_TOKEN
    u, r = np.nonzero(held)
    ctx, pos = _split(stats.top_tokens.numpy()[u, r], ctx_len)
    top_rows = {
        "unit": u.astype(np.int32),
        "rank": r.astype(np.int16),
        "value": top_values[u, r],
        "ctx": ctx,
        "pos": pos,
        "window_acts": _blobs(stats.top_windows.numpy()[u, r]),
    }
    _insert_with_tokens(con, "top", top_rows, "r.unit, r.rank, r.value, r.ctx, r.pos, t.token, r.window_acts")

    held = stats.sample_tokens.numpy() != NO_TOKEN
    u, s, slot = np.nonzero(held)
    ctx, pos = _split(stats.sample_tokens.numpy()[u, s, slot], ctx_len)
    sample_rows = {
        "unit": u.astype(np.int32),
        "stratum": s.astype(np.int16),
        "slot": slot.astype(np.int16),
        "value": stats.sample_values.numpy()[u, s, slot],
        "ctx": ctx,
        "pos": pos,
    }
    _insert_with_tokens(con, "samples", sample_rows, "r.unit, r.stratum, r.slot, r.value, r.ctx, r.pos, t.token")

    hist = stats.hist.numpy()
    u, b = np.nonzero(hist)
    hist_rows = {"unit": u.astype(np.int32), "bin": b.astype(np.int16), "count": hist[u, b]}  # noqa: F841
    con.execute("INSERT INTO hist SELECT * FROM hist_rows")


def read_stats(
    con: duckdb.DuckDBPyConnection, k: int, n_samples: int, threshold: float, ctx_len: int, seed: int = 0
) -> UnitStats:
    """The statistics tables back as `UnitStats`, exactly as they were written (`seed`: the build's, meta `seed`)."""
    units = con.execute("SELECT tokens, total, total_sq, active FROM units ORDER BY unit").fetchnumpy()
    n_units = len(units["total"])
    stats = UnitStats.empty(n_units, k, n_samples, threshold, seed)
    if n_units == 0:
        return stats
    stats.tokens = torch.tensor(int(units["tokens"][0]))
    stats.total = torch.from_numpy(units["total"].copy())
    stats.total_sq = torch.from_numpy(units["total_sq"].copy())
    stats.active = torch.from_numpy(units["active"].astype(np.int64))
    top = con.execute("SELECT unit, rank, value, ctx, pos, window_acts FROM top").fetchnumpy()
    u, r = top["unit"].astype(np.int64), top["rank"].astype(np.int64)
    windows = np.frombuffer(b"".join(top["window_acts"]), dtype="<f2").reshape(-1, WINDOW)
    stats.top_windows[u, r] = torch.from_numpy(windows.copy())
    stats.top_values[u, r] = torch.from_numpy(top["value"].astype(np.float32))
    stats.top_tokens[u, r] = torch.from_numpy(top["ctx"].astype(np.int64) * ctx_len + top["pos"])
    smp = con.execute("SELECT unit, stratum, slot, value, ctx, pos FROM samples").fetchnumpy()
    u, s, slot = (smp[c].astype(np.int64) for c in ("unit", "stratum", "slot"))
    stats.sample_values[u, s, slot] = torch.from_numpy(smp["value"].astype(np.float32))
    stats.sample_tokens[u, s, slot] = torch.from_numpy(smp["ctx"].astype(np.int64) * ctx_len + smp["pos"])
    hist = con.execute("SELECT unit, bin, count FROM hist").fetchnumpy()
    stats.hist[hist["unit"].astype(np.int64), hist["bin"].astype(np.int64)] = torch.from_numpy(hist["count"].astype(np.int64))
    return stats


TABLE_ORDER = {
    "meta": "key",
    "sites": "first_unit",
    "units": "unit",
    "top": "unit, rank",
    "samples": "unit, stratum, slot",
    "hist": "unit, bin",
    "tokens": "ctx, pos",
}
"""Every table, and the order its rows are written in (per-unit tables by unit, for DuckDB's zone maps)."""


def free_share(con: duckdb.DuckDBPyConnection) -> float:
    """Share of the database file's blocks that hold no live rows (after a checkpoint)."""
    con.execute("CHECKPOINT")
    total, free = con.execute("SELECT total_blocks, free_blocks FROM pragma_database_size()").fetchone()
    return free / max(total, 1)


def compact(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Copy the open database at `path` into a fresh file, close `con`, and put the copy in its place.

    The copy holds only live rows, so it is as small as a database written once; the swap is one
    rename, so `path` is always either the old file or the complete copy.
    """
    fresh = path.with_name(path.name + ".compact")
    for stale in (fresh, fresh.with_name(fresh.name + ".wal")):
        stale.unlink(missing_ok=True)
    source = con.execute("SELECT current_database()").fetchone()[0]
    con.execute(f"ATTACH '{_sql_string(fresh)}' AS fresh")
    con.execute("USE fresh")
    con.execute(SCHEMA)
    for table, order in TABLE_ORDER.items():
        con.execute(f'INSERT INTO fresh.{table} SELECT * FROM "{source}".{table} ORDER BY {order}')
    con.execute(f'USE "{source}"')
    con.execute("DETACH fresh")
    con.close()
    os.replace(fresh, path)


def _sql_string(path: Path) -> str:
    return str(path).replace("'", "''")
