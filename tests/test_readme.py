"""The README is true: every command and Python example in README.md runs here, and the figures,
shapes and names its comments and prose state are checked against what the code returns or prints.

The examples are read from README.md itself (its ```python and ```bash blocks), so editing the README
in a way that breaks an example, or that states a figure the code does not give, fails here. What
differs from running the README by hand, all of it listed here:

- Long jobs run small. Each change is a text substitution (`SMALLER`, `SMALLER_ARGS`) that must find
  its text in the README, so none can silently go stale: the index builds read INDEX_TOKENS tokens
  (not 100,000), generations make GENERATED tokens, activation patching fills the one grid the
  example reads, the harvest stores 2,048 tokens in small shards, the dictionary trains on 2,048
  tokens of the docs with small chunks, and eval-dict reads 372 held-out tokens of the docs.
  Shapes, names and the units the examples ask for are the README's.
- Names the README leaves to the reader are given values (`placeholders`): `x` is the prompt's
  residual stream at layer 15, `direction` a fixed random direction, and `model.hf.generate(...)`
  generates two tokens (HF_GENERATE).
- Optional parts `[...]` of a command run, except those that name a placeholder (`FILE`, `DB`, `PATH`,
  ...); `a|b|c` runs once per choice. `index merge` gets two shards built here first.
- The index of every MLP neuron is built once (`neuron_index`: `build_index` with the README's settings,
  made smaller) and copied to where the README's builds write it ("neurons.duckdb", the default
  database), so that both of those builds resume a complete index instead of reading the corpus
  twice more.
- Commands run in-process on the session's SmolLM2, in a temporary folder, with `MECHSCOPE_CACHE`
  there: `index` commands without `--db` use the default database.

Figures are compared at the precision the README prints them: within one unit of the last digit shown.
"""

from __future__ import annotations

import ast
import io
import itertools
import json
import re
import shlex
import shutil
import time
import tokenize
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_cli import run_main

import mechscope
from mechscope import cli, cli_dict, cli_index

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
INDEX_TOKENS = 2048
"""Tokens of the test's index builds (16 contexts of 128): the README's build reads 100,000."""
GENERATED = 4
"""New tokens of the test's generations: the README's generate 20 and 30."""

HF_GENERATE = "model.to_ids(text), max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True"
"""What the README's `model.hf.generate(...)` is given: two tokens, with the logits of each step."""

SMALLER = {
    "IndexSettings(tokens=100_000)": f"IndexSettings(tokens={INDEX_TOKENS})",
    "k=64, tokens=5_000_000)": (
        'k=64, tokens=2_048, batch_size=1_024, chunk_contexts=16, eval_tokens=1_024, eval_every=1, corpus="builtin")'
    ),
    "max_new_tokens=20)": f"max_new_tokens={GENERATED})",
    'vs=" Rome")': 'vs=" Rome", kinds="hook_resid_pre")',
    "model.hf.generate(...)": f"model.hf.generate({HF_GENERATE})",
}
"""README Python text -> what the test runs instead: smaller sizes, the patching grid the example reads
(not all four), and the dictionary's text from the docs alone (`builtin`, not `builtin:all`: packing
3.4 M tokens of source code first would take most of this test's time)."""

SMALLER_ARGS = {
    "--tokens 100000": f"--tokens {INDEX_TOKENS}",
    "[--generate 30]": f"[--generate {GENERATED}]",
    '--vs " Rome" [--attribution]': '--vs " Rome" [--attribution] --kind hook_resid_pre',
    "--tokens 5000000": "--tokens 2048 --shard-contexts 4",
    "--k 64 [--store acts/]": "--k 64 [--store acts/] --tokens 2048 --batch-size 1024 --chunk-contexts 16 --eval-tokens 1024",
    "eval-dict sae/dictionary": "eval-dict sae/dictionary --tokens 256 --corpus builtin",
    "sae/dictionary:123=8 [--clamp]": f"sae/dictionary:123=8 [--clamp] --generate {GENERATED}",
}
"""README command text -> what the test runs instead: smaller sizes (steer generates GENERATED tokens,
not its default 30), one patching grid (of four), and eval-dict on the docs' held-out documents alone
(`builtin`, as above)."""

