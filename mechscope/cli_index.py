"""`mechscope index ...`: build an index of neurons (or any site's units) over a corpus, and read it.

Mounted on the main app in `mechscope.cli`; errors are `MechscopeError`s, printed there as one line.
Without --db/--out, an index lives at `mechscope.index.build.default_index_path(model name)`.
Every count is checked before any work (`cli_common.check_range`, and the index's own `SettingError`s
worded with the option's name); an unfinished index gets a note on stderr with every command.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mechscope.cli_common import DeviceOpt, check_html_png, check_output, check_range, job_device, shown
from mechscope.errors import MechscopeError
from mechscope.index.settings import MAX_K, SettingError

index_app = typer.Typer(
    no_args_is_help=True,
    help="Max-activating examples, histograms and densities of every neuron, in a DuckDB file: build, show, search, rank.",
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'default', a local HF folder, a .gguf file, or a hub id.")]
DbOpt = Annotated[Path | None, typer.Option("--db", help="The index database. Default: the model's index in the user cache.")]
NOpt = Annotated[int, typer.Option("--n", "-n", help="How many rows to show.")]


def _console() -> Console:
    from mechscope import cli

    return cli.console


def _load(model: str, device=None):
    import mechscope

    return mechscope.load(model, device=device)


FLAGS = {"ctx_len": "--ctx-len", "batch_size": "--batch-size", "n": "-n"}
"""Option names of the settings whose option is not simply --NAME."""


@contextlib.contextmanager
def _options() -> Iterator[None]:
    """Word a `SettingError` with the option's name (--ctx-len for ctx_len)."""
    try:
        yield
    except SettingError as err:
        raise MechscopeError(err.worded(FLAGS.get(err.setting, "--" + err.setting.replace("_", "-")))) from None


def _at_least_one(option: str, value: int, upto: str) -> None:
    """The check before the index is open, which knows the upper bound (`upto`) and checks it then."""
    if value < 1:
        raise MechscopeError(f"{option} {value} is out of range: valid values are 1 up to {upto}")


def _open(db: Path | None, model: str, need_model: bool = True):
    """(Index, model): the model is loaded when needed for tokens, or to find the default database.

    An unfinished index gets its note on stderr here, so that every command shows it.
    """
    from mechscope.index.build import default_index_path
    from mechscope.index.query import Index

    m = _load(model) if need_model or db is None else None
    index = Index(db or default_index_path(m.name), model=m, warn=False)
    if index.unfinished:
        Console(stderr=True).print(f"[yellow]note:[/] {shown(index.unfinished)}", highlight=False, soft_wrap=True)
    return index, m


def _contexts(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    start, _, stop = text.partition(":")
    if not (start.strip().isdigit() and stop.strip().isdigit()):
        raise MechscopeError(f"bad --contexts {text!r}: give START:STOP, e.g. 0:512")
    return int(start), int(stop)


@index_app.command()
def build(
    sites: Annotated[
        list[str],
        typer.Option("--sites", "-s", help="Sites to index; repeat or separate with commas. Default: every MLP neuron."),
    ] = None,
    tokens: Annotated[int, typer.Option(help="Tokens to read (rounded up to whole contexts).")] = 100_000,
    corpus: Annotated[
        str | None, typer.Option(help="A .txt/.jsonl/.parquet file or folder, or hf:NAME. Default: built-in docs.")
    ] = None,
    field: Annotated[str, typer.Option(help="Text field of JSONL records or Parquet rows.")] = "text",
    ctx_len: Annotated[int, typer.Option(help="Tokens per context, the start token included.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.")] = 8,
    k: Annotated[int, typer.Option(help="Top examples kept per unit.")] = 20,
    seed: Annotated[int, typer.Option(help="Shuffle seed of the corpus's documents.")] = 0,
    contexts: Annotated[str | None, typer.Option(help="Build only contexts START:STOP (a shard, for `index merge`).")] = None,
    out: Annotated[Path | None, typer.Option(help="The database to write (resumed if unfinished).")] = None,
    dictionaries: Annotated[
        list[str],
        typer.Option(
            "--dict",
            help="Also index every feature of this dictionary folder (NAME=DIR names it; default: the folder's name, "
            "or its parent's for train-dict's OUT/dictionary); feature F is the unit f:NAME:F. Repeatable; "
            "without --sites, only the features are indexed.",
        ),
    ] = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
):
    """Build (or resume) an index: one streaming pass over the corpus, checkpointed every minute.

    A build that stops before its first checkpoint leaves nothing behind; a later one resumes from the last.

    Under torchrun, each process builds a share of the contexts beside --out, running the model on its own GPU
    (--device auto); rank 0 merges them (rerun to resume):

    torchrun --standalone --nproc-per-node N --no-python mechscope index build ...
    """
    from mechscope.index.build import IndexSettings, build_index, default_index_path
    from mechscope.runtime import Ranks

    with _options():
        settings = IndexSettings(
            corpus=corpus, field=field, tokens=tokens, ctx_len=ctx_len, batch_size=batch_size, k=k, seed=seed,
            contexts=_contexts(contexts),
        )  # fmt: skip
    out = check_output("--out", out)
    m = _load(model, job_device(device))
    out = out or check_output("--out", default_index_path(m.name))
    names = [s.strip() for spec in sites or () for s in spec.split(",") if s.strip()] or None
    folders = _dictionaries(dictionaries or [])
    start = time.perf_counter()
    with _options(), _made_folders(out.parent):
        build_index(m, out, sites=names, settings=settings, dictionaries=folders)
    if not Ranks.from_environment().main:  # under torchrun, rank 0 reports for all
        return
    _console().print(f"index: {shown(out.resolve())} ({time.perf_counter() - start:.1f} s)")
    info(db=out, model=model, as_json=False)


def _dictionaries(specs: list[str]) -> dict[str, str]:
    """NAME -> folder for each --dict DIR or NAME=DIR."""
    from mechscope.index.features import default_name

    named: dict[str, str] = {}
    for spec in specs:
        name, _, folder = spec.partition("=") if "=" in spec else ("", "", spec)
        name = name or default_name(folder)
        if name in named:
            raise MechscopeError(f"--dict: two dictionaries are named {name!r}: name them apart with --dict NAME=DIR")
        named[name] = folder
    return named


@contextlib.contextmanager
def _made_folders(folder: Path) -> Iterator[None]:
    """Create `folder` (and missing parents) for the block; remove the ones it made if the block fails and left them empty."""
    made = []
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    for path in reversed(made):
        path.mkdir(exist_ok=True)  # under torchrun, another process may make it first
    try:
        yield
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):  # not empty: something was written there
                path.rmdir()
        raise


