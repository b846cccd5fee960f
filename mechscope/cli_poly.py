"""Commands: polysemanticity.

`register(app)` adds them to the `mechscope` command; they follow its conventions (`cli_common`):
output paths are checked before the model loads, errors are one line, text from the index is shown
literally. Without --db, the index is the model's own (`index build`'s default), or, for a --dict
folder, the first of the model's indexes that holds that dictionary's features (the demo's too).
"""

from __future__ import annotations

import csv as csv_module
import json
import math
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mechscope.cli_common import atomic_output, check_output, literal, shown
from mechscope.cli_options import with_options
from mechscope.errors import MechscopeError
from mechscope.index.polysemanticity import PolySettings

console = Console()
if not console.is_terminal:  # piped or logged: keep whole rows rather than fold them into 80 columns
    console.width = max(console.width, 160)
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'default', a local HF folder, a .gguf file, or a hub id.")]
METRICS = (
    ("density", "density (log10)", lambda r: math.log10(r.density) if r.density > 0 else math.nan),
    ("kurtosis", "excess kurtosis (log10 of 3 + it)", lambda r: math.log10(r.kurtosis + 3) if r.kurtosis + 3 > 0 else math.nan),
    ("token_entropy", "token entropy (bits)", lambda r: r.token_entropy),
    ("clusters", "context clusters", lambda r: r.clusters),
    ("f1", "explanation F1", lambda r: r.f1),
    ("precision", "explanation precision", lambda r: r.precision),
)
"""Each metric plotted: the field, the axis label, and the value drawn (dead units left out)."""


def _load(model: str):
    import mechscope

    return mechscope.load(model)


@with_options(PolySettings)
def polysemanticity(
    db: Annotated[
        Path | None,
        typer.Option(help="The index database. Default: the model's index, or for --dict DIR one of the model's that holds it."),
    ] = None,
    dictionary: Annotated[
        list[str], typer.Option("--dict", help="A dictionary folder, or the NAME of one the index holds (f:NAME); repeat.")
    ] = None,
    site: Annotated[list[str], typer.Option(help="A site of the index, or a layer number for its neurons; repeat.")] = None,
    unit: Annotated[list[str], typer.Option(help="Also list these units (L:N, SITE:I, f:NAME:F), one row each; repeat.")] = None,
    csv: Annotated[Path | None, typer.Option(help="Write every measured unit's metrics here (a .csv file).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the summaries and every unit's metrics here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Plot each group's distribution of every metric here (a .png file).")] = None,
    model: ModelOpt = "default",
    config: PolySettings = None,
):
    """How polysemantic units are, from an index (no model pass): density, kurtosis, token entropy, context clusters,
    and the share whose best n-gram explanation scores F1 >= 0.5 on held-out tokens (docs/polysemanticity.md).

    Groups are each --site and --dict; without any (and without --unit), every site of the index.
    """
    from mechscope.index.polysemanticity import polysemanticity as measure
    from mechscope.index.polysemanticity import summary

    csv, json_out = check_output("--csv", csv, ".csv"), check_output("--json", json_out, ".json")
    png = check_output("--png", png, ".png")
    if png and unit and not (site or dictionary):
        raise MechscopeError("--png plots groups of units: give --site or --dict as well as --unit")
    m = _load(model)
    folders = [d for d in dictionary or [] if Path(d).is_dir()]
    index = _open(db, m, folders, model)
    with index:
        groups = [(_site_name(index, s), {"site": s}) for s in site or []]
        groups += [(_features(name), {"dictionary": name}) for name in _dictionary_names(index, dictionary or [], m)]
        if not groups and not unit:
            groups = [(s.site, {"site": s.site}) for s in index.sites]
        measured = [(label, measure(index, settings=config, **how)) for label, how in groups]
        listed = measure(index, units=unit, settings=config) if unit else []
    summaries = [summary(rows, label) for label, rows in measured]
    if summaries:
        console.print(_summary_table(summaries, index.path, config))
    if listed:
        console.print(_unit_table(listed))
    everything = _unique([r for _, rows in measured for r in rows] + listed)
    if csv:
        with atomic_output(csv) as tmp:
            _write_csv(tmp, everything)
        console.print(f"CSV: {shown(csv.resolve())}")
    if json_out:
        payload = {"index": str(index.path), "settings": asdict(config), "summaries": [_plain(s._asdict()) for s in summaries],
                   "units": [_record(r) for r in everything]}  # fmt: skip
        with atomic_output(json_out) as tmp:
            tmp.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
        console.print(f"JSON: {shown(json_out.resolve())}")
    if png:
        with atomic_output(png) as tmp:
            distributions_png(measured, tmp, title=f"{index.meta.get('model')} · {index.meta.get('tokens_seen', 0):,} tokens")
        console.print(f"PNG: {shown(png.resolve())}")