PROMPT = "The reliability of Wikipedia is very"
SEARCHED = " file"
"""The README's `index search` example: a token CPython's documentation has (about 20 times in the test's index)."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread while these tests run: on two cores shared with other jobs, two threads make
    each forward pass ~15x slower than one (they wait on each other); results agree to float rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def neuron_index(smollm2, tmp_path_factory) -> Path:
    """The README's index of every MLP neuron, over INDEX_TOKENS tokens of the built-in corpus."""
    from mechscope.index.build import IndexSettings, build_index

    path = tmp_path_factory.mktemp("readme") / "neurons.duckdb"
    return build_index(smollm2, path, settings=IndexSettings(tokens=INDEX_TOKENS), progress=False)


def readme_text() -> str:
    return README.read_text()


def blocks(language: str, text: str | None = None) -> list[str]:
    return [block for _, block in blocks_at(language, text)]


def blocks_at(language: str, text: str | None = None) -> list[tuple[int, str]]:
    """(line before the block's first line, its text) of each ```language block of `text` (the README's by default)."""
    text = readme_text() if text is None else text
    found = re.finditer(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)
    return [(text[: m.start(1)].count("\n"), m[1]) for m in found]


def smaller(text: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        text = text.replace(old, new)
    return text


def test_every_substitution_still_finds_its_text():
    python, bash = "\n".join(blocks("python")), "\n".join(blocks("bash"))
    assert [old for old in SMALLER if old not in python] == []
    assert [old for old in SMALLER_ARGS if old not in bash] == []


# -- figures as the README prints them ------------------------------------------------------------

NUMBER = r"[-+]?\d[\d_,]*(?:\.\d+)?"


def figures(text: str) -> list[str]:
    """The numbers in `text`, as written ('0.358', '+1.96', '9216')."""
    return re.findall(NUMBER, text)


def close(actual: float, shown: str) -> bool:
    """`actual` printed at the precision of `shown` is within one unit of its last digit."""
    plain = shown.replace(",", "").replace("_", "")
    decimals = len(plain.partition(".")[2])
    return abs(float(actual) - float(plain)) <= 10**-decimals * 1.0001


def shape_of(text: str) -> list[str]:
    """The first bracketed shape in `text`: '[1, 6, 576]' -> ['1', '6', '576']."""
    return [part.strip() for part in re.search(r"\[([^\]]*)\]", text).group(1).split(",")]


# -- running the Python blocks, and recording what each commented statement gives ----------------


def comments(source: str) -> dict[int, str]:
    """Line number -> the comment on that line."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string.lstrip("#").strip()
    return found


class Recorder(ast.NodeTransformer):
    """Wraps each commented expression statement (its value) and assignment (the assigned value) in
    `_seen(key, ...)`, which checks the first value each gives (the first pass of a loop) against the
    README's comment there, at once, while the names it reads still hold what the README means.

    `keys` gives each statement's key by line: its README text (before SMALLER) on one line, no comment.
    """

    def __init__(self, source: str, keys: dict[int, str] | None = None):
        self.source, self.notes, self.keys, self.found = source, comments(source), keys, {}

    def _wrap(self, node: ast.stmt, value: ast.expr) -> ast.expr:
        notes = [self.notes[n] for n in range(node.lineno, node.end_lineno + 1) if n in self.notes]
        if not notes:
            return value
        code = re.sub(r"#[^\n]*", "", ast.get_source_segment(self.source, node))  # no README string holds a '#'
        key = self.keys[node.lineno] if self.keys is not None else " ".join(code.split())
        self.found[node.lineno] = key
        call = ast.Call(ast.Name("_seen", ast.Load()), [ast.Constant(key), ast.Constant(" ".join(notes)), value], [])
        return ast.copy_location(call, value)

    def visit_Expr(self, node: ast.Expr) -> ast.Expr:
        node.value = self._wrap(node, node.value)
        return node

    def visit_Assign(self, node: ast.Assign) -> ast.Assign:
        node.value = self._wrap(node, node.value)
        return node


def commented_statements(source: str) -> dict[int, str]:
    """Line -> key of each commented statement of a README block."""
    recorder = Recorder(source)
    recorder.visit(ast.parse(source))
    return recorder.found


def run_python_block(source: str, namespace: dict, checked: dict[str, str], line: int = 0) -> None:
    """Run one README block (made SMALLER) in `namespace`, checking each commented statement's first
    value with its CLAIMS entry; `checked` collects key -> comment of the ones checked. Tracebacks
    name README.md and its line (`line`: the README line before the block)."""
    keys = commented_statements(source)
    runnable = smaller(source, SMALLER)
    tree = ast.increment_lineno(Recorder(runnable, keys).visit(ast.parse(runnable)), line)

    def _seen(key: str, note: str, value):
        if key not in checked:
            checked[key] = note
            claim = CLAIMS.get(key)
            assert claim is not None, f"README statement {key!r} (# {note}) has no check in CLAIMS"
            claim(value, note, namespace)
        return value

    namespace["_seen"] = _seen
    exec(compile(ast.fix_missing_locations(tree), str(README), "exec"), namespace)


# -- what each commented statement of the README claims -----------------------------------------
# Each check reads its figures from the README's comment (`note`), so a changed figure is checked too.


def _model(model, note, ns):
    assert "SmolLM2" in note and model.name.startswith("SmolLM2")


def _top_token(tp, note, ns):
    want = re.search(rf"token='(.*?)', id=(\d+), prob=({NUMBER}), logprob=({NUMBER})", note)
    assert (tp.token, tp.id) == (want[1], int(want[2])), tp
    assert close(tp.prob, want[3]) and close(tp.logprob, want[4]), tp


def _target(value, note, ns):
    (prob, rank), (shown_prob, shown_rank) = value, figures(note)
    assert close(prob, shown_prob) and rank == int(shown_rank), value


def _lens(probs, note, ns):
    (blocks,) = figures(note)  # "after the embeddings and each of the 30 blocks"
    assert ns["model"].dims.n_layers == int(blocks) and probs.shape == (int(blocks) + 1,)
    assert ((probs >= 0) & (probs <= 1)).all()


def _per_text(predictions, note, ns):
    assert [type(p).__name__ for p in predictions] == ["Prediction", "Prediction"]
    assert all(p.targets[0].token == " Paris" for p in predictions)


def _dla_top(top, note, ns):
    shown = re.findall(rf"\('([^']+)', ({NUMBER})\)", note)  # the first entries, then "..."
    assert len(shown) >= 2
    for (name, value), (want_name, want_value) in zip(top, shown, strict=False):
        assert name == want_name and close(value, want_value), (top[: len(shown)], shown)
    assert all(re.fullmatch(r"\d+:\d+|\d+\.\d+", name) for name, _ in top)  # neurons L:N, heads L.H


def _dla_shapes(value, note, ns):
    heads, neurons = value
    want = re.findall(r"\[(\d+), (\d+)\]", note)
    assert [list(heads.shape), list(neurons.shape)] == [[int(a), int(b)] for a, b in want]


def _dla_total(value, note, ns):
    total, logit = value
    assert abs(float(total) - float(logit)) < 1e-3 * max(1.0, abs(float(logit)))


def _ablated(value, note, ns):
    before, after = value
    shown_before, shown_after = figures(note)
    assert close(before, shown_before) and close(after, shown_after), value


def _generation(g, note, ns):
    assert len(g.before_ids) == len(g.after_ids) == GENERATED and isinstance(g.after, str)


def _patching_grid(grid, note, ns):
    assert note.startswith("[layer, position]")
    n_tokens = ns["model"].to_ids("The capital of France is").shape[-1]
    assert tuple(grid.shape) == (ns["model"].dims.n_layers, n_tokens)


def _builtin_corpus(docs, note, ns):
    chars, count = figures(note)  # "~2.2 M characters, 701 documents"
    texts = [d.text for d in docs.documents()]
    assert len(texts) == int(count) and close(sum(map(len, texts)) / 1e6, chars)
    assert docs.id.startswith("builtin:python-docs")


def _notes_corpus(docs, note, ns):
    assert docs.id.startswith("file:") and docs.id.endswith("#body") and next(docs.documents()).text


def _packed(value, note, ns):
    tokens, docs = value
    assert list(tokens.shape) == [int(n) for n in shape_of(note)] and docs.shape == tokens.shape


def _built(path, note, ns):
    from mechscope.index.query import Index

    with Index(path) as index:  # "every MLP neuron"
        assert [s.site for s in index.sites] == [f"blocks.{i}.mlp.hook_post" for i in range(ns["model"].dims.n_layers)]
        assert index.meta["complete"] and index.meta["tokens_seen"] == INDEX_TOKENS // 128 * (128 - 4)


def _index_top(examples, note, ns):
    assert len(examples) == 20 and examples == sorted(examples, key=lambda e: -e.value)
    for e in examples:  # the activations on the tokens around it, the example's own among them
        assert len(e.acts) == len(e.positions) == len(e.tokens) and e.acts[e.at] == pytest.approx(e.value, rel=1e-2, abs=1e-2)


def _index_samples(strata, note, ns):
    assert strata and all(s.examples for s in strata)  # one Stratum per octave that has tokens
    assert all(0 <= s.q_low <= s.q_high <= 1 for s in strata) and strata[-1].q_high == pytest.approx(1)


def _index_stats(s, note, ns):
    assert [name.strip() for name in note.split(",")] == ["mean", "std", "max", "density"]
    assert s.tokens == INDEX_TOKENS // 128 * (128 - 4) and 0 <= s.density <= 1 and s.std >= 0 and s.max >= s.mean


def _index_rank(rows, note, ns):
    assert len(rows) == 20 and [r.density for r in rows] == sorted((r.density for r in rows), reverse=True)


def _index_search(hits, note, ns):
    """Something real: units whose top examples sit on the searched token, each hit confirmed on the unit's own top examples."""
    index = ns["index"]
    (token,) = index.search_ids(SEARCHED)
    assert hits, f"no unit's top example sits on {SEARCHED!r} in the test's index"
    assert hits[0].hits >= int(index.meta["k"]) // 2  # a unit that fires on the token: most of its top examples sit there
    for hit in hits[:3]:
        on_token = [e.value for e in index.top(hit.unit, int(index.meta["k"])) if e.token_id == token]
        assert len(on_token) == hit.hits and max(on_token) == pytest.approx(hit.best)


def _encoded(features, note, ns):
    d_in, d_sae = (int(n) for n in re.findall(r"\[\.\.\., (\d+)\]", note))
    assert ns["x"].shape[-1] == d_in and features.shape == (*ns["x"].shape[:-1], d_sae)


def _steered(result, note, ns):
    """The clamp reaches the prediction (tests/test_dict_use.py checks its arithmetic against a manual recomputation)."""
    assert result.interventions and result.kl > 0 and result.before.top[0].prob != result.after.top[0].prob


def _read(shape, note, ns):
    assert list(shape) == [int(n) for n in shape_of(note)] and ns["out"].logits is None


def _logits(logits, note, ns):
    assert shape_of(note) == ["1", "pos", "d_vocab"]
    assert logits.shape == (1, ns["model"].to_ids(ns["text"]).shape[-1], ns["model"].config.vocab_size)


def _generated_in_hooks(out, note, ns):
    """The write applies on every forward pass of the generation: each step's logits differ from those of
    the same generation without it (`placeholders`' "plain_generation")."""
    plain = ns["plain_generation"]
    assert out.sequences.shape == plain.sequences.shape == (1, ns["model"].to_ids(ns["text"]).shape[-1] + 2)
    assert len(out.scores) == 2 and all(not torch.allclose(a, b) for a, b in zip(out.scores, plain.scores, strict=True))


CLAIMS = {
    "model = ms.load()": _model,
    "p.top[0]": _top_token,
    "p.targets[0].prob, p.targets[0].rank": _target,
    "lens.probs[:, -1, 0]": _lens,
    'ms.predict(model, ["The capital of France is", "Rome is the capital of"], targets=" Paris")': _per_text,
    "a.top(10)": _dla_top,
    "a.heads, a.neurons": _dla_shapes,
    "a.total, a.logit": _dla_total,
    "r.targets[0].prob_before, r.targets[0].prob_after": _ablated,
    'generate(model, text, [Intervention.zero(["29:288"])], max_new_tokens=20)': _generation,
    'grids["hook_resid_pre"].grid': _patching_grid,
    "docs = corpus()": _builtin_corpus,
    'docs = corpus("notes.jsonl", field="body")': _notes_corpus,
    "batch.tokens, batch.docs": _packed,
    'build_index(model, "neurons.duckdb", settings=IndexSettings(tokens=100_000))': _built,
    'index.top("29:288", n=20)': _index_top,
    'index.samples("29:288")': _index_samples,
    'index.stats("29:288")': _index_stats,
    'index.rank(by="density", n=20)': _index_rank,
    f'index.search("{SEARCHED}")': _index_search,
    "sae.encode_dense(x)": _encoded,
    "ms.intervene(model, text, [FeatureSteer.clamp(sae, 1234, 10.0)])": _steered,
    'out.cache["blocks.10.hook_resid_post"].shape': _read,
    "out.logits": _logits,
    "model.hf.generate(...)": _generated_in_hooks,
}
"""README statement (its text, comment left out) -> the check of its comment's claim: (value, comment, namespace)."""


# -- the command lines ----------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"\b[A-Z]{2,}\b|\.\.\.|blocks\.L\.")
"""An optional part naming one of these is left out: FILE, DB, PATH, START:STOP, 'blocks.L.', '...'."""


def readme_commands(text: str | None = None, table: dict[str, str] = SMALLER_ARGS) -> list[list[str]]:
    """Every `mechscope ...` line of the bash blocks of `text` (the README's by default) as argv lists
    (`table` applied), one per choice of a|b|c."""
    commands = []
    for block in blocks("bash", text):
        for line in block.splitlines():
            if not line.startswith("mechscope "):
                continue
            line = smaller(line, table)
            line = re.sub(r"\[([^\]]*)\]", lambda part: "" if PLACEHOLDER.search(part[1]) else part[1], line)
            words = shlex.split(line, comments=True)[1:]
            choices = [word.split("|") if "|" in word and not word.startswith(" ") else [word] for word in words]
            commands += [list(argv) for argv in itertools.product(*choices)]
    return commands


def _name(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] == "index" else argv[0]


def _option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _printed(out: str, what: str, figure: float, shown: str) -> None:
    assert close(figure, shown), f"{what}: the README says {shown}, the code gives {figure}"


def _predict_json(out, argv, folder):
    result = json.loads(out)  # the README's Python example states the same prediction
    prob, rank = figures(re.search(r"p\.targets\[0\]\.rank\s+# (\(.*?\))", readme_text())[1])
    _printed(out, "P(' questionable')", result["targets"][0]["prob"], prob)
    assert result["targets"][0]["rank"] == int(rank) and len(result["top"]) == int(_option(argv, "--k"))


def _attribute(out, argv, folder):
    first, value = re.search(rf"a\.top\(10\)\s+# \[\('([^']+)', ({NUMBER})\)", readme_text()).groups()
    assert re.search(rf"{re.escape(first)}\s.*{re.escape(value)}", out), out  # the same top unit and value


def _sites(out, argv, folder):
    """Every site of the README's table that SmolLM2 has (all but GPT-2's position embeddings) is listed."""
    table = readme_text().split("### Sites")[1].split("```")[0]
    for cell in re.findall(r"^\| (`.*?) \|", table, flags=re.MULTILINE):
        names = re.findall(r"`([^`]+)`", cell)
        first = names[0].replace("blocks.L.", "blocks.0.")
        for name in [first] + [first.rsplit(".", 1)[0] + "." + other for other in names[1:]]:
            assert (name in out) != (name == "hook_pos_embed"), name


def _index_build(out, argv, folder):
    # "`index` commands use the model's default database ... unless given --db/--out"
    path = folder / "cache" / "index" / "SmolLM2-135M-Instruct.duckdb"
    assert path.exists() and "tokens seen" in out and f"{INDEX_TOKENS // 128 * 124:,}" in out


def _index_search(out, argv, folder):
    assert re.search(rf"top examples sit on {re.escape(repr(argv[2]))} .*occurs [1-9][\d,]* times", out), out
    assert re.search(r"│ \d+:\d+ +│ +[1-9]\d* │", out), out  # at least one unit, with its top examples there


def _index_rank(out, argv, folder):
    assert f"units by {_option(argv, '--by')}" in out and len(re.findall(r"│ \d+:\d+ ", out)) == 20


def _harvest(out, argv, folder):
    """`--tokens` rounded up to whole shards of `--shard-contexts` contexts (less the positions skipped)."""
    stored, per_shard = re.search(r"store acts: ([\d,]+) tokens of blocks\.15\.hook_resid_post", out), 4 * (128 - 4)
    assert stored and int(stored[1].replace(",", "")) == -(-2048 // per_shard) * per_shard, out


def _train_dict(out, argv, folder):
    assert re.search(r"dictionary sae/dictionary: sae, 9,216 latents \(topk\) on blocks\.15\.hook_resid_post", out), out


def _eval_dict(out, argv, folder):
    """--tokens 256 rounded up to whole contexts of 124 scored tokens (the first 4 positions of each left out)."""
    assert f"on {-(-256 // 124) * 124:,} held-out tokens" in out and re.search(r"│ fvu +│ +\d\.\d{4} │", out), out


def _convert_dict(out, argv, folder):
    """The converted folder loads, with the same features (float16 weights on disk when asked)."""
    from mechscope.dictionaries import load_any

    written = folder / _option(argv, "--out")
    assert (written / "dictionary.safetensors").is_file() and "float16" in out, out
    assert load_any(written).d_sae == load_any(folder / "sae" / "dictionary").d_sae


CLI_CHECKS = {
    "predict": _predict_json,
    "attribute": _attribute,
    "sites": _sites,
    "index build": _index_build,
    "index search": _index_search,
    "index rank": _index_rank,
    "harvest": _harvest,
    "train-dict": _train_dict,
    "eval-dict": _eval_dict,
    "convert-dict": _convert_dict,
}
"""Command -> a check of what it printed, beyond its exit code and the files it names."""


def _shards(monkeypatch, capsys) -> None:
    """`index merge shard0.duckdb shard1.duckdb` needs two shards: built here over contexts 0:4 and 4:8, layer 29 only."""
    for i, contexts in enumerate(("0:4", "4:8")):
        argv = ["index", "build", "--contexts", contexts, "--batch-size", "4", "--sites", "blocks.29.mlp.hook_post"]
        code, _, err = run_main(monkeypatch, capsys, *argv, "--out", f"shard{i}.duckdb")
        assert code == 0, err


def test_command_lines(smollm2, neuron_index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "index").mkdir(parents=True)
    shutil.copy(neuron_index, tmp_path / "cache" / "index" / "SmolLM2-135M-Instruct.duckdb")
    shared = lambda spec="default", *args, **kwargs: smollm2 if spec == "default" else mechscope.load(spec, *args)  # noqa: E731
    for module in (cli, cli_index, cli_dict):
        monkeypatch.setattr(module, "_load", shared)
    monkeypatch.setattr(cli_dict, "console", Console(width=160))
    commands = readme_commands()
    assert {_name(argv) for argv in commands} >= set(CLI_CHECKS)
    for argv in commands:
        if _name(argv) == "index merge":
            _shards(monkeypatch, capsys)
        code, out, err = run_main(monkeypatch, capsys, *argv)
        assert code == 0, f"mechscope {shlex.join(argv)}: exit {code}\n{err}"
        for flag in ("--html", "--png", "--out"):
            if _option(argv, flag) is not None:
                assert (tmp_path / _option(argv, flag)).exists(), f"mechscope {shlex.join(argv)} wrote no {flag}"
        if _name(argv) in CLI_CHECKS:
            CLI_CHECKS[_name(argv)](out, argv, tmp_path)
    # The prose: a search for a token the corpus lacks says so, with how many tokens of which corpus it looked at.
    absent = re.search(r'`"([^"]+)"` is not, and a search for it says so', " ".join(readme_text().split()))[1]
    code, out, _ = run_main(monkeypatch, capsys, "index", "search", absent)
    said = f"{absent!r} never occurs in the {INDEX_TOKENS:,} tokens this index read from builtin:python-docs"
    assert code == 0 and said in " ".join(out.split()), out
    code, out, _ = run_main(monkeypatch, capsys, "index", "search", "Wikipedia" + SEARCHED)  # never after "Wikipedia"
    said = r"the last token occurs [1-9][\d,]* times, but no unit has one of those, after the rest of the string,"
    assert code == 0 and re.search(said, " ".join(out.split())), out


# -- the Python examples --------------------------------------------------------------------------


def placeholders(model) -> dict:
    """Values of the names the README's examples leave to the reader."""
    site = "blocks.15.hook_resid_post"
    direction = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(0))
    plain = eval(f"model.hf.generate({HF_GENERATE})", {"model": model, "text": PROMPT})  # no hooks: to compare with
    return {"x": model.run(PROMPT, read=[site]).cache[site], "direction": direction / direction.norm(), "plain_generation": plain}


def test_every_commented_statement_has_a_check():
    found = {key for block in blocks("python") for key in commented_statements(block).values()}
    assert sorted(found - set(CLAIMS)) == [] and sorted(set(CLAIMS) - found) == []


def test_python_examples(smollm2, neuron_index, tmp_path, monkeypatch):
    """Every ```python block, in order, in one namespace (as a reader's session runs them)."""
    from mechscope.data import corpus

    monkeypatch.chdir(tmp_path)
    shutil.copy(neuron_index, "neurons.duckdb")
    real_load = mechscope.load
    shared = lambda *args, **kwargs: smollm2 if not (args or kwargs) else real_load(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(mechscope, "load", shared)
    notes = [{"body": doc.text} for doc in itertools.islice(corpus().documents(), 20)]
    Path("notes.jsonl").write_text("".join(json.dumps(note) + "\n" for note in notes))
    namespace, checked = {"__name__": "readme", **placeholders(smollm2)}, {}
    for line, block in blocks_at("python"):
        run_python_block(block, namespace, checked, line)
    assert set(checked) == set(CLAIMS)  # every claim was reached


# -- figures in the prose -------------------------------------------------------------------------


def test_later_loads_read_the_converted_copy(smollm2, capfd):
    """The README: later loads take about 3 s, "most of it importing torch and transformers", and a
    second load in one process well under a second. With torch and transformers imported (this
    session), a load reads the cached copy, converts nothing, and takes under those 3 s (a loose
    bound: about 0.3 s on two busy cores)."""
    from mechscope.models.load import converted_gguf, default_gguf

    (seconds,) = figures(re.search(r"Later loads take about (\d+) s", readme_text())[1])
    copy = converted_gguf(default_gguf()) / "config.json"
    written = copy.stat().st_mtime
    start = time.perf_counter()
    again = mechscope.load()
    assert time.perf_counter() - start < float(seconds)
    assert copy.stat().st_mtime == written and "converting" not in capfd.readouterr().err
    assert again.name == smollm2.name


def test_prose_figures(smollm2):
    """Figures the README's prose states: the demo's index size, the positions never scored, the lens's layers."""
    from mechscope.demo import DEMO_TOKENS
    from mechscope.index.build import IndexSettings

    text = " ".join(readme_text().split())
    (demo_k,) = re.search(r"`make demo` builds a small one there \((\d+)k tokens", text).groups()
    assert round(DEMO_TOKENS / 1000) == int(demo_k)
    assert "The first four positions of each context" in text and IndexSettings().skip == 4
    (layers,) = re.search(r"across all (\d+) layers", text).groups()
    assert smollm2.dims.n_layers == int(layers)
