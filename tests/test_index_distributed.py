"""Index builds under torchrun, on CPU (gloo): two processes build what one builds, a killed rank resumes from
its checkpoint, a finished build is left alone, an index is continued, and bad input gets one line.

The launches are the commands users type (`torchrun` is `python -m torch.distributed.run`):
    one node:  torchrun --standalone --nproc-per-node N --no-python mechscope index build ... --out OUT
    M nodes:   torchrun --nnodes M --node-rank I --nproc-per-node N --master-addr HOST --master-port PORT \\
                   --no-python mechscope index build ... --out OUT     (on node I = 0..M-1; OUT in a shared folder)
The model is `tiny_lm()` saved to a folder, so that `--model FOLDER` loads it in every process, and the corpus
is a small .jsonl file of the built-in documents (which every process would otherwise read from the stdlib).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import launch
import pytest
from conftest import invoke_cli, tiny_lm
from test_index_build import _assert_same, _tables

import mechscope
from mechscope.errors import MechscopeError
from mechscope.index import store
from mechscope.index.build import IndexSettings, build_index
from mechscope.index.sharded import shard_path, shard_spans
from mechscope.runtime import Ranks

SITES = ["blocks.0.mlp.hook_post", "blocks.2.hook_resid_post"]
CONTEXTS, CTX_LEN, BATCH, K = 38, 32, 4, 5  # 10 batches, the last one of 2 contexts: shares (0, 20) and (20, 38)
SETTINGS = dict(ctx_len=CTX_LEN, batch_size=BATCH, k=K)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
MECHSCOPE = ["--no-python", str(Path(sys.executable).with_name("mechscope"))]  # the console script beside python


def _build_args(folder, out, contexts: int = CONTEXTS) -> list[str]:
    """The arguments of `mechscope index build` with the settings of `_one_process`."""
    return [
        *("index", "build", "--model", str(folder / "model"), "--corpus", str(folder / "corpus.jsonl")),
        *("--sites", ",".join(SITES), "--tokens", str(contexts * CTX_LEN), "--ctx-len", str(CTX_LEN)),
        *("--batch-size", str(BATCH), "--k", str(K), "--out", str(out)),
    ]  # fmt: skip


def _one_process(folder, out, contexts: int = CONTEXTS):
    settings = IndexSettings(corpus=str(folder / "corpus.jsonl"), tokens=contexts * CTX_LEN, **SETTINGS)
    return build_index(mechscope.load(folder / "model"), out, sites=SITES, settings=settings, progress=False)


def _run(command: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, **kw)


def _same_build(path, one) -> None:
    """`path` holds what the one-process build `one` holds: every table, and the meta but the shards' spans."""
    got, want = _tables(path), _tables(one)
    _assert_same(got, want, exact_sums=False)  # shards' sums are added in another order
    assert got["meta"].pop("shards") and got["meta"] == want["meta"]


