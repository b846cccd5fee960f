"""Corpora: the built-in CPython docs, .txt/.jsonl/.parquet files and folders, HF datasets, and every bad input."""

import importlib
import json
import sys
import types

import duckdb
import pytest

from mechscope.data import Document, corpus
from mechscope.data.corpus import _stdlib_docstrings
from mechscope.errors import MechscopeError

load_module = importlib.import_module("mechscope.models.load")  # `mechscope.models.load` the attribute is the function


def fails(bad: str, spec, **kw) -> str:
    """Assert that `corpus(spec)` and a first pass raise one line that names `bad`; return the message."""
    with pytest.raises(MechscopeError) as err:
        list(corpus(spec, **kw).documents())
    message = str(err.value)
    assert "\n" not in message and bad in message, message
    return message


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def write_parquet(path, rows: int, column: str = "text"):
    duckdb.execute(
        f"COPY (SELECT 'row ' || i AS {column}, i AS n FROM range({rows}) t(i) ORDER BY i) TO '{path}' (FORMAT parquet)"
    )
    return path


# ---- the built-in corpus


def test_builtin_is_cpython_docs_in_a_fixed_order():
    docs = list(corpus().documents())
    assert [d.id for d in docs] == list(range(len(docs)))
    sources = [d.source for d in docs]
    topics = [s for s in sources if s.startswith("pydoc:")]
    assert topics == sorted(topics) and sources[: len(topics)] == topics and len(topics) > 50
    assert "pydoc:assert" in sources and "stdlib:json/decoder.py" in sources
    assert not any("/test/" in s or "/tests/" in s or "idle_test" in s or "site-packages" in s for s in sources)
    assert len(docs) > 500 and sum(len(d.text) for d in docs) > 2_000_000
    assert all(len(d.text) >= 40 for d in docs)
    assert "antigravity" not in sys.modules  # the stdlib was read, not imported
    assert corpus("builtin").id == corpus().id and corpus().id.startswith("builtin:python-docs:")


def test_builtin_is_the_same_when_read_again():
    fresh = _stdlib_docstrings.__wrapped__()  # parse the standard library once more, past the cache
    assert fresh == _stdlib_docstrings()


def test_builtin_source_is_the_stdlib_source_without_its_tests():
    docs = list(corpus("builtin:source").documents())
    sources = [d.source for d in docs]
    assert sources == [d.source for d in corpus("builtin:source").documents()]  # one fixed order
    assert sources.index("source:abc.py") < sources.index("source:json/decoder.py")  # sorted folder by folder
    assert "source:json/decoder.py" in sources and "source:os.py" in sources
    assert not any("/test/" in s or "/tests/" in s or "idle_test" in s or s.split("/")[-1].startswith("test_") for s in sources)
    assert 10_000_000 < sum(len(d.text) for d in docs) < 20_000_000  # about 12 MB of Python
    assert next(d.text for d in docs if d.source == "source:json/decoder.py").startswith('"""Implementation of JSONDecoder')
    assert corpus("builtin:source").id.startswith("builtin:python-source:")


def test_builtin_all_is_the_docs_then_the_source():
    docs, source = list(corpus("builtin").documents()), list(corpus("builtin:source").documents())
    both = list(corpus("builtin:all").documents())
    assert [(d.source, d.text) for d in both] == [(d.source, d.text) for d in docs + source]
    assert [d.id for d in both] == list(range(len(both)))
    assert corpus("builtin:docs").id == corpus().id


def test_unknown_builtin():
    assert "builtin:docs" in fails("builtin:poems", "builtin:poems")  # the message names the valid ones


# ---- files and folders


def test_txt_is_one_document(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time.\n\nThe end.\n")
    c = corpus(path)
    assert list(c.documents()) == [Document(0, "Once upon a time.\n\nThe end.\n", "story.txt")]
    assert c.id == f"file:{path.resolve()}"


def test_jsonl_one_document_per_line(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"body": "first"}\n\n{"body": "second", "id": 2}\n{"body": null}\n{"body": "third"}\n')
    c = corpus(str(path), field="body")
    assert [(d.id, d.text, d.source) for d in c.documents()] == [
        (0, "first", "notes.jsonl:1"),
        (1, "second", "notes.jsonl:3"),
        (2, "third", "notes.jsonl:5"),
    ]
    assert c.id == f"file:{path.resolve()}#body"


def test_parquet_streams_rows_in_order(tmp_path):
    path = write_parquet(tmp_path / "rows.parquet", 3000)  # several fetch batches
    docs = list(corpus(path).documents())
    assert [d.text for d in docs] == [f"row {i}" for i in range(3000)]
    assert docs[7].source == "rows.parquet:7" and docs[-1].id == 2999


def test_folder_numbers_its_files_on_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "gamma"}, {"text": "delta"}])
    write_parquet(tmp_path / "b" / "d.parquet", 2)
    (tmp_path / "readme.md").write_text("not a corpus file")
    docs = list(corpus(tmp_path).documents())
    assert [(d.id, d.text, d.source) for d in docs] == [
        (0, "alpha", "a.txt"),
        (1, "gamma", "b/c.jsonl:1"),
        (2, "delta", "b/c.jsonl:2"),
        (3, "row 0", "b/d.parquet:0"),
        (4, "row 1", "b/d.parquet:1"),
    ]
    assert docs == list(corpus(tmp_path).documents())