def _site_name(index, site: str) -> str:
    """The site's name as the index holds it (a layer number names that layer's neurons)."""
    return index._site(site).site


def _features(name: str) -> str:
    """A dictionary's site in an index: f:NAME."""
    from mechscope.index.features import PREFIX

    return name if name.startswith(PREFIX) else PREFIX + name


def _open(db: Path | None, m, folders: list[str], model: str = "default"):
    """The index to read: --db, else the first of the model's indexes holding every --dict folder's features, else
    the model's default one. An unfinished index gets its note on stderr."""
    from mechscope.index.build import default_index_path
    from mechscope.index.query import Index

    path = db or default_index_path(m.name)
    if db is None and folders:
        path = _index_holding(folders, m, [path, *sorted(path.parent.glob(f"{m.name}-*.duckdb"))]) or path
    if db is None and not path.exists():  # the hint names the model: without --model, index build reads the default one
        how = "" if model == "default" else f" --model {shlex.quote(model)}"
        hint = f"build one with `mechscope index build{how}`, or give --db"
        raise MechscopeError(f"no index of this model at {str(path)!r}: {hint}")
    index = Index(path, model=m, warn=False)
    if index.unfinished:
        Console(stderr=True).print(f"[yellow]note:[/] {shown(index.unfinished)}", highlight=False, soft_wrap=True)
    return index


def _index_holding(folders: list[str], m, paths: list[Path]) -> Path | None:
    from contextlib import closing

    from mechscope.dictionaries.formats import load_any
    from mechscope.index import store
    from mechscope.index.features import indexed_features

    loaded = [load_any(folder, model=m) for folder in folders]
    for path in paths:
        if path.is_file() and store.stored_format(path) == store.FORMAT:
            with closing(store.open_index(path)) as con:
                meta = store.read_meta(con)
            if all(indexed_features(meta, d) for d in loaded):
                return path
    return None


def _dictionary_names(index, given: list[str], m) -> list[str]:
    """The index's name (f:NAME) of each --dict: a folder's by its weights' digest, else the name as given."""
    from mechscope.dictionaries.formats import load_any
    from mechscope.index.features import indexed_features

    names = []
    for spec in given:
        if not Path(spec).is_dir():
            names.append(spec)
            continue
        site = indexed_features(index.meta, load_any(spec, model=m))
        if site is None:
            raise MechscopeError(
                f"--dict {spec!r}: {str(index.path)!r} does not hold its features: build an index with "
                f"`mechscope index build --dict {spec}` and pass it with --db"
            )
        names.append(site)
    return names


def _unique(rows: list) -> list:
    seen, out = set(), []
    for r in rows:
        if r.unit.id not in seen:
            seen.add(r.unit.id)
            out.append(r)
    return out


