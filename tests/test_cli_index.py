"""`mechscope index ...`: each command end to end on a small real index, and one-line errors for bad databases and units."""

from __future__ import annotations

import json
import re
import shutil

import duckdb
import pytest
from conftest import index_for_another_model
from test_cli import run_main
from test_index_query import small_index

from mechscope import cli_index

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def db(smollm2, tmp_path_factory) -> str:
    return small_index(smollm2, tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def shared_model(monkeypatch, smollm2):
    """Every command gets the session's SmolLM2 instead of loading it again."""
    real = cli_index._load
    monkeypatch.setattr(cli_index, "_load", lambda spec, *device: smollm2 if spec == "default" else real(spec, *device))


def test_show_prints_card_and_writes_files(monkeypatch, capsys, db, tmp_path):
    html, png = tmp_path / "u.html", tmp_path / "u.png"
    argv = ["index", "show", "5:10", "--db", db, "--n", "5", "--html", str(html), "--png", str(png)]
    code, out, err = run_main(monkeypatch, capsys, *argv)
    assert code == 0, err
    for part in ("unit 5:10", "input tokens", "promotes", "top 5 examples", "samples by activation range", "quantiles"):
        assert part in out
    assert "<svg" in html.read_text() and png.read_bytes()[:4] == b"\x89PNG"  # the histogram, drawn without plotly
    code, out, _ = run_main(monkeypatch, capsys, "index", "show", "0:5", "--db", db, "--no-samples")
    assert code == 0 and "top 20 examples" in out and "samples by activation range" not in out


def test_search_rank_info(monkeypatch, capsys, db, smollm2):
    code, out, _ = run_main(monkeypatch, capsys, "index", "search", " of the", "--db", db, "--n", "5")
    assert code == 0 and "top examples sit on ' of the'" in out and re.search(r"│ [05]:\d+ ", out)
    (the,) = smollm2.tokenizer(" the", add_special_tokens=False).input_ids
    code, out, _ = run_main(monkeypatch, capsys, "index", "search", str(the), "--id", "--db", db, "--n", "3")
    assert code == 0 and f"' the' (token ids [{the}];" in out and len(re.findall(r"│ [05]:\d+ ", out)) == 3
    code, out, _ = run_main(monkeypatch, capsys, "index", "search", "zzzzzzzzqqqq", "--db", db)
    assert code == 0 and "no unit has a top example there" in out
    code, out, _ = run_main(monkeypatch, capsys, "index", "rank", "--by", "max", "--site", "0", "--n", "3", "--db", db)
    assert code == 0 and "units by max" in out and len(re.findall(r"│ 0:\d+ ", out)) == 3
    code, out, _ = run_main(monkeypatch, capsys, "index", "info", "--db", db, "--json")
    meta = json.loads(out)
    assert code == 0 and meta["complete"] and meta["units"] == 2 * 1536 and meta["tokens_seen"] == 16 * 124
    code, out, _ = run_main(monkeypatch, capsys, "index", "info", "--db", db)
    assert code == 0 and "SmolLM2-135M-Instruct" in out and "tokens seen" in out


def test_build_shards_and_merge(monkeypatch, capsys, tmp_path):
    common = ["--sites", "blocks.1.mlp.hook_post,blocks.2.hook_resid_post", "--ctx-len", "32", "--batch-size", "2", "--k", "4"]
    for name, span in (("a", "0:2"), ("b", "2:4")):
        argv = ["index", "build", *common, "--contexts", span, "--out", str(tmp_path / "shards" / f"{name}.duckdb")]
        code, out, err = run_main(monkeypatch, capsys, *argv)
        assert code == 0, err
        assert f"{name}.duckdb" in out and "complete" in out
    merged = tmp_path / "merged.duckdb"
    argv = ["index", "merge", str(tmp_path / "shards" / "a.duckdb"), str(tmp_path / "shards" / "b.duckdb"), "--out", str(merged)]
    code, out, _ = run_main(monkeypatch, capsys, *argv)
    assert code == 0 and "merged 2 shards" in out
    code, out, _ = run_main(monkeypatch, capsys, "index", "info", "--db", str(merged), "--json")
    meta = json.loads(out)
    assert meta["contexts"] == [0, 4] and meta["tokens_seen"] == 4 * 28 and meta["units"] == 1536 + 576
    code, out, _ = run_main(monkeypatch, capsys, "index", "show", "blocks.2.hook_resid_post:3", "--db", str(merged), "--n", "2")
    assert code == 0 and "unit blocks.2.hook_resid_post:3" in out and "promotes" not in out  # not a neuron


def test_build_default_path(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    code, out, err = run_main(
        monkeypatch, capsys, "index", "build", "--sites", "blocks.0.mlp.hook_post", "--tokens", "60", "--ctx-len", "30"
    )
    assert code == 0, err
    assert (tmp_path / "cache" / "index" / "SmolLM2-135M-Instruct.duckdb").is_file()
    code, out, _ = run_main(monkeypatch, capsys, "index", "rank", "--n", "2")
    assert code == 0 and "units by density" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "5:10", "--db", "{missing}"], "no index database at"),
        (["info", "--db", "{missing}"], "no index database at"),
        (["show", "5:10", "--db", "{garbage}"], "is not a readable mechscope index"),
        (["rank", "--db", "{garbage}"], "is not a readable mechscope index"),
        (["show", "5:10", "--db", "{other}"], "built for the model OtherLM-1B (fingerprint feedfacefeedface), not SmolLM2"),
        (["search", " the", "--db", "{other}"], "built for the model OtherLM-1B"),
        (["show", "twelve", "--db", "{db}"], "bad unit 'twelve'"),
        (["show", "5:1536", "--db", "{db}"], "unit '5:1536' out of range: blocks.5.mlp.hook_post has units 0..1535"),
        (["show", "7:3", "--db", "{db}"], "unit '7:3' is not in this index"),
        (["rank", "--by", "median", "--db", "{db}"], "cannot rank by 'median'"),
        (["search", "", "--db", "{db}"], "tokenises to nothing"),
        (["build", "--contexts", "5", "--out", "{missing}"], "bad --contexts '5'"),
        (["merge", "{db}", "--out", "{missing}"], "at least two index databases"),
        (["build", "--corpus", "{empty}", "--out", "{missing}"], "is empty: it has no text"),
        (
            ["build", "--corpus", "{jsonl}", "--out", "{missing}"],
            "line 1 has no field 'text': its fields are body, id; pass --field",
        ),
        (["build", "--corpus", "{jsonl}", "--field", "title", "--out", "{missing}"], "has no field 'title'"),
        (["build", "--sites", "blocks.40.mlp.hook_post", "--out", "{missing}"], "layer 40 out of range"),
        # every count: the option, the value and the valid range, before any work
        (["show", "5:10", "-n", "-1", "--db", "{db}"], "-n -1 is out of range: valid values are 1..1024"),
        (["show", "5:10", "-n", "21", "--db", "{db}"], "-n 21 is out of range: valid values are 1..20 (the index keeps"),
        (["search", " the", "-n", "-1", "--db", "{db}"], "-n -1 is out of range: valid values are 1 up to the units"),
        (["rank", "-n", "-1", "--db", "{db}"], "-n -1 is out of range: valid values are 1 up to the units"),
        (["rank", "-n", "5000", "--db", "{db}"], "-n 5000 is out of range: valid values are 1..3,072 (units in this index)"),
        (["build", "--ctx-len", "0", "--out", "{missing}"], "--ctx-len 0 is out of range: valid values are 5..32767"),
        (["build", "--ctx-len", "9000", "--out", "{missing}"], "--ctx-len 9000 is out of range: valid values are 5..8192"),
        (["build", "--tokens", "0", "--out", "{missing}"], "--tokens 0 is out of range: valid values are 1 up to"),
        (["build", "--tokens", "1000000000000", "--out", "{missing}"], "--tokens 1000000000000 is out of range: valid values"),
        (["build", "--tokens", "5000", "--corpus", "{text}", "--out", "{missing}"], "valid values are 1..1,"),
        (["build", "--k", "0", "--out", "{missing}"], "--k 0 is out of range: valid values are 1..1024"),
        (["build", "--batch-size", "5000", "--out", "{missing}"], "--batch-size 5000 is out of range: valid values are 1..1024"),
        (["build", "--contexts", "5:3", "--out", "{missing}"], "--contexts 5:3 is out of range: valid values are START:STOP"),
        # a directory where a database belongs: one line, no circular advice
        (["show", "5:10", "--db", "{folder}"], "is a directory, not an index database: give the database file (it holds"),
        (["info", "--db", "{folder}"], "is a directory, not an index database"),
        (["build", "--out", "{folder}"], "is a folder: give a file path"),
    ],
)
def test_bad_input_one_line(monkeypatch, capsys, db, tmp_path, argv, message):
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"\x00not a database\xff" * 200)
    empty, jsonl = tmp_path / "empty.txt", tmp_path / "notes.jsonl"
    empty.write_text("  \n\n")
    jsonl.write_text('{"body": "Some text.", "id": 1}\n')
    text, folder = tmp_path / "small.txt", tmp_path / "folder"
    text.write_text("A short corpus. " * 400)  # about 1,600 tokens: under 5,000
    folder.mkdir()
    (folder / "a.duckdb").write_bytes(b"")
    paths = {
        "missing": str(tmp_path / "none.duckdb"),
        "garbage": str(garbage),
        "db": db,
        "empty": str(empty),
        "jsonl": str(jsonl),
        "text": str(text),
        "folder": str(folder),
    }
    if any("{other}" in a for a in argv):
        paths["other"] = str(index_for_another_model(db, tmp_path))
    code, _, err = run_main(monkeypatch, capsys, "index", *(a.format(**paths) for a in argv))
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "none.duckdb").exists()  # nothing half-made is left behind


