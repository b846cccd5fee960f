"""docs/dictionaries.md is true: every `mechscope ...` command of its bash blocks and every python block
runs here, in order, and writes what it names.

As for the README (tests/test_readme.py, whose block readers this uses), long jobs run small through
listed substitutions that must each find their text in the page: the harvest stores 2,048 tokens of the
docs corpus (not 5 M of `builtin:all`), training reads 2,048 tokens, evaluation 256 held-out tokens, the
feature index 2,048 tokens, and generations make GENERATED tokens. Names and features are the page's.
The commands and the Python run in separate folders: both write `sae-l15/`, and a finished training run
refuses to be continued with other settings.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from rich.console import Console
from test_cli import run_main
from test_readme import GENERATED, _option, blocks, blocks_at, placeholders, readme_commands, smaller

import mechscope
from mechscope import cli, cli_dict, cli_index

pytestmark = pytest.mark.slow

PAGE = Path(__file__).resolve().parents[1] / "docs" / "dictionaries.md"
TRAIN_SMALL = "--tokens 2048 --batch-size 1024 --chunk-contexts 16 --eval-tokens 1024"

SMALLER_ARGS = {
    "--tokens 5000000 --dtype bfloat16 --corpus builtin:all": (
        "--tokens 2048 --shard-contexts 4 --dtype bfloat16 --corpus builtin"
    ),
    "--expansion 16 --store acts/": f"--expansion 16 --store acts/ {TRAIN_SMALL}",
    "eval-dict sae-l15/dictionary --tokens 65536": "eval-dict sae-l15/dictionary --tokens 256 --corpus builtin",
    "--generate 30": f"--generate {GENERATED}",
    "--dict sae-l15/dictionary --tokens 1000000": "--dict sae-l15/dictionary --tokens 2048",
}
"""Page command text -> what the test runs instead."""

SMALLER = {
    "k=64, tokens=5_000_000)": (
        'k=64, tokens=2_048, batch_size=1_024, chunk_contexts=16, eval_tokens=1_024, eval_every=1, corpus="builtin")'
    ),
    "evaluate_dictionary(model, sae, tokens=65_536)": 'evaluate_dictionary(model, sae, "builtin", tokens=256)',
    '"features.duckdb", dictionaries=': '"features.duckdb", settings=IndexSettings(tokens=2048), dictionaries=',
}
"""Page Python text -> what the test runs instead."""


def page_text() -> str:
    return PAGE.read_text()


def test_every_substitution_still_finds_its_text():
    python, bash = "\n".join(blocks("python", page_text())), "\n".join(blocks("bash", page_text()))
    assert [old for old in SMALLER if old not in python] == []
    assert [old for old in SMALLER_ARGS if old not in bash] == []


def test_command_lines(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    for module in (cli, cli_index, cli_dict):
        monkeypatch.setattr(module, "_load", lambda spec="default", *args, **kwargs: smollm2)
    monkeypatch.setattr(cli_dict, "console", Console(width=160))
    commands = readme_commands(page_text(), SMALLER_ARGS)
    names = [argv[0] if argv[0] != "index" else " ".join(argv[:2]) for argv in commands]
    assert names == [
        "harvest",
        "train-dict",
        "eval-dict",
        "find-feature",
        "steer",
        "index build",
        "index show",
        "index rank",
        "feature",
    ]
    printed = {}
    for name, argv in zip(names, commands, strict=True):
        code, out, err = run_main(monkeypatch, capsys, *argv)
        assert code == 0, f"mechscope {shlex.join(argv)}: exit {code}\n{err}"
        for flag in ("--html", "--png", "--out"):
            if _option(argv, flag) is not None:
                assert (tmp_path / _option(argv, flag)).exists(), f"mechscope {shlex.join(argv)} wrote no {flag}"
        printed[name] = out
    # The page: feature F of `OUT/dictionary` is the unit f:NAME:F with NAME the run's folder, in every command.
    assert "f:sae-l15:1234" in printed["index show"] and "f:sae-l15:" in printed["index rank"]
    assert "f:sae-l15:1234" in printed["feature"] and "logit effects via" in printed["feature"]


def test_python_examples(smollm2, tmp_path, monkeypatch):
    """Every python block, in order, in one namespace."""
    from mechscope.index import IndexSettings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    real_load = mechscope.load
    monkeypatch.setattr(
        mechscope, "load", lambda *args, **kwargs: smollm2 if not (args or kwargs) else real_load(*args, **kwargs)
    )
    namespace = {"__name__": "docs", "IndexSettings": IndexSettings, **placeholders(smollm2)}
    for line, block in blocks_at("python", page_text()):
        code = "\n" * line + smaller(block, SMALLER)  # tracebacks name the page's lines
        exec(compile(code, str(PAGE), "exec"), namespace)
    assert namespace["acts"].shape == (*namespace["x"].shape[:-1], 9216)  # "[..., 576] raw activations -> [..., 9216]"
    card = namespace["card"]
    assert card.name == "f:sae-l15:1234" and card.promoted and card.nearest and card.unit is not None  # found in the index
