"""Dictionary commands: harvest, train-dict, eval-dict, find-feature, steer, feature.

`register(app)` adds them to the `mechscope` command; they follow its conventions (`cli_common`):
numbers and output paths are checked before the model loads, errors are one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mechscope.cli_common import DeviceOpt, check_folder, check_html_png, check_output, check_range, job_device, literal, shown
from mechscope.cli_options import with_options
from mechscope.dictionaries.train import TrainConfig
from mechscope.errors import MechscopeError
from mechscope.index.settings import MAX_K, SettingError

console = Console()
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'default', a local HF folder, a .gguf file, or a hub id.")]
MAX_TOKENS = 10**10


def _load(model: str, dtype: str = "float32", device=None):
    import mechscope

    if dtype not in ("float32", "bfloat16", "float16"):
        raise MechscopeError(f"--model-dtype {dtype!r} is not a dtype: valid values are float32, bfloat16, float16")
    return mechscope.load(model, dtype=dtype, device=device)


def _dictionary(folder: str, m):
    """A dictionary folder in any format mechscope reads (its own, SAELens, sparsify), checked against the model."""
    from mechscope.dictionaries import load_any

    return load_any(folder, model=m)


def harvest(
    sites: Annotated[list[str], typer.Argument(help="Sites to store, e.g. blocks.15.hook_resid_post (several: one width).")],
    out: Annotated[Path, typer.Option(help="Folder of the store (created; an existing store is continued).")],
    tokens: Annotated[int, typer.Option(help="Tokens to store (rounded up to whole shards).")] = 1_000_000,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    corpus: Annotated[
        str | None, typer.Option(help="builtin (default), builtin:source, builtin:all, a file or folder, or hf:NAME.")
    ] = None,
    ctx_len: Annotated[int, typer.Option(help="Tokens per context, the start token included.")] = 128,
    shard_contexts: Annotated[int, typer.Option(help="Contexts per shard.")] = 256,
    model: ModelOpt = "default",
    model_dtype: Annotated[
        str, typer.Option(help="Model dtype while harvesting: float32, or bfloat16 (faster on CPUs with bf16 matmuls).")
    ] = "float32",
    device: DeviceOpt = "auto",
):
    """Write site activations to a disk store (safetensors shards + manifest) for dictionary training; resumable;
    under torchrun, the processes share the shards of one store, each running the model on its own GPU (--device auto):

    torchrun --standalone --nproc-per-node N --no-python mechscope harvest ..."""
    from mechscope.activations import HarvestSettings, StreamSpec
    from mechscope.activations import harvest as run_harvest
    from mechscope.runtime import Ranks

    check_range("--tokens", tokens, 1, MAX_TOKENS)
    check_range("--ctx-len", ctx_len, 8, 8192)
    check_range("--shard-contexts", shard_contexts, 1, 100_000)
    check_folder("--out", out)
    settings = HarvestSettings(tokens=tokens, dtype=dtype, shard_contexts=shard_contexts)
    m = _load(model, model_dtype, job_device(device))
    check_range("--ctx-len", ctx_len, 8, m.n_ctx, f" (the model's context is {m.n_ctx} tokens)")
    manifest = run_harvest(m, StreamSpec(tuple(sites), corpus, ctx_len=ctx_len), out, settings)
    if not Ranks.from_environment().main:  # under torchrun, rank 0 reports
        return
    console.print(
        f"store {shown(out)}: {manifest['tokens']:,} tokens of {shown(', '.join(manifest['sites']))} "
        f"({manifest['dtype']}, {len(manifest['shards'])} shards; the first {manifest['skip']} positions of each context skipped)"
    )


@with_options(TrainConfig, skip=("device",))
def train_dict(
    out: Annotated[Path, typer.Option(help="Folder for the run: checkpoint, metrics.jsonl, curves and dictionary/.")],
    png: Annotated[bool, typer.Option(help="Plot the training curves to OUT/curves.png at the end.")] = True,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    config: TrainConfig = None,
):
    """Train a sparse dictionary (SAE, transcoder, crosscoder or CLT) on the model's activations; resumes OUT/checkpoint.

    Under torchrun, the processes split each batch and average their gradients, each on its own GPU (--device auto):

    torchrun --standalone --nproc-per-node N --no-python mechscope train-dict ..."""
    from mechscope.dictionaries import train_dictionary
    from mechscope.runtime import Ranks
    from mechscope.viz.dict_plots import read_metrics, training_curves_png

    check_range("--tokens", config.tokens, 1, MAX_TOKENS)
    check_range("--batch-size", config.batch_size, 1, 1 << 20)
    check_folder("--out", out)
    config.device = device  # the model and the dictionary on one device
    m = _load(model, "float32", job_device(device))
    d = train_dictionary(m, config, out)
    if not Ranks.from_environment().main:  # under torchrun, rank 0 reports and plots
        return
    log = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    if not log:  # a finished run whose log was removed
        console.print(f"dictionary {shown(out / 'dictionary')}: {d.cfg.kind}, {d.d_sae:,} latents (trained before; no log)")
        return
    last = log[-1]
    fvu, l0 = last.get("eval_fvu", float("nan")), last.get("eval_l0", float("nan"))
    where = ", ".join(d.cfg.read_sites)
    if not d.cfg.reconstructs:  # a transcoder or CLT: what it writes too
        where += " -> " + ", ".join(d.cfg.write_sites)
    console.print(
        f"dictionary {shown(out / 'dictionary')}: {d.cfg.kind}, {d.d_sae:,} latents ({d.cfg.activation}) on "
        f"{shown(where)} · {last['tokens']:,} tokens · held-out FVU {fvu:.4f} · L0 {l0:.1f} · dead {last['dead']:.1%}"
    )
    if png:
        training_curves_png(log, out / "curves.png", title=f"{m.name} · {where}")
        console.print(f"curves: {shown((out / 'curves.png').resolve())}")


def eval_dict(
    folder: Annotated[str, typer.Argument(help="A dictionary folder (OUT/dictionary of train-dict).")],
    tokens: Annotated[int, typer.Option(help="Held-out tokens to evaluate on (rounded up to whole contexts).")] = 32_768,
    corpus: Annotated[str, typer.Option(help="Corpus whose held-out documents (every 20th) are read.")] = "builtin:all",
    ablation: Annotated[str, typer.Option(help="What CE-loss recovered compares with: zero or mean ablation.")] = "zero",
    ctx_len: Annotated[int, typer.Option(help="Tokens per context, the start token included.")] = 128,
    png: Annotated[Path | None, typer.Option(help="Write the feature-density histogram here (a .png file).")] = None,
    profile_png: Annotated[
        Path | None, typer.Option(help="A dictionary writing several sites: plot where its features write (a .png file).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    model: ModelOpt = "default",
):
    """FVU, L0, dead and dense fractions, CE-loss recovered, delta CE and KL of a dictionary on held-out text."""
    import torch

    from mechscope.dictionaries.evaluate import ABLATIONS, evaluate_dictionary
    from mechscope.viz.dict_plots import decoder_profile_png, density_histogram_png

    check_range("--tokens", tokens, 1, 10_000_000)
    if ablation not in ABLATIONS:
        raise MechscopeError(f"--ablation {ablation!r} is not valid: give zero or mean")
    check_range("--ctx-len", ctx_len, 8, 8192)
    png = check_output("--png", png, ".png")
    profile_png = check_output("--profile-png", profile_png, ".png")
    m = _load(model)
    check_range("--ctx-len", ctx_len, 8, m.n_ctx, f" (the model's context is {m.n_ctx} tokens)")
    d = _dictionary(folder, m)
    if profile_png and d.n_write < 2:
        raise MechscopeError(f"--profile-png needs a dictionary that writes several sites; {folder!r} writes one")
    check_range("--ctx-len", ctx_len, d.cfg.skip_positions + 2, m.n_ctx, f" (the first {d.cfg.skip_positions} are skipped)")
    result = evaluate_dictionary(m, d, corpus, tokens=tokens, ctx_len=ctx_len, ablation=ablation, show_progress=not as_json)
    if png:
        density_histogram_png(result.density, png, title=str(folder))
    if profile_png:
        alive = torch.tensor(result.density) > 0  # latents that never fired keep rows near their random start
        layers = d.latent_site(torch.arange(d.d_sae))[alive] if d.cfg.layered else None  # a CLT: by the layer read
        title = f"{folder}: where its features write (the {int(alive.sum()):,} that fired on {result.tokens:,} tokens)"
        decoder_profile_png(d.decoder_profile()[alive], d.cfg.write_sites, profile_png, title=title, layers=layers)
    if as_json:
        print(json.dumps(result.summary(), indent=1))
        return
    table = Table(title=literal(f"{folder} on {result.tokens:,} held-out tokens"), title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in result.summary().items():
        if name == "fvu_per_site":  # one row per written site, named
            for site, fvu in zip(d.cfg.write_sites, value, strict=True):
                table.add_row(literal(f"fvu {site}"), f"{fvu:.4f}")
        elif name == "sites_carrying":  # how many features need 1, 2, ... sites; None for a one-site dictionary
            if value is not None:
                table.add_row("features carried by 1, 2, ... sites", literal(" / ".join(f"{n:,}" for n in value)))
        else:
            table.add_row(name, f"{value:.4f}" if isinstance(value, float) else literal(str(value)))
    table.add_row("kind", d.cfg.kind)
    console.print(table)
    console.print(f"the first {result.skip} positions of each context are left out of every figure")
    if png:
        console.print(f"density histogram: {shown(png.resolve())}")
    if profile_png:
        console.print(f"decoder profiles: {shown(profile_png.resolve())}")


def find_feature(
    texts: Annotated[list[str], typer.Argument(help="Texts that mention the concept; mark its words as [[...]] if you like.")],
    dictionary: Annotated[str, typer.Option("--dict", help="A dictionary folder.")],
    vs: Annotated[list[str], typer.Option(help="Texts that do not mention it (default: held-out corpus text).")] = None,
    top: Annotated[int, typer.Option(help="Features to list.")] = 10,
    model: ModelOpt = "default",
):
    """Rank a dictionary's features by how selectively they fire on a concept's texts."""
    from mechscope.dictionaries.find import find_features

    check_range("--top", top, 1, 1000)
    m = _load(model)
    found = find_features(m, _dictionary(dictionary, m), texts, vs or None, top=top)
    table = Table(title=literal(f"features of {dictionary} for the concept"), title_justify="left")
    for column in ("feature", "score", "coverage", "on the concept", "elsewhere"):
        table.add_column(column, justify="right")
    for f in found:
        table.add_row(str(f.feature), f"{f.score:.3f}", f"{f.coverage:.0%}", f"{f.concept:.3f}", f"{f.elsewhere:.3f}")
    console.print(table)


def _feature_spec(spec: str, option: str) -> tuple[str, int, float | None]:
    """DIR:F or DIR:F=VALUE."""
    left, _, value = spec.partition("=")
    folder, _, feature = left.rpartition(":")
    if not folder or not feature.lstrip("-").isdigit():
        raise MechscopeError(f"{option} {spec!r} is not valid: write DIR:FEATURE or DIR:FEATURE=VALUE, e.g. sae/dictionary:123=8")
    try:
        number = float(value) if value else None
    except ValueError:
        raise MechscopeError(f"{option} {spec!r} is not valid: {value!r} is not a number") from None
    return folder, int(feature), number


def steer(
    text: Annotated[str, typer.Argument(help="The prompt.")],
    feature: Annotated[
        list[str], typer.Option(help="DIR:F=COEF: add COEF x the feature's decoder direction (with --clamp: set it).")
    ] = None,
    ablate: Annotated[list[str], typer.Option(help="DIR:F: ablate the feature (its reconstruction error kept).")] = None,
    clamp: Annotated[bool, typer.Option(help="Clamp each --feature's activation to its value instead of adding.")] = False,
    pos: Annotated[
        list[int], typer.Option(help="Prompt positions to steer at (default: every position, new tokens too).")
    ] = None,
    generate: Annotated[int, typer.Option(help="New tokens to generate with and without.")] = 30,
    model: ModelOpt = "default",
):
    """Generate from TEXT with and without steering dictionary features, side by side."""
    from mechscope.attribution import generate as run_generate
    from mechscope.dictionaries.steer import FeatureSteer

    if not feature and not ablate:
        raise MechscopeError("no steering given: use --feature DIR:F=COEF (add, or set with --clamp) or --ablate DIR:F")
    check_range("--generate", generate, 1, 1000)
    specs = [(_feature_spec(s, "--feature"), "clamp" if clamp else "add") for s in feature or []]
    specs += [(_feature_spec(s, "--ablate"), "ablate") for s in ablate or []]
    for (folder, _, value), op in specs:
        if op != "ablate" and value is None:
            raise MechscopeError(f"--feature {folder}:... needs a value: write DIR:F=COEF")
    m = _load(model)
    check_range("--generate", generate, 1, m.n_ctx - m.to_ids(text).shape[1], " (the model's context, less the prompt)")
    loaded: dict[str, object] = {}
    steers = []
    for (folder, index, value), op in specs:
        d = loaded.setdefault(folder, _dictionary(folder, m))
        steers.append(FeatureSteer(d, index, op, value or 0.0, tuple(pos) if pos else None, name=folder))
    g = run_generate(m, text, steers, max_new_tokens=generate)
    console.print("steering: " + shown("; ".join(str(s) for s in steers)))
    table = Table(show_lines=True)
    table.add_column("without")
    table.add_column("with")
    table.add_row(literal(text + g.before), literal(text + g.after))
    console.print(table)


def _feature_index(db: Path | None, m, dictionary=None):
    """The index to read: --db, else the first index of the model's (its default one, then the others beside
    it, such as the demo's) that holds `dictionary`'s features, else the default one if it exists, else None."""
    from mechscope.index.build import default_index_path
    from mechscope.index.query import Index

    path = db or default_index_path(m.name)
    if db is None:
        found = _index_holding(dictionary, [path, *sorted(path.parent.glob(f"{m.name}-*.duckdb"))])
        path = found or path
        if not path.exists():
            return None
    index = Index(path, model=m, warn=False)
    if index.unfinished:
        Console(stderr=True).print(f"[yellow]note:[/] {shown(index.unfinished)}", highlight=False, soft_wrap=True)
    return index


def _index_holding(dictionary, paths: list[Path]) -> Path | None:
    """The first of `paths` that is a mechscope index holding `dictionary`'s features."""
    from contextlib import closing

    from mechscope.index import store
    from mechscope.index.features import indexed_features

    for path in paths if dictionary is not None else []:
        if not path.is_file() or store.stored_format(path) != store.FORMAT:
            continue
        with closing(store.open_index(path)) as con:
            if indexed_features(store.read_meta(con), dictionary):
                return path
    return None


