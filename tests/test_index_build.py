"""Index builds on SmolLM2 and the built-in corpus: values match the model, kill -9 resumes to the identical
result, shards merge to one build, bad databases or settings get one line, a failed build leaves nothing
that blocks the next one, an unfinished index says so, and a resumed one takes no more disk."""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import duckdb
import numpy as np
import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.index import build as build_module
from mechscope.index import store
from mechscope.index.build import IndexSettings, build_index, merge_indexes
from mechscope.index.query import Index, UnfinishedIndexWarning
from mechscope.index.settings import SettingError

pytestmark = pytest.mark.slow

SITES = ["blocks.0.mlp.hook_post", "blocks.3.hook_resid_post"]
SMALL = dict(ctx_len=32, batch_size=4, k=5, n_samples=2)
TABLES = {
    "units": "unit",
    "top": "unit, rank",
    "samples": "unit, stratum, slot",
    "hist": "unit, bin",
    "tokens": "ctx, pos",
    "sites": "first_unit",
}


def _build(model, path, contexts=(0, 24), **kw):
    settings = IndexSettings(contexts=contexts, **{**SMALL, **kw})
    return build_index(model, path, sites=SITES, settings=settings, checkpoint_seconds=0, progress=False)


def _tables(path) -> dict:
    con = duckdb.connect(str(path), read_only=True)
    out = {name: con.execute(f"SELECT * FROM {name} ORDER BY {order}").fetchnumpy() for name, order in TABLES.items()}
    out["meta"] = store.read_meta(con)
    con.close()
    return out


def _assert_same(a: dict, b: dict, exact_sums: bool = True) -> None:
    for name in TABLES:
        assert a[name].keys() == b[name].keys()
        for col in a[name]:
            x, y = a[name][col], b[name][col]
            if col in ("total", "total_sq", "mean") and not exact_sums:
                np.testing.assert_allclose(x, y, rtol=1e-9, err_msg=f"{name}.{col}")
            else:
                assert len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y, strict=True)), f"{name}.{col}"


@pytest.fixture(scope="module")
def whole(smollm2, tmp_path_factory):
    return _build(smollm2, tmp_path_factory.mktemp("index") / "whole.duckdb")


def test_stored_values_match_the_model(smollm2, whole):
    con = store.open_index(whole)
    assert store.read_meta(con)["complete"] and store.read_meta(con)["tokens_seen"] == 24 * 28
    tokens = torch.from_numpy(con.execute("SELECT token FROM tokens ORDER BY ctx, pos").fetchnumpy()["token"].astype(np.int64))
    tokens = tokens.view(24, 32)
    cache = smollm2.run(tokens, read=SITES, logits=False).cache
    acts = torch.cat([cache[s].reshape(24, 32, -1) for s in SITES], -1)  # [ctx, pos, units]
    top = con.execute("SELECT unit, value, ctx, pos FROM top WHERE rank < 3 AND unit % 97 = 0").fetchnumpy()
    got = acts[top["ctx"], top["pos"], top["unit"]]
    assert torch.allclose(got, torch.from_numpy(top["value"]), atol=1e-4)
    units = con.execute("SELECT unit, max, mean, density FROM units ORDER BY unit").fetchnumpy()
    scored = acts[:, 4:].reshape(-1, acts.shape[-1])  # the first 4 positions (start token included) are never scored
    assert np.allclose(units["max"], scored.max(0).values.numpy(), atol=1e-4)
    assert np.allclose(units["mean"], scored.double().mean(0).numpy(), atol=1e-5)
    assert np.allclose(units["density"], (scored > 0).double().mean(0).numpy())
    con.close()