@index_app.command()
def show(
    unit: Annotated[str, typer.Argument(help="A neuron L:N (e.g. 12:345), SITE:I, or a dictionary feature f:NAME:F.")],
    db: DbOpt = None,
    n: NOpt = 20,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained HTML page on the unit here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Write the unit's histogram as a PNG here.")] = None,
    samples: Annotated[bool, typer.Option(help="Also show samples from each range of activation.")] = True,
    model: ModelOpt = "default",
):
    """A unit's card (statistics, histogram, tokens in and out) and its top examples as token heatmaps."""
    from mechscope.index.card import unit_card
    from mechscope.viz import index_views as views

    check_range("-n", n, 1, MAX_K, " (top examples to show: at most the index's k, which is at most 1024)")
    html, png = check_html_png(html, png)
    index, m = _open(db, model)
    with index, _options():
        examples = index.top(unit, n)
        card = unit_card(index, unit, model=m)
        strata = index.samples(card.unit) if samples else []
    console = _console()
    for table in views.card_tables(card):
        console.print(table)
    if card.unit.site.startswith("f:"):
        console.print("[dim]its logit effects and nearest features: mechscope feature DIR F (DIR: the dictionary's folder)[/]")
    for part in views.examples_renderables(card.histogram, examples, strata):
        console.print(part)
    if html:
        console.print(f"HTML page: {views.unit_page(html, card, examples, strata).resolve()}")
    if png:
        console.print(f"PNG: {views.histogram_png(card.histogram, png, f'{card.unit.name}: activation histogram').resolve()}")


@index_app.command()
def search(
    text: Annotated[str, typer.Argument(help="A token or string (mind the leading space: ' Python'), or a token id with --id.")],
    db: DbOpt = None,
    n: NOpt = 20,
    token_id: Annotated[bool, typer.Option("--id", help="TEXT is a token id.")] = False,
    model: ModelOpt = "default",
):
    """Units whose top examples sit most often on TEXT's (last) token, the rest of TEXT preceding it."""
    _at_least_one("-n", n, "the units in the index")
    if token_id and not text.strip().isdigit():
        raise MechscopeError(f"--id needs a token id, got {text!r}")
    index, m = _open(db, model)
    query = int(text) if token_id else text
    with index, _options():
        hits = index.search(query, n)
        ids = [query] if token_id else index.search_ids(text)
        seen = index.token_count(ids[-1])
    console = _console()
    searched = shown(repr("".join(m.to_str_tokens(ids))))
    console.print(
        f"units whose top examples sit on {searched} (token ids {ids}; the last occurs {seen:,} times in the indexed contexts)"
    )
    if not hits:
        console.print(_nothing_found(index.meta, searched, len(ids), seen), soft_wrap=True)
        return
    table = Table()
    for column in ("unit", "top examples there", "best there", "unit max"):
        table.add_column(column, justify="left" if column == "unit" else "right")
    for h in hits:
        table.add_row(h.unit.name, str(h.hits), f"{h.best:.4g}", f"{h.max:.4g}")
    console.print(table)