def feature(
    folder: Annotated[str, typer.Argument(help="A dictionary folder (mechscope, SAELens or sparsify).")],
    number: Annotated[int, typer.Argument(metavar="F", help="The feature's number, 0..d_sae-1.")],
    db: Annotated[
        Path | None,
        typer.Option(
            help="An index built with `index build --dict DIR`. Default: the first of the model's indexes that holds "
            "the dictionary (the demo's too), else the model's index."
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", "-n", help="Top examples to show.")] = 20,
    near: Annotated[int, typer.Option(help="Nearest features to list.")] = 5,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained HTML page on the feature here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Write the feature's histogram as a PNG here (needs an index).")] = None,
    samples: Annotated[bool, typer.Option(help="Also show samples from each range of activation.")] = True,
    model: ModelOpt = "default",
):
    """A dictionary feature's page: logit effects, nearest features, and from an index its examples and histogram."""
    from mechscope.dictionaries.formats import load_any
    from mechscope.index.feature_card import feature_card
    from mechscope.index.features import check_feature, default_name
    from mechscope.viz import index_views as views

    check_range("-n", n, 1, MAX_K, " (top examples to show: at most the index's k, which is at most 1024)")
    check_range("--near", near, 1, 1000)
    html, png = check_html_png(html, png)
    m = _load(model)
    dictionary = load_any(folder, model=m)
    check_feature(dictionary, number, folder)
    index = _feature_index(db, m, dictionary)
    try:
        card = feature_card(m, dictionary, number, index, name=default_name(folder), n_near=near)
        examples = index.top(card.name, n) if card.unit is not None else []
        strata = index.samples(card.name) if card.unit is not None and samples else []
    except SettingError as err:
        raise MechscopeError(err.worded("-n")) from None
    finally:
        if index is not None:
            index.close()
    via = card.logits_via if card.promoted is None else f"logit effects via {card.logits_via}"
    console.print(f"[bold]feature {number}[/] of {shown(folder)} ({shown(card.name)}): {shown(via)}")
    if dictionary.n_write > 1 or not dictionary.cfg.reconstructs:  # where it reads and writes, beyond one site
        first = dictionary.written_sites(number)[0]  # a CLT feature's own layer; 0 otherwise
        reads = dictionary.cfg.read_sites[first] if dictionary.cfg.layered else ", ".join(dictionary.cfg.read_sites)
        writes = [dictionary.cfg.write_sites[i] for i in dictionary.written_sites(number)]
        console.print(shown(f"a {dictionary.cfg.kind} feature: reads {reads}; writes {', '.join(writes)}"))
    for table in views.feature_tables(card):
        console.print(table)
    if card.unit is None:
        console.print(shown(card.note))
    else:
        for part in views.examples_renderables(card.unit.histogram, examples, strata):
            console.print(part)
    if html:
        console.print(f"HTML page: {views.feature_page(html, card, examples, strata).resolve()}")
    if png and card.unit is not None:
        title = f"{card.name}: activation histogram"
        console.print(f"PNG: {views.histogram_png(card.unit.histogram, png, title).resolve()}")
    elif png:
        raise MechscopeError(f"no PNG written to {str(png)!r}: the histogram needs an index built with --dict")


def convert_dict(
    folders: Annotated[
        list[str],
        typer.Argument(
            help="A dictionary folder (mechscope, SAELens, sparsify or circuit-tracer); for --to circuit-tracer, "
            "one CLT or one transcoder per layer from 0."
        ),  # fmt: skip
    ],
    out: Annotated[Path, typer.Option(help="The folder to write (replaced atomically).")],
    to: Annotated[str, typer.Option(help="mechscope, saelens or circuit-tracer.")] = "mechscope",
    dtype: Annotated[str, typer.Option(help="Weights on disk (mechscope format): float32, bfloat16 or float16.")] = "float32",
    site: Annotated[str | None, typer.Option(help="The site an imported dictionary reads, where its files do not say.")] = None,
):
    """Convert a dictionary between formats (or to 16-bit weights); the feature activations stay the same."""
    from mechscope.dictionaries.formats import export_clt, export_saelens, export_transcoder_set, load_any, save_dictionary
    from mechscope.dictionaries.formats.own import read_config

    formats = ("mechscope", "saelens", "circuit-tracer")
    if to not in formats:
        raise MechscopeError(f"--to {to!r} is not a format: valid values are {', '.join(formats)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise MechscopeError(f"--dtype {dtype!r} is not a dtype: valid values are float32, bfloat16, float16")
    if to != "mechscope" and dtype != "float32":
        raise MechscopeError(f"--dtype applies to the mechscope format only: {to} folders are written in float32")
    if len(folders) > 1 and to != "circuit-tracer":
        raise MechscopeError(f"{len(folders)} folders given: only --to circuit-tracer takes several (a transcoder per layer)")
    for folder in folders:
        if Path(out).resolve() == Path(folder).resolve():
            raise MechscopeError(f"--out {shown(out)} is the folder being converted: give another folder")
    check_folder("--out", out)
    dictionaries = [load_any(folder, site=site) for folder in folders]
    dictionary = dictionaries[0]
    if to == "circuit-tracer" and len(dictionaries) == 1 and dictionary.cfg.layered:
        written = export_clt(dictionary, out)
    elif to == "circuit-tracer":
        written = export_transcoder_set(dictionaries, out)
    elif to == "saelens":
        written = export_saelens(dictionary, out)
    else:  # the training settings and final figures travel along
        folder = folders[0]
        training = read_config(folder).get("training") if (Path(folder) / "dictionary.safetensors").is_file() else None
        written = save_dictionary(dictionary, out, extra=training, dtype=dtype)
    what = (
        f"{len(dictionaries)} transcoders"
        if len(dictionaries) > 1
        else f"{dictionary.cfg.kind} ({dictionary.cfg.d_in} -> {dictionary.d_sae} latents)"
    )
    console.print(f"{to} {what}, {dtype}: {shown(written)}")


def register(app: typer.Typer) -> None:
    """Add the dictionary commands to `app`."""
    for fn, name in ((harvest, "harvest"), (train_dict, "train-dict"), (eval_dict, "eval-dict"),
                     (find_feature, "find-feature"), (steer, "steer"), (feature, "feature"),
                     (convert_dict, "convert-dict")):  # fmt: skip
        app.command(name=name)(fn)