def _left(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with `tiny_lm()` in model/ (weights, config, tokenizer) and 80 built-in documents in corpus.jsonl."""
    from mechscope.data import corpus

    path = tmp_path_factory.mktemp("tiny")
    model = tiny_lm()
    model.hf.save_pretrained(path / "model")
    model.tokenizer.save_pretrained(path / "model")
    docs = [json.dumps({"text": d.text}) for _, d in zip(range(80), corpus().documents(), strict=False)]
    (path / "corpus.jsonl").write_text("\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="module")
def one(folder, tmp_path_factory):
    return _one_process(folder, tmp_path_factory.mktemp("one") / "one.duckdb")


def test_shares_are_contiguous_whole_batches_as_even_as_can_be():
    assert shard_spans((0, 38), 4, 2) == [(0, 20), (20, 38)]
    assert shard_spans((0, 40), 4, 3) == [(0, 12), (12, 24), (24, 40)]
    assert shard_spans((8, 17), 4, 3) == [(8, 12), (12, 16), (16, 17)]
    with pytest.raises(MechscopeError, match="6 contexts make 2 batches of 4, fewer than the 3 processes"):
        shard_spans((0, 6), 4, 3)
    assert shard_path(Path("runs/idx.duckdb"), 1, 2) == Path("runs/idx.rank1-of-2.duckdb")


def test_two_processes_build_what_one_builds(folder, one, tmp_path):
    """And the same command again leaves the finished index as it is."""
    out = tmp_path / "index.duckdb"
    command = [*TORCHRUN, *launch.one_node(2), *MECHSCOPE, *_build_args(folder, out)]
    done = _run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("index: ") == 1, done.stdout  # rank 0 reports, rank 1 is quiet
    assert re.search(r"rank 0: its share built in [\d.]+ s, waited [\d.]+ s for the other ranks, 2 parts merged in", done.stdout)
    assert _left(tmp_path) == ["index.duckdb"]  # the shards are merged and gone
    _same_build(out, one)
    assert _tables(out)["meta"]["shards"] == [[0, 20], [20, 38]]
    before = out.read_bytes(), out.stat().st_mtime_ns
    again = _run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before and _left(tmp_path) == ["index.duckdb"]


DYING = """
import os, sys
from mechscope import cli
from mechscope.index import build

checkpoint, build_index = build._checkpoint, build.build_index

def dying(*args):
    checkpoint(*args)
    if os.environ["RANK"] == "1":
        os._exit(3)  # rank 1 dies right after its first checkpoint; torchrun then stops rank 0

build._checkpoint = dying
build.build_index = lambda *args, **kw: build_index(*args, **kw, checkpoint_seconds=0)  # a checkpoint every batch
sys.argv = ["mechscope", *sys.argv[1:]]
cli.main()
"""


def test_a_killed_rank_resumes_where_it_stopped(folder, one, tmp_path):
    """Rank 1 dies after its first checkpoint; the same build, launched as two nodes of one process each (the
    multi-node command, on one machine), resumes both shards and ends as one process's build."""
    out, script = tmp_path / "index.duckdb", tmp_path / "dying.py"
    script.write_text(textwrap.dedent(DYING))
    died = _run([*TORCHRUN, *launch.one_node(2), str(script), *_build_args(folder, out)])
    assert died.returncode != 0 and not out.exists(), died.stderr[-3000:]
    with duckdb.connect(str(shard_path(out, 1, 2)), read_only=True) as con:
        meta = store.read_meta(con)
    assert (meta["contexts"], meta["contexts_done"], meta["complete"]) == ([20, 38], BATCH, False)
    port, nodes = _free_port(), []
    for node in (0, 1):
        command = [*TORCHRUN, *launch.node(2, node, 1, "127.0.0.1", port), *MECHSCOPE, *_build_args(folder, out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert _left(tmp_path) == ["dying.py", "index.duckdb"]
    _same_build(out, one)


def test_an_index_is_continued_by_more_processes(folder, one, tmp_path):
    """A one-process index of the first 8 contexts, asked for all 38 over two processes: they build 8..37 and
    merge it with the 8."""
    out = tmp_path / "index.duckdb"
    _one_process(folder, out, contexts=8)
    command = [*TORCHRUN, *launch.one_node(2), *MECHSCOPE, *_build_args(folder, out)]
    done = _run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _left(tmp_path) == ["index.duckdb"]
    _same_build(out, one)
    assert _tables(out)["meta"]["shards"] == [[0, 8], [8, 24], [24, 38]]


def _as_rank_0_of(monkeypatch, world: int) -> None:
    """Make this process rank 0 of `world`: enough for the checks, which come before any rank waits for another."""
    monkeypatch.setattr(Ranks, "from_environment", classmethod(lambda cls: cls(0, world)))


def test_bad_input_gets_one_line(folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "index.duckdb"
    _as_rank_0_of(monkeypatch, 3)
    code, _, err = invoke_cli(monkeypatch, capsys, *_build_args(folder, out, contexts=6))
    assert code == 2 and err.count("\n") == 1, err
    assert "6 contexts make 2 batches of 4, fewer than the 3 processes: give each process at least one batch" in err
    shard_path(out, 0, 2).write_bytes(b"")  # as left by a build over 2 processes
    message = "index.rank0-of-2.duckdb' is a shard of an unfinished build of '.*' over 2 processes: resume it over 2 processes"
    with pytest.raises(MechscopeError, match=message + ", or remove its shards to start over with 3"):
        _one_process(folder, out)
    monkeypatch.undo()
    with pytest.raises(MechscopeError, match=message + ", or remove its shards to start over with 1"):
        _one_process(folder, out)  # with one process too
    shard_path(out, 0, 2).unlink()
    _one_process(folder, out, contexts=6)  # ends inside a batch: more processes cannot continue it
    _as_rank_0_of(monkeypatch, 2)
    with pytest.raises(MechscopeError, match="holds contexts 0..5, which a build of contexts 0..37 in batches of 4 cannot"):
        _one_process(folder, out)
    with duckdb.connect(str(out)) as con:
        con.execute("UPDATE meta SET value = 'false' WHERE key = 'complete'")
    with pytest.raises(MechscopeError, match="is an unfinished index: finish it with one process"):
        _one_process(folder, out)
    assert _left(tmp_path) == ["index.duckdb"]  # nothing else was written


def test_shards_left_by_a_merge_cut_short_are_removed(folder, one, tmp_path, monkeypatch):
    """Rank 0 died after renaming the merged index into place, before removing the shards: a rerun removes them."""
    out = tmp_path / "index.duckdb"
    _one_process(folder, out)
    settings = IndexSettings(corpus=str(folder / "corpus.jsonl"), contexts=(20, 38), **SETTINGS)
    build_index(mechscope.load(folder / "model"), shard_path(out, 1, 2), sites=SITES, settings=settings, progress=False)
    _as_rank_0_of(monkeypatch, 2)
    _one_process(folder, out)
    assert _left(tmp_path) == ["index.duckdb"]
    _assert_same(_tables(out), _tables(one))
