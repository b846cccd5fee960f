"""Corpora: where the text for harvesting, indexing and dictionary training comes from.

A `Corpus` is a stable id plus a way to stream its documents in one fixed order, so that a long job
can resume and every result can be traced back to the document it came from. Sources:

- `corpus()` or `corpus("builtin")` (also `"builtin:docs"`): CPython's own documentation, the pydoc
  topics and the docstrings of the standard library (read with `ast`, never imported): some 2 M
  characters of real English that ship with every Python, so everything works offline.
- `corpus("builtin:source")`: the standard library's own source files, one document each, in sorted
  path order, test suites left out: about 12 MB of Python (a few million tokens) for training runs.
- `corpus("builtin:all")`: the documentation, then the source.
- a `.txt` file (one document), a `.jsonl` file (one document per line, text in `field`), a `.parquet`
  file (one document per row, column `field`, streamed with duckdb), or a folder of such files.
- `"hf:owner/name"` or `"hf:owner/name:config"`: a HuggingFace dataset, streamed (needs `mechscope[hf]`).

Files are checked when the corpus is made (it exists, is supported, is not empty, has the field), so a
command fails before it loads a model. Nothing is read whole except a `.txt` file, which is one document.

>>> docs = mechscope.data.corpus("notes.jsonl", field="body").documents()
"""

from __future__ import annotations

import ast
import functools
import json
import os
import platform
import re
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mechscope.errors import MechscopeError, one_of

EXTENSIONS = (".txt", ".jsonl", ".parquet")
BUILTIN_ID = f"builtin:python-docs:{platform.python_version()}"
"""The built-in corpus's id names the Python version, because its docstrings change between releases."""
BUILTINS = {
    "builtin": BUILTIN_ID,
    "builtin:docs": BUILTIN_ID,
    "builtin:source": f"builtin:python-source:{platform.python_version()}",
    "builtin:all": f"builtin:python-all:{platform.python_version()}",
}
"""The built-in corpora by name, and their ids."""
MIN_DOCSTRING = 40
"""Shorter docstrings ("Return self.") are boilerplate, not prose."""
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_PARQUET_BATCH = 1024
_HF_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")
_VALID = "give a .txt, .jsonl or .parquet file, a folder of them, 'builtin', 'builtin:source', 'builtin:all' or 'hf:owner/name'"

Texts = Callable[[], Iterator[tuple[str, str]]]
"""Starts a fresh pass over a source: (source, text) pairs in the source's fixed order."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus."""

    id: int
    """Index in the corpus's deterministic order: 0, 1, 2, ..."""
    text: str
    source: str
    """Where it came from, for people: "pydoc:assert", "stdlib:json/decoder.py", "notes.jsonl:17"."""


@dataclass(frozen=True)
class Corpus:
    """A source of documents: a stable id, and passes over its documents in one fixed order."""

    id: str
    """Stable id of the source: "builtin:python-docs:3.11.7", "file:/abs/x.jsonl#text", "hf:owner/name:default:train#text"."""
    texts: Texts = field(repr=False, compare=False)

    def documents(self) -> Iterator[Document]:
        """Stream the documents in order; each call starts a fresh pass."""
        for i, (source, text) in enumerate(self.texts()):
            yield Document(i, text, source)


def held_out(source: Corpus, every: int = 20) -> tuple[Corpus, Corpus]:
    """(training, held-out) halves of a corpus: every `every`-th document, counting from the first, is held out.

    Dictionaries train on the first and are evaluated on the second, so evaluation reads text the
    training never saw. Both keep the corpus's order; their ids name the split.
    """
    if not isinstance(every, int) or every < 2:
        raise MechscopeError(f"every={every!r} is invalid: hold out every n-th document with n of at least 2")

    def part(held: bool) -> Texts:
        def texts() -> Iterator[tuple[str, str]]:
            for i, item in enumerate(source.texts()):
                if (i % every == 0) == held:
                    yield item

        return texts

    return Corpus(f"{source.id}|train:{every}", part(False)), Corpus(f"{source.id}|heldout:{every}", part(True))