def test_an_unfinished_index_says_so_in_every_command(monkeypatch, capsys, db, tmp_path):
    """The note goes to stderr (so --json stays JSON); numbers are those of the index, never -inf."""
    unfinished = tmp_path / "unfinished.duckdb"
    shutil.copy(db, unfinished)
    with duckdb.connect(str(unfinished)) as con:  # as if the build had stopped halfway through
        con.execute("""UPDATE meta SET value = '[0, 32]' WHERE key = 'contexts'""")
        con.execute("""UPDATE meta SET value = 'false' WHERE key = 'complete'""")
    note = "note: index built over 2,048 of 4,096 tokens (unfinished: run the same `mechscope index build` again to continue)"
    for argv in (["show", "5:10", "-n", "2"], ["search", " the", "-n", "2"], ["rank", "-n", "2"], ["info"], ["info", "--json"]):
        code, out, err = run_main(monkeypatch, capsys, "index", *argv, "--db", str(unfinished))
        assert code == 0 and note in " ".join(err.split()), (argv, err)
        assert "inf" not in out.replace("info", "")
    assert json.loads(out)["complete"] is False
    code, _, err = run_main(monkeypatch, capsys, "index", "info", "--db", db)
    assert code == 0 and "note" not in err


def test_a_failed_build_leaves_nothing_and_the_corrected_one_runs(monkeypatch, capsys, tmp_path):
    out = tmp_path / "new" / "deeper" / "index.duckdb"
    common = ["index", "build", "--sites", "blocks.0.mlp.hook_post", "--ctx-len", "32", "--batch-size", "2", "--out", str(out)]
    code, _, err = run_main(monkeypatch, capsys, *common, "--tokens", "10000000")
    assert code == 2 and "--tokens 10000000 is out of range" in err
    assert not (tmp_path / "new").exists()  # nor the folders made for it
    code, out_text, err = run_main(monkeypatch, capsys, *common, "--tokens", "128")
    assert code == 0, err
    assert out.is_file() and "complete" in out_text