def test_resume_after_kill_is_identical(smollm2, whole, tmp_path):
    """Killed with SIGKILL in the middle of its third checkpoint's transaction, then run again."""
    path = tmp_path / "killed.duckdb"
    script = f"""
        import os, signal
        import mechscope
        from mechscope.index import store
        from mechscope.index.build import IndexSettings, build_index
        calls = [0]
        write = store.write_stats
        def dying(*args):
            calls[0] += 1
            write(*args)
            if calls[0] == 4:  # the empty index, then two checkpoints; die inside the third
                os.kill(os.getpid(), signal.SIGKILL)
        store.write_stats = dying
        settings = IndexSettings(contexts=(0, 24), **{SMALL!r})
        build_index(mechscope.load(), {str(path)!r}, sites={SITES!r}, settings=settings, checkpoint_seconds=0, progress=False)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert store.read_meta(duckdb.connect(str(path), read_only=True))["contexts_done"] == 8
    _build(smollm2, path)
    _assert_same(_tables(path), _tables(whole))


def test_shards_merge_to_one_build(smollm2, whole, tmp_path):
    first = _build(smollm2, tmp_path / "a.duckdb", contexts=(0, 12))
    second = _build(smollm2, tmp_path / "b.duckdb", contexts=(12, 24))
    merged = merge_indexes([second, first], tmp_path / "merged.duckdb")
    a, b = _tables(merged), _tables(whole)
    _assert_same(a, b, exact_sums=False)
    assert a["meta"]["corpus_hash"] == b["meta"]["corpus_hash"] and a["meta"]["tokens_seen"] == b["meta"]["tokens_seen"]
    with pytest.raises(MechscopeError, match="overlap"):
        merge_indexes([first, whole], tmp_path / "bad.duckdb")


def test_a_finished_build_is_left_alone_or_continued(smollm2, whole, tmp_path):
    copy = tmp_path / "copy.duckdb"
    shutil.copy(whole, copy)
    _build(smollm2, copy)
    _assert_same(_tables(copy), _tables(whole))
    shorter = tmp_path / "shorter.duckdb"
    _build(smollm2, shorter, contexts=(0, 8))
    _build(smollm2, shorter)  # asked for more: continues from context 8
    _assert_same(_tables(shorter), _tables(whole))
    with pytest.raises(MechscopeError, match="cannot continue"):
        _build(smollm2, shorter, contexts=(0, 16))


def test_bad_databases_and_settings(smollm2, whole, tmp_path):
    copy = tmp_path / "other.duckdb"
    shutil.copy(whole, copy)
    with pytest.raises(MechscopeError, match="k=5, not 6") as err:
        _build(smollm2, copy, k=6)
    assert "\n" not in str(err.value)
    con = duckdb.connect(str(copy))
    con.execute("""UPDATE meta SET value = '"0123456789abcdef"' WHERE key = 'model_fingerprint'""")
    con.close()
    with pytest.raises(MechscopeError, match="built for another model"):
        _build(smollm2, copy)
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(MechscopeError, match="not a readable mechscope index"):
        _build(smollm2, garbage)
    with pytest.raises(MechscopeError, match="no index database"):
        store.open_index(tmp_path / "missing.duckdb")
    with pytest.raises(MechscopeError, match="multiple of the batch size"):
        IndexSettings(contexts=(3, 8), batch_size=4)
    with pytest.raises(MechscopeError, match="not one value per token"):
        build_index(smollm2, tmp_path / "p.duckdb", sites=["blocks.0.attn.hook_pattern"], progress=False)
    with pytest.raises(MechscopeError, match="unknown site"):
        build_index(smollm2, tmp_path / "p.duckdb", sites=["blocks.0.mlp.hook_postt"], progress=False)


def test_a_database_in_use_says_so(whole, tmp_path):
    copy = tmp_path / "busy.duckdb"
    shutil.copy(whole, copy)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, time; c = duckdb.connect({str(copy)!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MechscopeError, match="in use by another process") as err:
            store.open_index(copy)
        assert "\n" not in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_an_index_of_an_older_format_is_named_as_such(whole, tmp_path):
    old = tmp_path / "old.duckdb"
    shutil.copy(whole, old)
    with duckdb.connect(str(old)) as con:
        con.execute("""UPDATE meta SET value = '"mechscope-index/1"' WHERE key = 'format'""")
    assert store.stored_format(old) == "mechscope-index/1" and store.stored_format(whole) == store.FORMAT
    with pytest.raises(MechscopeError, match=f"is not a mechscope index of format {store.FORMAT}: rebuild it"):
        store.open_index(old)
    assert store.stored_format(tmp_path / "none.duckdb") is None


class Stop(Exception):
    """Raised inside a build to stop it where a test wants."""


def _stop_after(monkeypatch, batches: int) -> None:
    """Make builds raise `Stop` when they are about to run batch number `batches` (0: the first)."""
    real, calls = build_module._fold, [0]

    def fold(*args, **kw):
        if calls[0] == batches:
            raise Stop
        calls[0] += 1
        return real(*args, **kw)

    monkeypatch.setattr(build_module, "_fold", fold)


def _left(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_build_that_fails_before_its_first_checkpoint_leaves_nothing(smollm2, whole, tmp_path, monkeypatch):
    path = tmp_path / "index.duckdb"
    for bad, message in [  # refused before any file is written
        (dict(ctx_len=10_000), "ctx_len 10000 is out of range: valid values are 5..8192 (SmolLM2-135M-Instruct's context"),
        (dict(contexts=(0, 10**6)), "contexts 0:1000000 is out of range: valid values are START:STOP within 0:"),
    ]:
        with pytest.raises(SettingError, match=re.escape(message)):
            _build(smollm2, path, **bad)
        assert _left(tmp_path) == []
    _stop_after(monkeypatch, 2)  # fails in the stream, after the file was made and before the first checkpoint
    with pytest.raises(Stop):
        build_index(smollm2, path, sites=SITES, settings=IndexSettings(contexts=(0, 24), **SMALL), progress=False)
    assert _left(tmp_path) == []
    monkeypatch.undo()
    _build(smollm2, path)  # the corrected command runs as if nothing had happened
    _assert_same(_tables(path), _tables(whole))


def test_an_index_with_no_context_yet_is_started_afresh(smollm2, whole, tmp_path, monkeypatch):
    """A file left with no context (killed before its first checkpoint) does not block a build with other settings."""
    path = tmp_path / "index.duckdb"
    _stop_after(monkeypatch, 0)
    monkeypatch.setattr(build_module, "_discard_if_empty", lambda con, out: None)  # as after kill -9
    with pytest.raises(Stop):
        _build(smollm2, path, k=6)
    assert store.read_meta(duckdb.connect(str(path), read_only=True))["contexts_done"] == 0
    monkeypatch.undo()
    with pytest.raises(MechscopeError, match="holds no tokens yet: its build stopped before its first checkpoint"):
        Index(path).stats("0:1")
    _build(smollm2, path)  # k=5 now: not refused for 'was built with k=6'
    _assert_same(_tables(path), _tables(whole))


def test_an_unfinished_index_says_so_on_every_query(smollm2, tmp_path, monkeypatch):
    path = tmp_path / "index.duckdb"
    _stop_after(monkeypatch, 2)
    with pytest.raises(Stop):
        _build(smollm2, path)  # checkpoints after batches 1 and 2 (4 contexts each), then stops
    note = "index built over 256 of 768 tokens (unfinished: run the same `mechscope index build` again to continue)"
    with Index(path, model=smollm2) as index:
        assert index.unfinished == note
        for query in (
            lambda: index.stats("0:5"),
            lambda: index.top("0:5", 3),
            lambda: index.samples("0:5"),
            lambda: index.histogram("0:5"),
            lambda: index.rank(n=3),
            lambda: index.search(" the", n=3),
        ):
            with pytest.warns(UnfinishedIndexWarning, match=re.escape(note)):
                query()
        with pytest.warns(UnfinishedIndexWarning):
            assert math.isfinite(index.stats("0:5").max)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Index(path, warn=False) as quiet:
            quiet.top("0:5", 2)


def test_a_resumed_index_takes_no_more_disk_than_one_built_at_once(smollm2, whole, tmp_path, monkeypatch):
    """Written at once (one checkpoint), and resumed over six runs of one batch each: the same tables, no
    more disk for the resumed one, and nothing left beside them."""
    once = tmp_path / "once.duckdb"
    settings = IndexSettings(contexts=(0, 24), **SMALL)
    build_index(smollm2, once, sites=SITES, settings=settings, checkpoint_seconds=1e9, progress=False)
    resumed, runs = tmp_path / "resumed.duckdb", 0
    while not resumed.exists() or not store.read_meta(duckdb.connect(str(resumed), read_only=True))["complete"]:
        _stop_after(monkeypatch, 1)
        with contextlib.suppress(Stop):
            _build(smollm2, resumed)
        monkeypatch.undo()
        runs += 1
    assert runs == 6
    _assert_same(_tables(once), _tables(whole))
    _assert_same(_tables(resumed), _tables(whole))
    sizes = {"once": once.stat().st_size, "resumed": resumed.stat().st_size}
    assert sizes["resumed"] <= sizes["once"], sizes
    assert _left(tmp_path) == ["once.duckdb", "resumed.duckdb"]  # no copy or log left beside them


def test_a_directory_is_not_a_database(smollm2, tmp_path):
    (tmp_path / "a.duckdb").write_bytes(b"")
    for call in (lambda: store.open_index(tmp_path), lambda: _build(smollm2, tmp_path), lambda: Index(tmp_path)):
        with pytest.raises(MechscopeError, match="is a directory, not an index database: give the database file") as err:
            call()
        assert "\n" not in str(err.value) and "a.duckdb" in str(err.value) and "--out" not in str(err.value)