def _nothing_found(meta: dict, searched: str, n_ids: int, seen: int) -> str:
    """Why no unit has a top example on the searched text, and where to look instead (`searched` is already shown)."""
    if seen:
        after = ", after the rest of the string," if n_ids > 1 else ""
        return (
            f"no unit has a top example there: the last token occurs {seen:,} times, but no unit has one of those{after} "
            f"among its top {meta['k']} (the first {meta['skip']} positions of each context are never scored)"
        )
    read = meta["contexts_done"] * meta["ctx_len"]
    return (
        f"no unit has a top example there: {searched} never occurs in the {read:,} tokens this index read from "
        f"{shown(meta['corpus'])}. Search a token that text has, build an index over text that has it "
        "(`index build --corpus`), or see which units write it with `mechscope attribute`"
    )


@index_app.command()
def rank(
    by: Annotated[str, typer.Option(help="density, max or mean.")] = "density",
    site: Annotated[str | None, typer.Option(help="Only units of this site (or a layer number for its neurons).")] = None,
    n: NOpt = 20,
    ascending: Annotated[bool, typer.Option(help="Lowest first.")] = False,
    db: DbOpt = None,
    model: ModelOpt = "default",
):
    """Units ranked by density, max or mean activation."""
    _at_least_one("-n", n, "the units in the index")
    index, _ = _open(db, model, need_model=False)
    with index, _options():
        rows = index.rank(by=by, n=n, site=site, ascending=ascending)
    table = Table(title=f"units by {by}, {'lowest' if ascending else 'highest'} first", title_justify="left")
    for column in ("unit", "density", "max", "mean", "std"):
        table.add_column(column, justify="left" if column == "unit" else "right")
    for r in rows:  # a neuron's name L:N says its site, any other unit's name is SITE:I
        table.add_row(r.unit.name, f"{r.density:.2%}", f"{r.max:.4g}", f"{r.mean:.4g}", f"{r.std:.4g}")
    _console().print(table)


@index_app.command()
def merge(
    parts: Annotated[list[Path], typer.Argument(help="Two or more shards built with the same settings.")],
    out: Annotated[Path, typer.Option(help="The merged database (a new file).")],
):
    """Merge index shards built over disjoint context ranges (`index build --contexts`) into one."""
    from mechscope.index.build import merge_indexes

    out = check_output("--out", out)
    with _made_folders(out.parent):
        merge_indexes(list(parts), out)
    _console().print(f"merged {len(parts)} shards into {shown(out.resolve())}")
    info(db=out, model="default", as_json=False)


@index_app.command()
def info(
    db: DbOpt = None,
    model: ModelOpt = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")] = False,
):
    """An index's metadata: model, sites, corpus, tokens seen, whether the build is complete."""
    index, _ = _open(db, model, need_model=False)
    with index:
        meta = index.describe()
    if as_json:
        print(json.dumps({"path": str(index.path), **meta}, indent=2))
        return
    sites, (start, stop) = meta["sites"], meta["contexts"]
    listed = ", ".join(sites) if len(sites) <= 4 else f"{sites[0]} ... {sites[-1]} ({len(sites)} sites)"
    rows = [
        ("database", f"{index.path} ({index.path.stat().st_size / 2**20:.1f} MiB)"),
        ("model", f"{meta['model']} (fingerprint {meta['model_fingerprint']})"),
        ("sites", listed),
        ("units", f"{meta['units']:,}"),
        ("corpus", f"{meta['corpus']} (hash {meta.get('corpus_hash', 'not yet: unfinished')})"),
        ("contexts", f"{start}:{stop} ({meta['ctx_len']} tokens each), {meta['contexts_done']} done"),
        ("tokens seen", f"{meta['tokens_seen']:,}"),
        ("complete", "yes" if meta["complete"] else "no: run the same build again to resume it"),
        ("settings", f"k={meta['k']}, samples={meta['n_samples']}, threshold={meta['threshold']}, seed={meta['seed']}"),
    ]
    for d in meta.get("dictionaries", []):  # features: units f:NAME:F
        reads = ", ".join(d["read_sites"])
        rows.insert(3, (f"f:{d['name']}", f"{d['d_sae']:,} features of a dictionary reading {reads} (digest {d['digest']})"))
    table = Table(title="index", title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, shown(value))
    _console().print(table)