def corpus(spec: str | Path | None = None, *, field: str = "text", split: str = "train") -> Corpus:
    """The corpus named by `spec`: None or "builtin" (or "builtin:source", "builtin:all"), a .txt/.jsonl/.parquet
    file or a folder, or "hf:owner/name[:config]".

    `field` names the text field of .jsonl records, .parquet columns and HF rows; `split` the HF split.

    >>> mechscope.data.corpus().id
    'builtin:python-docs:3.11.7'
    """
    if spec is None or spec == "builtin":
        return Corpus(BUILTIN_ID, _builtin_texts)
    if isinstance(spec, str) and spec.startswith("builtin:"):
        if spec not in BUILTINS:
            raise MechscopeError(f"unknown built-in corpus {spec!r}: valid built-ins are {one_of(BUILTINS)}")
        texts = {"builtin:source": _source_texts, "builtin:all": _all_texts}.get(spec, _builtin_texts)
        return Corpus(BUILTINS[spec], texts)
    if isinstance(spec, str) and spec.startswith("hf:"):
        return _hf(spec, field, split)
    path = Path(spec).expanduser()
    if path.is_dir():
        return Corpus(f"dir:{path.resolve()}#{field}", _folder(path, field))
    if not path.exists():
        raise MechscopeError(f"no such corpus file or folder {str(spec)!r}: {_VALID}")
    suffix = "" if path.suffix.lower() == ".txt" else f"#{field}"
    return Corpus(f"file:{path.resolve()}{suffix}", _file(path, field, path.name))


# ---- files


