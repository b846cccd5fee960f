"""The main job, on the embedded model: from a prediction to the units behind it and what they do.

1. The next-token distribution for the prompt, and the target's probability and rank.
2. The logit lens of the target across every layer.
3. The heads and neurons whose direct contribution writes the target's logit, ranked three ways:
   direct logit attribution, attribution patching, and the real effect of ablating each.
4. For the top three that push it up: P(target) when each is zero-ablated and when it is doubled.
5. The top neuron's activation over a few texts, as a token heatmap.
6. The top examples of the neurons behind the target, from the max-activating index of every neuron
   over the built-in corpus (a small one is built first, in about a minute, if there is none yet).
7. A sparse autoencoder on layer 15's residual stream, shipped with mechscope: its quality, the features
   behind the prompt's last token with their pages, a feature found for a concept, and steering with
   it (`mechscope.demo_dictionary`).

Everything is printed and collected in one light self-contained HTML report (no plotly.js). Text from
the prompt, the target and the corpus is shown as written (never read as markup).
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from contextlib import closing
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.text import Text

import mechscope
from mechscope import viz
from mechscope.attribution import (
    Intervention,
    direct_logit_attribution,
    intervene,
    neuron_activations,
    rank_units,
    rankings_table,
)
from mechscope.demo_dictionary import SAE_FOLDER, dictionary_sections, feature_index_path, plain_table
from mechscope.errors import MechscopeError
from mechscope.index import store
from mechscope.index.build import IndexSettings, build_index, default_index_path
from mechscope.index.query import Index
from mechscope.viz import index_views
from mechscope.viz.shown import plain, token_label

HEATMAP_TEXTS = (
    "The reliability of Wikipedia is very questionable.",
    "Critics say the evidence is weak and the claims are doubtful.",
    "The bridge is strong and the results are reliable.",
)


DEMO_TOKENS = 16 * 8 * 128  # 16 batches: about 40 s on two cores
INDEX_EXAMPLES = 6


def demo_index(model, console: Console) -> Path:
    """The model's default index: used as it is when complete, finished when interrupted, else built small."""
    path = default_index_path(model.name)
    settings = IndexSettings(tokens=DEMO_TOKENS)
    if path.exists() and store.stored_format(path) != store.FORMAT:  # from an older mechscope: keep it aside
        path.replace(path.with_name(path.name + ".old"))
        console.print(plain(f"the index at {path} has an older format: moved it to {path.name}.old"))
    if path.exists():
        with closing(store.open_index(path)) as con:
            meta = store.read_meta(con)
        if meta["complete"]:
            return path
        settings = IndexSettings(contexts=tuple(meta["contexts"]))  # finish the build that was interrupted
    else:
        console.print(plain(f"no index of {model.name}'s neurons yet: building a small one ({DEMO_TOKENS:,} tokens) at {path}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return build_index(model, path, settings=settings)


def index_sections(model, console: Console, neurons: list[str]) -> list[tuple[str, str]]:
    """Top examples of each neuron from the index, printed and as HTML sections."""
    sections = []
    with Index(demo_index(model, console), model=model) as index:
        seen = index.describe().get("tokens_seen", 0)
        for name in neurons:
            try:
                examples = index.top(name, INDEX_EXAMPLES)
            except MechscopeError as err:  # an index the user built over other sites
                console.print(plain(str(err), "yellow"))
                continue
            stats = index.stats(name)
            title = (
                f"Neuron {name}: top {len(examples)} of {seen:,} corpus tokens (max {stats.max:.3f}, density {stats.density:.3f})"
            )
            console.print(Text("\n") + plain(title, "bold"))
            console.print(index_views.examples_text(examples))
            sections.append((title, index_views.examples_html(examples)))
    return sections


def run_demo(console: Console, out: Path, text: str, target: str) -> Path:
    start = time.perf_counter()
    model = mechscope.load()
    console.print(f"loaded [bold]{escape(repr(model))}[/] in {time.perf_counter() - start:.1f} s")

    prediction = mechscope.predict(model, text, k=10, targets=[target])
    score = prediction.targets[0]
    top_rows = [(token_label(t.token), f"{t.prob:.4f}", f"{t.logprob:.3f}") for t in prediction.top]
    console.print(plain(f"prompt: {text!r} -> tokens [{', '.join(map(token_label, prediction.tokens))}]"))
    console.print(plain_table("next-token distribution", ["token", "prob", "log-prob"], top_rows))
    console.print(plain(f"P({target!r}) = {score.prob:.4f}, rank {score.rank}"))

    lens = mechscope.logit_lens(model, text, [target], k=5)
    console.print(viz.lens_table(lens))

    attribution = direct_logit_attribution(model, text, target)
    units = [(name, "neuron" if ":" in name else "head", f"{value:+.4f}") for name, value in attribution.top(10)]
    console.print(
        plain_table(f"top 10 heads (L.H) and neurons (L:N) writing logit({target!r})", ["unit", "kind", "direct"], units)
    )

    rankings = rank_units(model, text, target, top=10)
    console.print(rankings_table(rankings))
    ranking_rows = [(r.unit, r.kind, f"{r.dla:+.3f}", f"{r.attribution:+.3f}", f"{r.real_effect:+.3f}") for r in rankings.rows]

    pushers = [name for name, value in attribution.top(200) if value > 0][:3]
    effects = []
    for name in pushers:
        ablated = intervene(model, text, [Intervention.zero([name])], targets=[target]).targets[0]
        doubled = intervene(model, text, [Intervention.scale([name], 2.0)], targets=[target]).targets[0]
        effects.append((name, f"{score.prob:.4f}", f"{ablated.prob_after:.4f}", f"{doubled.prob_after:.4f}"))
    header = ["unit", f"P({target!r})", "zero-ablated", "doubled"]
    console.print(plain_table("what the top three units do", header, effects))

    neurons = [name for name, value in attribution.top(200) if value > 0 and ":" in name][:3]
    top_neuron = neurons[0] if neurons else "29:288"
    layer, index = map(int, top_neuron.split(":"))
    values = [neuron_activations(model, t, layer, index) for t in HEATMAP_TEXTS]
    console.print(viz.token_heatmap_text(values))
    console.print(viz.token_stats_table(values, title=values[0].label))

    console.print(Text("\n") + plain(f"where the neurons behind {target!r} fire most", "bold") + Text(" (max-activating index)"))
    examples = index_sections(model, console, neurons)
    dictionary = dictionary_sections(model, console, text)

    report = viz.write_report(
        out / "demo.html",
        f"mechscope demo · {model.name} · {text!r}",
        [
            ("Next-token distribution", viz.table_html(["token", "prob", "log-prob"], top_rows)),
            (f"Logit lens of {target!r}", viz.lens_html(lens)),
            (
                f"Direct logit attribution of {target!r} (logit {attribution.logit:.3f})",
                viz.table_html(["unit", "kind", "direct"], units),
            ),
            (
                "Three rankings: DLA (logit), attribution patching and the real effect of zero-ablation (log-prob)",
                viz.table_html(["unit", "kind", "DLA", "attribution", "real effect"], ranking_rows),
            ),
            ("What the top three units do", viz.table_html(header, effects)),
            (f"Neuron {top_neuron} over a few texts", viz.token_heatmap_html(values)),
            *examples,
            *dictionary,
        ],
    )
    png = viz.lens_png(lens, out / "demo-lens.png")
    console.print(Text("HTML report: ") + plain(str(report.resolve()), "bold") + plain(f"\nPNG: {png.resolve()}"))
    console.print(Text("\nexplore it in the browser: ") + plain(explorer_command(model), "bold"), soft_wrap=True)
    return report


def explorer_command(model) -> str:
    """The one command that opens the web explorer on what the demo built: the model's neuron index, the SAE
    and the index of its features (`mechscope serve`)."""
    venv = Path(sys.executable).parent / "mechscope"
    exe = venv if venv.exists() else Path("mechscope")
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(Path.cwd())
    parts = [str(exe), "serve", "--db", str(default_index_path(model.name)), "--db", str(feature_index_path(model)),
             "--dict", str(SAE_FOLDER), "--open"]  # fmt: skip
    return shlex.join(parts)