# ---- bad files


def test_missing_file(tmp_path):
    message = fails("nope.jsonl", tmp_path / "nope.jsonl")
    assert ".parquet" in message


def test_unsupported_extension(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    message = fails("data.csv", tmp_path / "data.csv")
    assert ".txt, .jsonl, .parquet" in message


@pytest.mark.parametrize("name, content", [("empty.txt", " \n\t\n"), ("empty.jsonl", "\n\n")])
def test_empty_file_fails_when_the_corpus_is_made(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(MechscopeError, match=f"'{name}' is empty"):
        corpus(tmp_path / name)


def test_empty_parquet(tmp_path):
    write_parquet(tmp_path / "none.parquet", 0)
    with pytest.raises(MechscopeError, match="'none.parquet' is empty"):
        corpus(tmp_path / "none.parquet")


def test_empty_folder(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    assert "holds no .txt" in fails(str(tmp_path), tmp_path)


def test_txt_not_utf8(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "is not UTF-8 text" in fails("latin1.txt", tmp_path / "latin1.txt")


def test_jsonl_line_that_is_not_json(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("not json\n")
    assert "line 1" in fails("notes.jsonl", path)
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    c = corpus(path)  # only the first record is checked up front
    with pytest.raises(MechscopeError, match="notes.jsonl line 3 is not JSON"):
        list(c.documents())


def test_jsonl_without_the_field_fails_when_the_corpus_is_made(tmp_path):
    path = write_jsonl(tmp_path / "notes.jsonl", [{"id": 1, "body": "hello"}])
    with pytest.raises(MechscopeError) as err:
        corpus(path)
    assert str(err.value) == "notes.jsonl line 1 has no field 'text': its fields are id, body; pass --field"


@pytest.mark.parametrize("record, bad", [([1, 2], "list"), ({"text": 3}, "int"), ({}, "no fields")])
def test_jsonl_record_without_text(tmp_path, record, bad):
    assert "line 1" in fails(bad, write_jsonl(tmp_path / "notes.jsonl", [record]))


def test_parquet_without_the_column(tmp_path):
    path = write_parquet(tmp_path / "rows.parquet", 3, column="body")
    message = fails("'text'", path)
    assert "its columns are body, n" in message
    assert "BIGINT" in fails("'n'", path, field="n")


def test_not_a_parquet_file(tmp_path):
    (tmp_path / "fake.parquet").write_text("hello")
    assert "as parquet" in fails("fake.parquet", tmp_path / "fake.parquet")


# ---- HuggingFace datasets


def test_hf_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.setattr(load_module, "hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    message = fails("hf:owner/name", "hf:owner/name")
    assert "unreachable (HF_HUB_OFFLINE is set)" in message and ".jsonl" in message


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setattr(load_module, "hub_unreachable", lambda: None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    assert "pip install 'mechscope[hf]'" in fails("hf:owner/name", "hf:owner/name")


def fake_datasets(monkeypatch, rows):
    calls = []
    module = types.ModuleType("datasets")
    module.load_dataset = lambda *args, **kw: calls.append((args, kw)) or rows
    monkeypatch.setattr(load_module, "hub_unreachable", lambda: None)
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hf_streams_rows(monkeypatch):
    calls = fake_datasets(monkeypatch, [{"text": "one"}, {"text": ""}, {"text": "three"}])
    c = corpus("hf:owner/name:en", split="validation")
    assert calls == [(("owner/name", "en"), {"split": "validation", "streaming": True})]
    assert c.id == "hf:owner/name:en:validation#text"
    assert [(d.id, d.text, d.source) for d in c.documents()] == [
        (0, "one", "hf:owner/name:en:0"),
        (1, "three", "hf:owner/name:en:2"),
    ]


def test_hf_errors(monkeypatch):
    fake_datasets(monkeypatch, [{"content": "one"}])
    assert "its fields are content" in fails("'text'", "hf:owner/name")
    fails("hf:", "hf:")
