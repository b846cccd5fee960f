"""The `mechscope` command line: the same functions the Python API exposes.

Bad input prints one line naming the bad value and what is valid, and exits with status 2; no
command shows a traceback (set MECHSCOPE_DEBUG=1 to see one).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mechscope.cli_index import index_app
from mechscope.errors import MechscopeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="mechscope: look inside a language model. Every command runs on the embedded SmolLM2 unless --model says otherwise.",
)
app.add_typer(index_app, name="index")
console = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'default', a local HF folder, a .gguf file, or a hub id.")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
TargetOpt = Annotated[list[str], typer.Option("--target", "-t", help="A continuation to score; repeat for several.")]


def _load(model: str, dtype: str = "float32"):
    import mechscope

    return mechscope.load(model, dtype=dtype)


def _prediction_table(prediction) -> Table:
    table = Table(title="next-token distribution", title_justify="left")
    for column in ("rank", "token", "prob", "log-prob"):
        table.add_column(column, justify="left" if column == "token" else "right")
    for i, top in enumerate(prediction.top, 1):
        table.add_row(str(i), repr(top.token), f"{top.prob:.4f}", f"{top.logprob:.3f}")
    return table


def _targets_table(prediction) -> Table:
    table = Table(title="targets", title_justify="left")
    for column in ("target", "first token", "prob", "rank", "log-prob (all tokens)"):
        table.add_column(column, justify="left" if column in ("target", "first token") else "right")
    for t in prediction.targets:
        table.add_row(repr(t.target), repr(t.token), f"{t.prob:.4f}", str(t.rank), f"{t.full_logprob:.3f} ({t.n_tokens})")
    return table


@app.command()
def predict(
    text: str,
    target: TargetOpt = None,
    k: Annotated[int, typer.Option(help="How many top tokens to show.")] = 10,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """The next-token distribution after TEXT, and the probability and rank of each --target."""
    import mechscope

    m = _load(model, dtype)
    prediction = mechscope.predict(m, text, k=k, targets=target or [])
    if as_json:
        print(json.dumps({key: _jsonable(value) for key, value in prediction._asdict().items()}, indent=2))
        return
    console.print(f"[bold]{m.name}[/] · {len(prediction.tokens)} tokens: {prediction.tokens}")
    console.print(_prediction_table(prediction))
    if prediction.targets:
        console.print(_targets_table(prediction))


@app.command()
def lens(
    text: str,
    target: TargetOpt,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained HTML heatmap here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Write a PNG heatmap here.")] = None,
    k: Annotated[int, typer.Option(help="Top tokens kept per cell (shown on hover in the HTML).")] = 5,
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

    m = _load(model, dtype)
    result = mechscope.logit_lens(m, text, target, k=k, mid=mid, positions=pos or None)
    for t in range(len(result.targets)):
        console.print(viz.lens_table(result, t))
    if html:
        sections = [(f"P({t!r})", viz.lens_figure(result, i)) for i, t in enumerate(result.targets)]
        console.print(f"HTML report: {viz.write_report(html, f'Logit lens · {m.name} · {text!r}', sections).resolve()}")
    if png:
        console.print(f"PNG: {viz.lens_png(result, png).resolve()}")


@app.command()
def attribute(
    text: str,
    target: Annotated[str, typer.Option("--target", "-t", help="The token whose logit is explained.")],
    vs: Annotated[str | None, typer.Option(help="Explain logit(target) - logit(vs) instead.")] = None,
    top: Annotated[int, typer.Option(help="How many heads and neurons to list.")] = 20,
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

    m = _load(model, dtype)
    if rankings:
        if vs is not None:
            raise MechscopeError("--rankings explains the target's log-probability: drop --vs")
        console.print(rankings_table(rank_units(m, text, target, top=top, baseline=baseline, position=pos)))
    a = direct_logit_attribution(m, text, target, vs=vs, position=pos)
    what = f"logit({target!r})" + (f" - logit({vs!r})" if vs is not None else "")
    table = Table(title=f"direct logit attribution of {what} at position {a.position}", title_justify="left")
    for column in ("unit", "kind", "contribution"):
        table.add_column(column, justify="right" if column == "contribution" else "left")
    for name, value in a.top(top):
        table.add_row(name, "neuron" if ":" in name else "head", f"{value:+.4f}")
    console.print(table)
    console.print(
        f"embeddings {a.embed:+.4f} · biases {a.biases:+.4f} · all heads {float(a.heads.sum()):+.4f} · "
        f"all neurons {float(a.neurons.sum()):+.4f} · sum {a.total:+.4f} = {what} {a.logit:+.4f}"
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
    k: Annotated[int, typer.Option(help="How many top tokens to compare.")] = 10,
    generate: Annotated[int, typer.Option(help="Also generate this many tokens greedily, with and without.")] = 0,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
):
    """Change neurons or heads and compare the next-token distribution (and generations) before and after."""
    from mechscope import attribution

    m = _load(model, dtype)
    interventions = attribution.from_options(
        m, set=set_ or (), scale=scale or (), add=add or (), ablate=ablate or (), mean_ablate=mean_ablate or (),
        positions=position or None,
    )  # fmt: skip
    result = attribution.intervene(m, text, interventions, k=k, targets=target or [])
    console.print("interventions: " + "; ".join(result.interventions))
    table = Table(title=f"next token before and after (KL {result.kl:.4f} nats)", title_justify="left")
    for column in ("token", "before", "after", "Δ prob", "Δ log-prob"):
        table.add_column(column, justify="left" if column == "token" else "right")
    target_ids = {d.id for d in result.targets}
    for d in [*result.targets, *(d for d in result.deltas if d.id not in target_ids)]:
        table.add_row(
            ("target " if d.id in target_ids else "") + repr(d.token),
            f"{d.prob_before:.4f}",
            f"{d.prob_after:.4f}",
            f"{d.delta_prob:+.4f}",
            f"{d.delta_logprob:+.3f}",
        )
    console.print(table)
    if generate:
        texts = attribution.generate(m, text, interventions, max_new_tokens=generate)
        console.print(f"[bold]without:[/] {escape(text + texts.before)}\n[bold]with:[/]    {escape(text + texts.after)}")


@app.command()
def neuron(
    unit: Annotated[str, typer.Argument(help="A neuron L:N or a head L.H.")],
    texts: Annotated[list[str], typer.Argument(help="One or more texts.")],
    html: Annotated[Path | None, typer.Option(help="Write a self-contained HTML heatmap here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Write a PNG heatmap here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the values as JSON.")] = False,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
):
    """A neuron's activation (or a head's output norm) over the tokens of each text, as a heatmap with statistics."""
    from mechscope import viz
    from mechscope.attribution import unit_activations
    from mechscope.attribution.activations import as_list

    m = _load(model, dtype)
    values = as_list(unit_activations(m, list(texts), unit))
    if as_json:
        print(json.dumps([v.stats() | {"tokens": v.tokens, "values": v.values.tolist()} for v in values], indent=2))
        return
    console.print(viz.token_heatmap_text(values))
    console.print(viz.token_stats_table(values, title=values[0].label))
    if html:
        report = viz.write_report(html, values[0].label, [(values[0].label, viz.token_heatmap_html(values))])
        console.print(f"HTML report: {report.resolve()}")
    if png:
        console.print(f"PNG: {viz.token_heatmap_png(values, png, title=values[0].label).resolve()}")


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

    m = _load(model, dtype)
    kinds = kind or list(attr.patching.KINDS)
    results = attr.activation_patching(m, clean, corrupt, target, vs=vs, kinds=kinds)
    estimates = attr.attribution_patching(m, clean, corrupt, target, vs=vs, kinds=kinds) if attribution else {}
    sections = []
    for name, result in results.items():
        console.print(f"metric {result.metric}: clean {result.clean:.4f}, corrupted {result.corrupt:.4f}")
        title = f"{name}: share of the metric restored by patching each cell"
        console.print(viz.grid_table(title, [str(layer) for layer in result.layers], result.col_labels, result.grid))
        sections.append((title, viz.patching_figure(result)))
        if name in estimates:
            console.print(
                f"attribution patching vs activation patching on {name}: r = {attr.compare(estimates[name], result):.3f}"
            )
            sections.append((f"{name}: attribution-patching estimate", viz.patching_figure(estimates[name])))
    if html:
        console.print(
            f"HTML report: {viz.write_report(html, f'Activation patching · {clean!r} vs {corrupt!r}', sections).resolve()}"
        )


@app.command()
def pattern(
    head: Annotated[str, typer.Argument(help="A head, L.H (e.g. 5.3).")],
    text: str,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained HTML heatmap here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Write a PNG heatmap here.")] = None,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "float32",
):
    """The attention pattern of one head over TEXT: for each query token, where it attends most."""
    from mechscope import viz
    from mechscope.attribution import attention_pattern, parse_unit

    m = _load(model, dtype)
    unit = parse_unit(head, m)
    if unit.kind != "head":
        raise MechscopeError(f"{head!r} is a neuron: give a head as LAYER.HEAD, e.g. 5.3")
    ap = attention_pattern(m, text, unit.layer, unit.index)
    table = Table(title=f"{ap.label}: strongest keys per query", title_justify="left")
    for column in ("query", "attends to (probability)"):
        table.add_column(column)
    for q, row in enumerate(ap.pattern):
        top = row.topk(min(3, q + 1))
        keys = ", ".join(f"{k}:{ap.tokens[k]!r} {p:.2f}" for p, k in zip(top.values.tolist(), top.indices.tolist(), strict=True))
        table.add_row(f"{q}:{ap.tokens[q]!r}", keys)
    console.print(table)
    if html:
        report = viz.write_report(html, ap.label, [(ap.label, viz.attention_pattern_figure(ap))])
        console.print(f"HTML report: {report.resolve()}")
    if png:
        console.print(f"PNG: {viz.attention_pattern_png(ap, png).resolve()}")


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
    table = Table(title=f"{m!r}: {len(shapes)} sites", title_justify="left")
    table.add_column("site")
    table.add_column("shape")
    for name, shape in shapes.items():
        table.add_row(name, "[" + ", ".join(map(str, shape)) + "]")
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
    m = _load(model, dtype)
    cache = m.run(text, read=site).cache
    tokens = m.to_str_tokens(m.to_ids(text)[0])
    table = Table(title=f"{m.name}: L2 norm of each site's value at each position", title_justify="left")
    table.add_column("site")
    table.add_column("shape")
    for p, token in enumerate(tokens):
        table.add_column(f"{p}:{token!r}"[:14], justify="right")
    for name, value in cache.items():
        norms = value[0].flatten(1).norm(dim=-1) if "pattern" not in name else value[0].transpose(0, 1).flatten(1).norm(dim=-1)
        table.add_row(name, str(list(value.shape)), *(f"{n:.2f}" for n in norms.tolist()))
    console.print(table)
    if out:
        from safetensors.torch import save_file

        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in cache.items()}, str(out), metadata={"model": m.name, "text": text})
        console.print(f"saved {len(cache)} tensors to {out.resolve()}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the HTML report and PNG.")] = Path("reports"),
    text: str = "The reliability of Wikipedia is very",
    target: str = " questionable",
):
    """The main job on the embedded model: prediction, logit lens, the units behind TARGET and what they do."""
    from mechscope.demo import run_demo

    run_demo(console, out, text, target)


def _jsonable(value):
    if hasattr(value, "_asdict"):
        return {k: _jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def main() -> None:
    """Entry point: run the app and turn any error into one line on stderr."""
    err = Console(stderr=True)
    try:
        app(standalone_mode=False)
    except MechscopeError as error:
        err.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    except Exception as error:  # a bug, or an input we did not foresee: still one line
        if os.environ.get("MECHSCOPE_DEBUG"):
            raise
        err.print(
            f"[red]error:[/] {type(error).__name__}: {escape(str(error))} (set MECHSCOPE_DEBUG=1 for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