def _file(path: Path, field: str, label: str) -> Texts:
    """Check one file now and return its reader; `label` names it in sources and errors."""
    readers = {".txt": _txt, ".jsonl": _jsonl, ".parquet": _parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise MechscopeError(f"unsupported corpus file {str(path)!r}: valid extensions are {', '.join(EXTENSIONS)}")
    return reader(path, field, label)


def _folder(path: Path, field: str) -> Texts:
    """Every supported file under `path`, recursively in sorted order, numbered on as one corpus."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise MechscopeError(f"corpus folder {str(path)!r} holds no {', '.join(EXTENSIONS)} files")
    readers = [_file(p, field, p.relative_to(path).as_posix()) for p in files]

    def texts() -> Iterator[tuple[str, str]]:
        for reader in readers:
            yield from reader()

    return texts


def _empty(label: str) -> MechscopeError:
    return MechscopeError(f"corpus file {label!r} is empty: it has no text")


def _not_utf8(label: str, err: UnicodeDecodeError) -> MechscopeError:
    return MechscopeError(f"corpus file {label!r} is not UTF-8 text (byte {err.start}: {err.reason})")


def _txt(path: Path, field: str, label: str) -> Texts:
    try:
        with open(path, encoding="utf-8") as f:
            has_text = any(chunk.strip() for chunk in iter(lambda: f.read(1 << 20), ""))
    except UnicodeDecodeError as err:
        raise _not_utf8(label, err) from None
    if not has_text:
        raise _empty(label)

    def texts() -> Iterator[tuple[str, str]]:
        yield label, path.read_text(encoding="utf-8")

    return texts


def _jsonl(path: Path, field: str, label: str) -> Texts:
    first = next(_jsonl_records(path, label), None)
    if first is None:
        raise _empty(label)
    _text_field(first[1], field, f"{label} line {first[0]}")

    def texts() -> Iterator[tuple[str, str]]:
        for line, record in _jsonl_records(path, label):
            if text := _text_field(record, field, f"{label} line {line}"):
                yield f"{label}:{line}", text

    return texts


def _jsonl_records(path: Path, label: str) -> Iterator[tuple[int, object]]:
    """(line number from 1, parsed JSON) for each non-blank line, read line by line."""
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as err:
                    raise MechscopeError(
                        f"{label} line {line_no} is not JSON ({err.msg}): each line must be one JSON object"
                    ) from None
    except UnicodeDecodeError as err:
        raise _not_utf8(label, err) from None


def _text_field(record: object, field: str, where: str) -> str:
    """The text in `record[field]` ("" for null), or an error that names the fields there are."""
    if not isinstance(record, dict):
        raise MechscopeError(f"{where} is a JSON {type(record).__name__}, not an object with a {field!r} field")
    if field not in record:
        fields = f"its fields are {one_of(record)}" if record else "it has no fields"
        raise MechscopeError(f"{where} has no field {field!r}: {fields}; pass --field")
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise MechscopeError(f"{where} field {field!r} holds a {type(text).__name__}, not text; pass --field")
    return text or ""


def _parquet(path: Path, field: str, label: str) -> Texts:
    import duckdb

    try:
        with duckdb.connect() as con:
            columns = dict(c[:2] for c in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall())
            rows = con.execute("SELECT count(*) FROM read_parquet(?)", [str(path)]).fetchone()[0]
    except duckdb.Error as err:
        raise MechscopeError(f"cannot read corpus file {label!r} as parquet: {str(err).splitlines()[0]}") from None
    if field not in columns:
        raise MechscopeError(f"{label} has no column {field!r}: its columns are {one_of(columns)}; pass --field")
    if columns[field] != "VARCHAR":
        raise MechscopeError(f"{label} column {field!r} is {columns[field]}, not text; pass --field")
    if rows == 0:
        raise _empty(label)
    quoted = '"' + field.replace('"', '""') + '"'
    query = f"SELECT {quoted} FROM read_parquet(?)"

    def texts() -> Iterator[tuple[str, str]]:
        with duckdb.connect() as con:
            con.execute("SET threads = 1")  # one thread holds one row group at a time; tokenising is the slow part anyway
            result = con.execute(query, [str(path)])
            row = 0
            while batch := result.fetchmany(_PARQUET_BATCH):
                for (text,) in batch:
                    if text:
                        yield f"{label}:{row}", text
                    row += 1

    return texts


# ---- HuggingFace datasets


def _hf(spec: str, field: str, split: str) -> Corpus:
    """A streamed HF dataset; opened now, so a bad name, an offline hub or a missing field fail at once."""
    name, _, config = spec.removeprefix("hf:").partition(":")
    if not _HF_NAME.fullmatch(name):
        raise MechscopeError(f"bad HF dataset {spec!r}: write hf:owner/name or hf:owner/name:config")
    from mechscope.models.load import hub_unreachable  # looked up at call time, so tests can stand in for it

    if reason := hub_unreachable():
        raise MechscopeError(
            f"cannot stream {spec!r}: the HuggingFace hub is unreachable ({reason}); "
            "pass a local .txt, .jsonl or .parquet file instead"
        )
    try:
        import datasets
    except ImportError:
        raise MechscopeError(f"{spec!r} needs the datasets package: pip install 'mechscope[hf]'") from None
    try:
        rows = datasets.load_dataset(name, config or None, split=split, streaming=True)
        first = next(iter(rows), None)
    except Exception as err:  # the hub client raises many types; all mean the same to the user
        raise MechscopeError(f"cannot stream {spec!r} (split {split!r}): {str(err).splitlines()[0][:200]}") from None
    if first is None:
        raise MechscopeError(f"HF dataset {spec!r} split {split!r} is empty")
    _text_field(first, field, f"{spec} row 0")

    def texts() -> Iterator[tuple[str, str]]:
        for i, record in enumerate(rows):
            if text := _text_field(record, field, f"{spec} row {i}"):
                yield f"{spec}:{i}", text

    return Corpus(f"hf:{name}:{config or 'default'}:{split}#{field}", texts)


# ---- the built-in corpus: CPython's documentation


def _source_texts() -> Iterator[tuple[str, str]]:
    """Each standard-library source file (tests excluded) as one document, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        if path.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield f"source:{path.relative_to(root).as_posix()}", text


def _all_texts() -> Iterator[tuple[str, str]]:
    yield from _builtin_texts()
    yield from _source_texts()


def _builtin_texts() -> Iterator[tuple[str, str]]:
    """The pydoc topics sorted by name, then one document of docstrings per standard-library module."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"pydoc:{key}", topics[key]
    yield from _stdlib_docstrings()


@functools.cache
def _stdlib_docstrings() -> tuple[tuple[str, str], ...]:
    """("stdlib:json/decoder.py", docstrings) for each standard-library module that has any prose.

    Parsing the standard library takes a few seconds, so the result is kept for the process (~2 MB).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = ((f"stdlib:{p.relative_to(root).as_posix()}", _module_docstrings(p)) for p in _stdlib_files(root))
    return tuple((source, text) for source, text in found if text)


def _stdlib_files(root: Path) -> Iterator[Path]:
    """The standard library's .py files in sorted order, without tests, caches or installed packages."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        yield from (Path(folder) / f for f in sorted(files) if f.endswith(".py"))


def _module_docstrings(path: Path) -> str:
    """The module's docstring, then its classes' and functions' (nested too) in source order; "" if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):  # ValueError covers undecodable source and null bytes
        return ""
    docs = (ast.get_docstring(node, clean=True) for node in [tree, *_definitions(tree)])
    return "\n\n".join(d for d in docs if d and len(d) >= MIN_DOCSTRING)


def _definitions(node: ast.AST) -> Iterator[ast.AST]:
    """Classes and functions under `node` in source order, also inside if/try/with blocks and other definitions."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield child
        if isinstance(child, ast.stmt | ast.excepthandler | ast.match_case):  # expressions hold no definitions
            yield from _definitions(child)
