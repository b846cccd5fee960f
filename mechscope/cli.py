"""The `mechscope` command line: the same functions the Python API exposes.

Exit codes (see `mechscope.errors`): 0 ok, 2 bad input, 1 internal failure. Bad input (a bad value,
an option that does not parse, an output path that cannot be written) is one line naming the option,
the value and what is valid, printed before any work starts; an internal failure is one line too
(set MECHSCOPE_DEBUG=1 for its traceback). Text from the user, the model or a corpus is shown
literally: never read as markup, control characters shown as escapes (`mechscope.cli_common`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mechscope.cli_common import (
    atomic_output,
    check_folder,
    check_html_png,
    check_output,
    check_positions,
    check_range,
    error_line,
    literal,
    shown,
    usage_line,
)
from mechscope.cli_dict import register as register_dictionary_commands
from mechscope.cli_index import index_app
from mechscope.cli_poly import register as register_polysemanticity_commands
from mechscope.cli_serve import register as register_serve_command
from mechscope.cli_tiny import register as register_tiny_commands
from mechscope.cli_toys import register as register_toy_commands
from mechscope.errors import MechscopeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="mechscope: look inside a language model. Every command runs on the embedded SmolLM2 unless --model says otherwise.",
)
app.add_typer(index_app, name="index")
register_dictionary_commands(app)
register_toy_commands(app)
register_tiny_commands(app)
register_polysemanticity_commands(app)
register_serve_command(app)
console = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'default', a local HF folder, a .gguf file, or a hub id.")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
TargetOpt = Annotated[list[str], typer.Option("--target", "-t", help="A continuation to score; repeat for several.")]
HtmlOpt = Annotated[Path | None, typer.Option(help="Write a self-contained HTML heatmap here.")]
PngOpt = Annotated[Path | None, typer.Option(help="Write a PNG heatmap here (a .png file).")]

MAX_K = 1000
"""The most top tokens `predict` and `intervene` list (and at most the vocabulary)."""
MAX_LENS_K = 50
"""The most top tokens the lens keeps per cell."""
MAX_TOP = 1000
"""The most units `attribute` lists (and at most the model's heads and neurons)."""


def _load(model: str, dtype: str = "float32"):
    import mechscope

    return mechscope.load(model, dtype=dtype)


def _n_tokens(m, text: str) -> int:
    return m.to_ids(text).shape[1]


def _check_k(option: str, k: int, m, high: int = MAX_K) -> int:
    """k within 1..high, and within the vocabulary once the model `m` is loaded."""
    if m is not None and m.config.vocab_size < high:
        return check_range(option, k, 1, m.config.vocab_size, f" (the model's vocabulary has {m.config.vocab_size} tokens)")
    return check_range(option, k, 1, high)


def _written(label: str, path: Path, write) -> None:
    """Write `path` atomically (`write(tmp)` fills a temporary file beside it), then say where."""
    with atomic_output(path) as tmp:
        write(tmp)
    console.print(f"{label}: {shown(path.resolve())}")


def _prediction_table(prediction) -> Table:
    table = Table(title="next-token distribution", title_justify="left")
    for column in ("rank", "token", "prob", "log-prob"):
        table.add_column(column, justify="left" if column == "token" else "right")
    for i, top in enumerate(prediction.top, 1):
        table.add_row(str(i), literal(repr(top.token)), f"{top.prob:.4f}", f"{top.logprob:.3f}")
    return table


def _targets_table(prediction) -> Table:
    table = Table(title="targets", title_justify="left")
    for column in ("target", "first token", "prob", "rank", "log-prob (all tokens)"):
        table.add_column(column, justify="left" if column in ("target", "first token") else "right")
    for t in prediction.targets:
        table.add_row(
            literal(repr(t.target)), literal(repr(t.token)), f"{t.prob:.4f}", str(t.rank), f"{t.full_logprob:.3f} ({t.n_tokens})"
        )
    return table


@app.command()
def predict(
    text: str,
    target: TargetOpt = None,
    k: Annotated[int, typer.Option(help=f"How many top tokens to show, 1..{MAX_K}.")] = 10,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """The next-token distribution after TEXT, and the probability and rank of each --target."""
    import mechscope

    _check_k("--k", k, None)
    m = _load(model, dtype)
    _check_k("--k", k, m)
    prediction = mechscope.predict(m, text, k=k, targets=target or [])
    if as_json:
        print(json.dumps({key: _jsonable(value) for key, value in prediction._asdict().items()}, indent=2))
        return
    console.print(f"[bold]{shown(m.name)}[/] · {len(prediction.tokens)} tokens: {shown(prediction.tokens)}")
    console.print(_prediction_table(prediction))
    if prediction.targets:
        console.print(_targets_table(prediction))


@app.command()
def lens(
    text: str,
    target: TargetOpt,
    html: HtmlOpt = None,
    png: PngOpt = None,
    k: Annotated[int, typer.Option(help=f"Top tokens kept per cell (shown on hover in the HTML), 1..{MAX_LENS_K}.")] = 5,
    mid: Annotated[bool, typer.Option(help="Also unembed the residual stream between attention and MLP.")] = False,
    pos: Annotated[
        list[int], typer.Option(help="Positions to show (negative counts from the end); repeat. Default: all.")
    ] = None,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
):
    """Logit lens: P(--target) after every layer at every position of TEXT, as a heatmap."""
    import mechscope
    from mechscope import viz

    _check_k("--k", k, None, MAX_LENS_K)
    html, png = check_html_png(html, png)
    m = _load(model, dtype)
    _check_k("--k", k, m, MAX_LENS_K)
    check_positions("--pos", pos or [], _n_tokens(m, text))
    result = mechscope.logit_lens(m, text, target, k=k, mid=mid, positions=pos or None)
    for t in range(len(result.targets)):
        console.print(viz.lens_table(result, t))
    if html:
        sections = [(f"P({t!r})", viz.lens_html(result, i)) for i, t in enumerate(result.targets)]
        _written("HTML report", html, lambda tmp: viz.write_report(tmp, f"Logit lens · {m.name} · {text!r}", sections))
    if png:
        _written("PNG", png, lambda tmp: viz.lens_png(result, tmp))


@app.command()
def attribute(
    text: str,
    target: Annotated[str, typer.Option("--target", "-t", help="The token whose logit is explained.")],
    vs: Annotated[str | None, typer.Option(help="Explain logit(target) - logit(vs) instead.")] = None,
    top: Annotated[int, typer.Option(help=f"How many heads and neurons to list, 1..{MAX_TOP}.")] = 20,
    pos: Annotated[int, typer.Option(help="Position whose next-token logit is explained.")] = -1,
    rankings: Annotated[
        bool, typer.Option(help="Also rank units by attribution patching and by the real effect of ablating them.")
    ] = False,
    baseline: Annotated[str, typer.Option(help="Ablation for --rankings: zero or mean.")] = "zero",
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
):
    """Direct logit attribution: which heads (L.H) and neurons (L:N) write the target's logit."""
    from mechscope.attribution import direct_logit_attribution, rank_units, rankings_table

    check_range("--top", top, 1, MAX_TOP)
    if rankings and vs is not None:
        raise MechscopeError("--rankings explains the target's log-probability: drop --vs")
    m = _load(model, dtype)
    d = m.dims
    n_units = d.n_layers * (d.n_heads + d.d_mlp)
    if n_units < MAX_TOP:
        check_range("--top", top, 1, n_units, f" (the model has {n_units} heads and neurons)")
    check_positions("--pos", [pos], _n_tokens(m, text))
    if rankings:
        console.print(rankings_table(rank_units(m, text, target, top=top, baseline=baseline, position=pos)))
    a = direct_logit_attribution(m, text, target, vs=vs, position=pos)
    what = f"logit({target!r})" + (f" - logit({vs!r})" if vs is not None else "")
    table = Table(title=literal(f"direct logit attribution of {what} at position {a.position}"), title_justify="left")
    for column in ("unit", "kind", "contribution"):
        table.add_column(column, justify="right" if column == "contribution" else "left")
    for name, value in a.top(top):
        table.add_row(name, "neuron" if ":" in name else "head", f"{value:+.4f}")
    console.print(table)
    console.print(
        f"embeddings {a.embed:+.4f} · biases {a.biases:+.4f} · all heads {float(a.heads.sum()):+.4f} · "
        f"all neurons {float(a.neurons.sum()):+.4f} · sum {a.total:+.4f} = {shown(what)} {a.logit:+.4f}"
        " (final norm scale frozen at the clean run)"
    )


@app.command()
def intervene(
    text: str,
    set_: Annotated[list[str], typer.Option("--set", help="Set a unit: L:N=V (neuron) or L.H=V (head); repeat.")] = None,
    scale: Annotated[list[str], typer.Option(help="Scale a unit: L:N=F; repeat.")] = None,
    add: Annotated[list[str], typer.Option(help="Add to a unit: L:N=V; repeat.")] = None,
    ablate: Annotated[list[str], typer.Option(help="Zero-ablate a unit: L:N or L.H; repeat.")] = None,
    mean_ablate: Annotated[list[str], typer.Option(help="Mean-ablate a unit (mean over the prompt); repeat.")] = None,
    position: Annotated[list[int], typer.Option(help="Only at these prompt positions; repeat. Default: all.")] = None,
    target: TargetOpt = None,
    k: Annotated[int, typer.Option(help=f"How many top tokens to compare, 1..{MAX_K}.")] = 10,
    generate: Annotated[
        int, typer.Option(help="Also generate this many tokens greedily, with and without (up to the context's room).")
    ] = 0,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
):
    """Change neurons or heads and compare the next-token distribution (and generations) before and after."""
    from mechscope import attribution

    _check_k("--k", k, None)
    if generate < 0:
        raise MechscopeError(f"--generate {generate} is out of range: give 0 (no generation) or a number of new tokens")
    m = _load(model, dtype)
    _check_k("--k", k, m)
    n_prompt = _n_tokens(m, text)
    check_positions("--position", position or [], n_prompt)
    room = m.n_ctx - n_prompt
    why = f" (the model's context of {m.n_ctx} tokens minus the prompt's {n_prompt})"
    check_range("--generate", generate, 0, room, why)
    interventions = attribution.from_options(
        m, set=set_ or (), scale=scale or (), add=add or (), ablate=ablate or (), mean_ablate=mean_ablate or (),
        positions=position or None,
    )  # fmt: skip
    result = attribution.intervene(m, text, interventions, k=k, targets=target or [])
    console.print("interventions: " + shown("; ".join(result.interventions)))
    table = Table(title=f"next token before and after (KL {result.kl:.4f} nats)", title_justify="left")
    for column in ("token", "before", "after", "Δ prob", "Δ log-prob"):
        table.add_column(column, justify="left" if column == "token" else "right")
    target_ids = {d.id for d in result.targets}
    for d in [*result.targets, *(d for d in result.deltas if d.id not in target_ids)]:
        table.add_row(
            literal(("target " if d.id in target_ids else "") + repr(d.token)),
            f"{d.prob_before:.4f}",
            f"{d.prob_after:.4f}",
            f"{d.delta_prob:+.4f}",
            f"{d.delta_logprob:+.3f}",
        )
    console.print(table)
    if generate:
        texts = attribution.generate(m, text, interventions, max_new_tokens=generate)
        console.print(f"[bold]without:[/] {shown(text + texts.before)}\n[bold]with:[/]    {shown(text + texts.after)}")


@app.command()
def neuron(
    unit: Annotated[str, typer.Argument(help="A neuron L:N or a head L.H.")],
    texts: Annotated[list[str], typer.Argument(help="One or more texts.")],
    html: HtmlOpt = None,
    png: PngOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the values as JSON.")] = False,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
):
    """A neuron's activation (or a head's output norm) over the tokens of each text, as a heatmap with statistics."""
    from mechscope import viz
    from mechscope.attribution import unit_activations
    from mechscope.attribution.activations import as_list

    html, png = check_html_png(html, png)
    m = _load(model, dtype)
    values = as_list(unit_activations(m, list(texts), unit))
    if as_json:
        print(json.dumps([v.stats() | {"tokens": v.tokens, "values": v.values.tolist()} for v in values], indent=2))
        return
    label = values[0].label
    console.print(viz.token_heatmap_text(values))
    console.print(viz.token_stats_table(values, title=label))
    if html:
        _written("HTML report", html, lambda tmp: viz.write_report(tmp, label, [(label, viz.token_heatmap_html(values))]))
    if png:
        _written("PNG", png, lambda tmp: viz.token_heatmap_png(values, tmp, title=label))


@app.command()
def patch(
    clean: Annotated[str, typer.Option(help="The clean prompt.")],
    corrupt: Annotated[str, typer.Option(help="The corrupted prompt (same number of tokens).")],
    target: Annotated[str, typer.Option("--target", "-t", help="The token the metric is about.")],
    vs: Annotated[str | None, typer.Option(help="Metric: logit(target) - logit(vs); without it, P(target).")] = None,
    kind: Annotated[list[str], typer.Option(help="Grids: hook_resid_pre, hook_attn_out, hook_mlp_out, attn.hook_z.")] = None,
    attribution: Annotated[bool, typer.Option(help="Also run attribution patching and report its correlation.")] = False,
    html: Annotated[Path | None, typer.Option(help="Write the grids as an HTML report here.")] = None,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
):
    """Activation patching: patch each clean activation into the corrupted run and see how much of the metric returns."""
    from mechscope import attribution as attr
    from mechscope import viz

    html = check_output("--html", html)
    m = _load(model, dtype)
    kinds = kind or list(attr.patching.KINDS)
    results = attr.activation_patching(m, clean, corrupt, target, vs=vs, kinds=kinds)
    estimates = attr.attribution_patching(m, clean, corrupt, target, vs=vs, kinds=kinds) if attribution else {}
    sections = []
    metric = f"logit({target!r}) - logit({vs!r})" if vs is not None else f"P({target!r})"
    for name, result in results.items():
        console.print(f"metric {shown(metric)}: clean {result.clean:.4f}, corrupted {result.corrupt:.4f}")
        title = f"{name}: share of the metric restored by patching each cell"
        console.print(viz.grid_table(title, [str(layer) for layer in result.layers], result.col_labels, result.grid))
        sections.append((title, viz.patching_html(result)))
        if name in estimates:
            console.print(
                f"attribution patching vs activation patching on {name}: r = {attr.compare(estimates[name], result):.3f}"
            )
            sections.append((f"{name}: attribution-patching estimate", viz.patching_html(estimates[name])))
    if html:
        title = f"Activation patching · {clean!r} vs {corrupt!r}"
        _written("HTML report", html, lambda tmp: viz.write_report(tmp, title, sections))


@app.command()
def pattern(
    head: Annotated[str, typer.Argument(help="A head, L.H (e.g. 5.3).")],
    text: str,
    html: HtmlOpt = None,
    png: PngOpt = None,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
):
    """The attention pattern of one head over TEXT: for each query token, where it attends most."""
    from mechscope import viz
    from mechscope.attribution import attention_pattern, parse_unit

    html, png = check_html_png(html, png)
    m = _load(model, dtype)
    unit = parse_unit(head, m)
    if unit.kind != "head":
        raise MechscopeError(f"{head!r} is a neuron: give a head as LAYER.HEAD, e.g. 5.3")
    ap = attention_pattern(m, text, unit.layer, unit.index)
    table = Table(title=literal(f"{ap.label}: strongest keys per query"), title_justify="left")
    for column in ("query", "attends to (probability)"):
        table.add_column(column)
    for q, row in enumerate(ap.pattern):
        top = row.topk(min(3, q + 1))
        keys = ", ".join(f"{k}:{ap.tokens[k]!r} {p:.2f}" for p, k in zip(top.values.tolist(), top.indices.tolist(), strict=True))
        table.add_row(literal(f"{q}:{ap.tokens[q]!r}"), literal(keys))
    console.print(table)
    if html:
        _written("HTML report", html, lambda tmp: viz.write_report(tmp, ap.label, [(ap.label, viz.attention_pattern_html(ap))]))
    if png:
        _written("PNG", png, lambda tmp: viz.attention_pattern_png(ap, tmp))


@app.command()
def sites(
    model: ModelOpt = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """List every site of a model with its shape, in forward order."""
    m = _load(model)
    shapes = {name: list(m.shape(name)) for name in m.site_names()}
    if as_json:
        print(json.dumps(shapes, indent=2))
        return
    table = Table(title=literal(f"{m!r}: {len(shapes)} sites"), title_justify="left")
    table.add_column("site")
    table.add_column("shape")
    for name, shape in shapes.items():
        table.add_row(literal(name), literal("[" + ", ".join(map(str, shape)) + "]"))
    console.print(table)


@app.command()
def read(
    text: str,
    site: Annotated[list[str], typer.Option("--site", "-s", help="A site name, e.g. blocks.3.hook_resid_post; repeat.")],
    out: Annotated[Path | None, typer.Option(help="Save the activations to this .safetensors file.")] = None,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
):
    """Read sites on TEXT: shape and per-position norm of each, optionally saved as safetensors."""
    out = check_output("--out", out)
    m = _load(model, dtype)
    cache = m.run(text, read=site).cache
    tokens = m.to_str_tokens(m.to_ids(text)[0])
    table = Table(title=literal(f"{m.name}: L2 norm of each site's value at each position"), title_justify="left")
    table.add_column("site")
    table.add_column("shape")
    for p, token in enumerate(tokens):
        table.add_column(literal(f"{p}:{token!r}"[:14]), justify="right")
    for name, value in cache.items():
        norms = value[0].flatten(1).norm(dim=-1) if "pattern" not in name else value[0].transpose(0, 1).flatten(1).norm(dim=-1)
        table.add_row(literal(name), literal(str(list(value.shape))), *(f"{n:.2f}" for n in norms.tolist()))
    console.print(table)
    if out:
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in cache.items()}
        with atomic_output(out) as tmp:
            save_file(tensors, str(tmp), metadata={"model": m.name, "text": text})
        console.print(f"saved {len(cache)} tensors to {shown(out.resolve())}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the HTML report and PNG.")] = Path("reports"),
    text: str = "The reliability of Wikipedia is very",
    target: str = " questionable",
):
    """The main job on the embedded model: prediction, logit lens, the units behind TARGET and what they do."""
    from mechscope.demo import run_demo

    check_folder("--out", out)
    run_demo(console, out, text, target)


def _jsonable(value):
    if hasattr(value, "_asdict"):
        return {k: _jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _usage_error(error: BaseException) -> bool:
    """An option-parsing error from click (or the copy of click that typer carries)."""
    return any(cls.__name__ == "ClickException" for cls in type(error).__mro__)


def main() -> None:
    """Entry point: run the app; bad input exits 2 and an internal failure exits 1, each with one line on stderr."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    argv = sys.argv[1:]
    try:
        code = app(args=argv, prog_name="mechscope", standalone_mode=False)
    except MechscopeError as error:
        err.print(f"[red]error:[/] {shown(error_line(error))}")
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    except Exception as error:
        if _usage_error(error):
            if type(error).__name__ == "NoArgsIsHelpError":  # `mechscope` alone: the help, not an error
                print(error.format_message())
                sys.exit(0)
            err.print(f"[red]error:[/] {shown(error_line(usage_line(error, argv)))}")
            sys.exit(2)
        if os.environ.get("MECHSCOPE_DEBUG"):
            raise
        line = error_line(f"{type(error).__name__}: {error}")
        err.print(f"[red]internal error:[/] {shown(line)} (set MECHSCOPE_DEBUG=1 for the traceback)")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
