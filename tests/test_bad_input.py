"""Odd prompts: control characters, NUL bytes and zero-width characters are text like any other and
give a well-defined result; a lone surrogate (not valid Unicode) gets one line naming it. Through
the Python API and the command line, never a traceback."""

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import invoke_cli

import mechscope as ms
from mechscope.models.text import check_text

VALID = {
    "NUL byte": "a\x00b",
    "only a NUL byte": "\x00",
    "control characters": "\x01\x02\x1b[31mred\x7f",
    "only zero-width spaces": "\u200b\u200b",
    "byte-order mark and bidi controls": "\ufeff\u202e\u2066x",
}
LONE_SURROGATES = {
    "lone high surrogate": ("\ud800", "character 0 is a lone surrogate U+D800"),
    "undecodable byte after text": ("ab\udcff", "character 2 is a lone surrogate U+DCFF"),
}


def run_main(monkeypatch, capsys, model, *argv):
    """Run the CLI in-process on an already loaded model; returns (exit code, stdout, stderr)."""
    return invoke_cli(monkeypatch, capsys, *argv, load=lambda *args: model, width=160)


@pytest.mark.parametrize("case", list(VALID))
def test_odd_but_valid_text_gives_a_well_defined_prediction(case, smollm2):
    text = VALID[case]
    p = ms.predict(smollm2, text, k=5, targets=[text])
    ids = smollm2.to_ids(text)[0]  # byte-level tokens: a zero-width space is 3 bytes, shown as 3 partial tokens
    assert len(p.tokens) == len(ids) and smollm2.tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all(0 < t.prob <= 1 and math.isfinite(t.logprob) for t in p.top)
    assert math.isfinite(p.targets[0].full_logprob) and p.targets[0].n_tokens >= 1
    out = smollm2.run(text)
    assert out.logits.shape[:2] == (1, len(p.tokens)) and out.logits.isfinite().all()


@pytest.mark.parametrize("case", list(LONE_SURROGATES))
def test_lone_surrogate_is_refused_in_one_line(case, smollm2):
    text, message = LONE_SURROGATES[case]
    for call in (lambda: ms.predict(smollm2, text), lambda: smollm2.run(text), lambda: smollm2.token_ids(text)):
        with pytest.raises(ms.MechscopeError, match=re.escape(message)) as err:
            call()
        assert "\n" not in str(err.value) and "not valid Unicode" in str(err.value)
    with pytest.raises(ms.MechscopeError, match=f"target .* {re.escape(message)}"):
        ms.predict(smollm2, "The reliability of Wikipedia is very", targets=[text])


@pytest.mark.parametrize("case", list(VALID))
def test_cli_predicts_odd_but_valid_text(case, smollm2, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, smollm2, "predict", VALID[case], "--k", "3", "--json")
    assert code == 0 and not err
    assert len(json.loads(out)["top"]) == 3


@pytest.mark.parametrize("case", list(LONE_SURROGATES))
def test_cli_refuses_a_lone_surrogate_in_one_line(case, smollm2, monkeypatch, capsys):
    text, message = LONE_SURROGATES[case]
    code, out, err = run_main(monkeypatch, capsys, smollm2, "predict", text)
    assert code == 2 and not out
    assert err.startswith("error: text ") and message in err and err.count("\n") == 1


def test_undecodable_bytes_on_the_command_line(smollm2):
    """The real entry point: Python turns an undecodable argument byte into a lone surrogate."""
    done = subprocess.run(
        [sys.executable, "-c", "from mechscope.cli import main; main()", "predict", b"caf\xe9"],
        capture_output=True,
        timeout=300,
    )
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2 and err.count("\n") == 1, err
    assert "lone surrogate U+DCE9" in err and "Traceback" not in err


def test_check_text_passes_valid_text_through():
    assert check_text("a\x00\u200b\U0001f600") == "a\x00\u200b\U0001f600"
    long = "x" * 100 + "\udfff"
    with pytest.raises(ms.MechscopeError, match=r"text 'x{40}\.\.\.' is not valid Unicode: character 100 "):
        check_text(long)
