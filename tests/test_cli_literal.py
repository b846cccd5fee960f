"""Text from the user, the model or a corpus is shown literally by every command: rich markup in it is
not read as markup, and terminal escape sequences in it are shown as escapes, never sent raw."""

import pytest
from conftest import invoke_cli
from rich.console import Console

from mechscope.cli_common import error_line, literal, shown, visible

pytestmark = pytest.mark.slow

TEXT = "total += arr[i] * w[j] [bold]b[/bold] [/] \x1b[31mred\x1b[0m\x07"
"""Code with indexing, rich markup (an unbalanced closing tag too), a colour escape and a bell: 34 tokens."""
ESC = "\x1b"


def run_main(monkeypatch, capsys, model, *argv):
    """Run the CLI in-process on an already loaded model, on a console too wide to wrap; (exit code, stdout, stderr)."""
    return invoke_cli(monkeypatch, capsys, *argv, load=lambda *args: model)


def shows_literally(out: str, *pieces: str) -> None:
    assert ESC not in out and "\x07" not in out, "a raw control character reached the terminal"
    for piece in pieces:
        assert piece in out, f"{piece!r} not shown"


def test_helpers_show_text_as_it_is():
    assert visible("a\x1b[31mb\x07\x9b\u202e\u200bc\n") == "a\\x1b[31mb\\x07\\u009b\\u202e\\u200bc\n"
    assert visible("a\tb\nc", newlines=True) == "a\\x09b\\nc"
    assert shown("[/] [bold]x") == "\\[/] \\[bold]x"
    assert literal("[/]\x1b").plain == "[/]\\x1b"
    assert error_line("first\n  second\x1b") == "first second\\x1b"
    console = Console(width=80, record=True)
    console.print(f"[bold]{shown(TEXT)}[/]")
    assert console.export_text().strip() == visible(TEXT)


def test_predict(monkeypatch, capsys, smollm2):
    code, out, _ = run_main(monkeypatch, capsys, smollm2, "predict", TEXT, "-t", "[/]", "-t", ESC + "[31m")
    assert code == 0
    tokens = smollm2.to_str_tokens(smollm2.to_ids(TEXT)[0])
    shows_literally(out, str(tokens), "'[/]'", "'\\x1b[31m'", "'\\x1b'")


def test_predict_json_keeps_text_exact(monkeypatch, capsys, smollm2):
    import json

    code, out, _ = run_main(monkeypatch, capsys, smollm2, "predict", TEXT, "-t", "[/]", "--json")
    assert code == 0 and ESC not in out
    result = json.loads(out)
    assert "".join(result["tokens"]) == TEXT and result["targets"][0]["target"] == "[/]"


def test_lens(monkeypatch, capsys, smollm2):
    code, out, _ = run_main(monkeypatch, capsys, smollm2, "lens", TEXT, "-t", "[/]", "--pos", "-1", "--pos", "23")
    assert code == 0
    shows_literally(out, "P('[/]')", "'\\x1b'")


def test_attribute(monkeypatch, capsys, smollm2):
    code, out, _ = run_main(monkeypatch, capsys, smollm2, "attribute", TEXT, "-t", ESC, "--vs", " [", "--top", "3")
    assert code == 0
    shows_literally(out, "logit('\\x1b') - logit(' [')")


def test_intervene(monkeypatch, capsys, smollm2):
    argv = ["intervene", TEXT, "--ablate", "29:288", "-t", "[/]", "--k", "3", "--generate", "2"]
    code, out, _ = run_main(monkeypatch, capsys, smollm2, *argv)
    assert code == 0
    shows_literally(out, "target '['", "without: " + visible(TEXT), "with:    " + visible(TEXT))


def test_neuron(monkeypatch, capsys, smollm2):
    code, out, _ = run_main(monkeypatch, capsys, smollm2, "neuron", "29:288", TEXT, "a[i] [bold]")
    assert code == 0
    shows_literally(out, "arr[i] * w[j] [bold]b[/bold]", "'a[i] [bold]'", "'\\x1b'")


def test_patch(monkeypatch, capsys, smollm2):
    clean, corrupt = "[/] a\x1b b", "[/] c\x1b b"  # 6 tokens each
    argv = ["patch", "--clean", clean, "--corrupt", corrupt, "-t", ESC, "--vs", " [", "--kind", "hook_resid_pre"]
    code, out, _ = run_main(monkeypatch, capsys, smollm2, *argv)
    assert code == 0
    shows_literally(out, "metric logit('\\x1b') - logit(' ['):", "\\x1b")


def test_pattern(monkeypatch, capsys, smollm2):
    code, out, _ = run_main(monkeypatch, capsys, smollm2, "pattern", "5.3", TEXT)
    assert code == 0
    shows_literally(out, "12:'bold'", "15:'['", "23:'\\x1b'")


def test_read(monkeypatch, capsys, smollm2):
    code, out, _ = run_main(monkeypatch, capsys, smollm2, "read", TEXT, "-s", "blocks.0.hook_resid_post")
    assert code == 0
    shows_literally(out, "3:'['", "23:'\\x1b'", "[1, 34, 576]")


def test_sites_shapes(monkeypatch, capsys, smollm2):
    code, out, _ = run_main(monkeypatch, capsys, smollm2, "sites")
    assert code == 0
    shows_literally(out, "[batch, pos, 576]", "[batch, 9, q_pos, k_pos]", "[batch, pos, 9, 64]")


def test_error_messages(monkeypatch, capsys, smollm2, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, smollm2, "attribute", TEXT, "-t", "[/]")
    assert code == 2 and len(err.strip().splitlines()) == 1
    shows_literally(err, "target '[/]' is 3 tokens ['[', '/', ']']")
    (tmp_path / "file").write_text("")
    html = str(tmp_path / "file" / f"[bold]{ESC}[31m.html")
    code, _, err = run_main(monkeypatch, capsys, smollm2, "lens", TEXT, "-t", "x", "--html", html)
    assert code == 2 and len(err.strip().splitlines()) == 1
    shows_literally(err, "[bold]\\x1b[31m.html' cannot be written")
    code, _, err = run_main(monkeypatch, capsys, smollm2, "predict", TEXT, "--k", f"[/]{ESC}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    shows_literally(err, "--k '[/]\\x1b' is not valid")