def _number(x: float, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _summary_table(summaries, path: Path, settings: PolySettings) -> Table:
    table = Table(title=literal(f"polysemanticity from {path}"), title_justify="left")
    for column in ("group", "units", "dead", "density", "kurtosis", "entropy", "clusters", "F1", "F1 >= 0.5"):
        table.add_column(column, justify="left" if column == "group" else "right", overflow="fold")  # wrap, never cut
    for s in summaries:
        table.add_row(literal(s.group), f"{s.units:,}", f"{s.dead:,}", _number(s.median_density, ".2%"),
                      _number(s.median_kurtosis), _number(s.median_entropy, ".2f"), _number(s.median_clusters, ".1f"),
                      _number(s.median_f1, ".2f"), _number(s.explained, ".1%"))  # fmt: skip
    table.caption = (
        "medians over live units (entropy in bits); F1 >= 0.5: the share of live units whose best n-gram (n <= 3) "
        f"scores F1 >= 0.5 on held-out tokens, firing at activation >= {settings.fire_share:g} x max; "
        f"clusters at similarity >= {settings.similarity:g}"
    )
    return table


def _unit_table(rows) -> Table:
    table = Table(title="units", title_justify="left")
    for column in ("unit", "density", "kurtosis", "entropy", "examples", "clusters", "n-gram", "fires at", "precision",
                   "recall", "F1"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("unit", "n-gram") else "right", overflow="fold")
    for r in rows:
        table.add_row(literal(r.unit.name), _number(r.density, ".2%"), _number(r.kurtosis), _number(r.token_entropy, ".2f"),
                      str(r.examples), str(r.clusters), literal(_ngram_text(r)), _number(r.fire_threshold),
                      _number(r.precision, ".2f"), _number(r.recall, ".2f"), _number(r.f1, ".2f"))  # fmt: skip
    return table


def _ngram_text(r) -> str:
    if not r.ngram:
        return "-"
    return " ".join(repr(t) for t in r.ngram_tokens) if r.ngram_tokens is not None else " ".join(map(str, r.ngram))


def _record(r) -> dict:
    record = r._asdict()
    unit = record.pop("unit")
    return _plain({"unit": unit.name, "site": unit.site, "index": unit.index, **record, "ngram": list(r.ngram),
                   "ngram_tokens": None if r.ngram_tokens is None else list(r.ngram_tokens)})  # fmt: skip


def _plain(record: dict) -> dict:
    """NaN as None (JSON has no NaN)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


def _write_csv(path: Path, rows) -> None:
    with path.open("w", newline="") as f:
        writer = csv_module.writer(f)
        records = [_record(r) for r in rows]
        header = list(records[0]) if records else ["unit"]
        writer.writerow(header)
        for record in records:
            record["ngram"] = " ".join(map(str, record["ngram"]))  # token ids
            record["ngram_tokens"] = json.dumps(record["ngram_tokens"])  # their texts, which may hold spaces or commas
            writer.writerow(["" if v is None else v for v in record.values()])


def distributions_png(groups: list[tuple[str, list]], out: Path | str, title: str = "") -> None:
    """Each metric's distribution over the live units of each group (label, rows), as a 2 x 3 PNG of histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mechscope.viz.report import save_png

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), constrained_layout=True)
    for ax, (field, label, value) in zip(axes.flat, METRICS, strict=True):
        drawn = [np.array([value(r) for r in rows if r.examples > 0], np.float64) for _, rows in groups]
        drawn = [v[np.isfinite(v)] for v in drawn]
        both = np.concatenate(drawn) if drawn else np.zeros(0)
        bins = np.linspace(both.min(), both.max() + 1e-9, 31) if len(both) else 10
        if field == "clusters" and len(both):  # whole numbers: one bar each
            bins = np.arange(0.5, both.max() + 1.5)
        for (name, _), values in zip(groups, drawn, strict=True):
            median = f", median {np.median(values):.3g}" if len(values) else ""
            ax.hist(values, bins=bins, histtype="step", lw=1.4, density=True, label=f"{name} ({len(values):,}{median})")
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("share of units (per unit of x)", fontsize=8)  # normalised counts, not the density metric
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.suptitle(title.replace("$", r"\$"), fontsize=11)
    save_png(fig, out)


def register(app) -> None:
    """Add this module's commands to `app`."""
    app.command(name="polysemanticity")(polysemanticity)
