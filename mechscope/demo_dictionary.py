"""The demo's dictionary section: a sparse autoencoder on SmolLM2's middle residual stream, used end to end.

The SAE ships with mechscope (`mechscope/assets/sae-smollm2-l15`, float16 weights; `mechscope/assets/README.md`
gives the commands that reproduce it). On the embedded model the section shows:

1. its FVU, L0 and CE-loss recovered on held-out text;
2. the features that fire most on the prompt's last token, each with its page: logit effects, nearest
   features by decoder cosine, and top examples from an index of every feature over the built-in corpus
   (a small one is built first, in well under a minute, if there is none yet);
3. a feature found for a concept, from a few texts that mention it and a few that do not;
4. a steering example: text generated with and without that feature added, side by side.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mechscope.attribution import generate
from mechscope.dictionaries import load_dictionary
from mechscope.dictionaries.evaluate import evaluate_dictionary
from mechscope.dictionaries.find import find_features
from mechscope.dictionaries.steer import FeatureSteer
from mechscope.index import store
from mechscope.index.build import IndexSettings, build_index, default_index_path
from mechscope.index.feature_card import feature_card
from mechscope.index.features import indexed_features
from mechscope.index.query import Index
from mechscope.viz import index_views, table_html
from mechscope.viz.shown import plain, token_label

SAE_FOLDER = Path(__file__).parent / "assets" / "sae-smollm2-l15"
SAE_NAME = "sae-l15"
SITE = "blocks.15.hook_resid_post"
EVAL_TOKENS = 4096
INDEX_TOKENS = 16 * 8 * 128
TOP_FEATURES = 3
EXAMPLES = 5
CONCEPT = "errors and exceptions"
CONCEPT_TEXTS = (
    "If the file does not exist, the call raises an [[exception]].",
    "The program stopped with an [[error]] message.",
    "Handle the [[ValueError]] in an except clause.",
    "Le programme s'est arrêté à cause d'une [[erreur]].",
    "Something went wrong: the request [[failed]].",
)
OTHER_TEXTS = (
    "The garden was full of flowers in the spring.",
    "She poured a cup of tea and sat by the window.",
    "Return the sum of the numbers in the list.",
    "The train leaves the station at nine o'clock.",
)
STEER_PROMPT = "My favourite thing about the weekend is"
STEER_TOKENS = 24


def plain_table(title: str, header: list[str], rows: list[tuple]) -> Table:
    """A table whose title, headers and cells are shown as written (never read as markup)."""
    table = Table(title=plain(title), title_justify="left")
    for column in header:
        table.add_column(plain(column))
    for row in rows:
        table.add_row(*(plain(str(cell)) for cell in row))
    return table


def feature_index_path(model) -> Path:
    """Where the demo keeps its index of the SAE's features."""
    return default_index_path(model.name).with_name(f"{model.name}-{SAE_NAME}.duckdb")


def feature_index(model, sae, console: Console) -> Path:
    """An index of every feature of the demo's SAE over the built-in corpus: used when complete and of this SAE,
    else built anew."""
    path = feature_index_path(model)
    if path.exists():
        with closing(store.open_index(path)) as con:
            meta = store.read_meta(con)
        if meta.get("complete") and store.stored_format(path) == store.FORMAT and indexed_features(meta, sae):
            return path
        path.unlink()
    console.print(plain(f"no index of the demo SAE's features yet: building one ({INDEX_TOKENS:,} tokens) at {path}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return build_index(model, path, settings=IndexSettings(tokens=INDEX_TOKENS), dictionaries={SAE_NAME: sae})


def dictionary_sections(model, console: Console, text: str) -> list[tuple[str, str]]:
    """Run the section on `model` (the embedded SmolLM2) and `text` (the prompt); print it, return HTML sections."""
    sae = load_dictionary(SAE_FOLDER, model=model)
    sections: list[tuple[str, str]] = []
    console.print(
        Text("\n")
        + plain(f"a sparse autoencoder on {SITE}: {sae.d_sae:,} latents, {sae.cfg.activation}", "bold")
        + plain(f" ({SAE_FOLDER})")
    )

    quality = evaluate_dictionary(model, sae, tokens=EVAL_TOKENS)
    header = ["FVU", "L0", "CE recovered", "CE clean", "CE spliced", "KL (nats)", "dead"]
    row = (f"{quality.fvu:.3f}", f"{quality.l0:.1f}", f"{quality.ce_recovered:.1%}", f"{quality.ce_clean:.3f}",
           f"{quality.ce_spliced:.3f}", f"{quality.kl:.3f}", f"{quality.dead_fraction:.1%}")  # fmt: skip
    title = f"its quality on {quality.tokens:,} held-out tokens (the first {quality.skip} positions of each context left out)"
    console.print(plain_table(title, header, [row]))
    sections.append((title[0].upper() + title[1:], table_html(header, [row])))

    x = model.run(text, read=[SITE]).cache[SITE][0, -1]
    acts = sae.encode_dense(x.reshape(1, 1, -1).float()).reshape(-1)  # [F]
    top = acts.topk(TOP_FEATURES)
    last = token_label(model.to_str_tokens(model.to_ids(text))[-1])
    rows = [(int(f), f"{float(v):.3f}") for v, f in zip(top.values, top.indices, strict=True)]
    title = f"features that fire most on the prompt's last token {last}"
    console.print(plain_table(title, ["feature", "activation"], rows))
    sections.append((title[0].upper() + title[1:], table_html(["feature", "activation"], rows)))

    with Index(feature_index(model, sae, console), model=model) as index:
        for feature, _ in rows:
            card = feature_card(model, sae, feature, index, name=SAE_NAME)
            examples = index.top(card.name, EXAMPLES)
            console.print(Text("\n") + plain(f"feature {card.name}", "bold"))
            for table in index_views.feature_tables(card):
                console.print(table)
            console.print(index_views.examples_text(examples))
            for heading, body in index_views.unit_sections(card.unit, examples):
                if heading.startswith(("Statistics", "Top", "Output")):
                    sections.append((f"Feature {card.name}: {heading}", body))

    found = find_features(model, sae, list(CONCEPT_TEXTS), list(OTHER_TEXTS), top=5)
    rows = [(f.feature, f"{f.score:.3f}", f"{f.coverage:.0%}", f"{f.concept:.3f}", f"{f.elsewhere:.3f}") for f in found]
    header = ["feature", "score", "coverage", "on the concept", "elsewhere"]
    title = f"features for the concept {CONCEPT!r} ({len(CONCEPT_TEXTS)} texts that mention it, {len(OTHER_TEXTS)} that do not)"
    console.print(plain_table(title, header, rows))
    sections.append((title[0].upper() + title[1:], table_html(header, rows)))

    best = found[0]
    coefficient = round(4 * best.concept, 1)
    steer = FeatureSteer.add(sae, best.feature, coefficient, name=SAE_NAME)
    g = generate(model, STEER_PROMPT, [steer], max_new_tokens=STEER_TOKENS)
    table = Table(title=plain(f"steering: {steer}"), title_justify="left", show_lines=True)
    table.add_column("without")
    table.add_column("with")
    table.add_row(plain(STEER_PROMPT + g.before), plain(STEER_PROMPT + g.after))
    console.print(table)
    sections.append((f"Steering: {steer}", table_html(["without", "with"], [(STEER_PROMPT + g.before, STEER_PROMPT + g.after)])))
    return sections
