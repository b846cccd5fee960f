"""The command line: outputs, files written, and one-line errors without tracebacks."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import invoke_cli

PROMPT = "The reliability of Wikipedia is very"


def run_main(monkeypatch, capsys, *argv):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    return invoke_cli(monkeypatch, capsys, *argv, width=160)


def test_predict_json(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "predict", PROMPT, "--target", " questionable", "--k", "5", "--json")
    assert code == 0
    result = json.loads(out)
    assert [t["token"] for t in result["top"][:2]] == [" high", " low"]
    assert len(result["top"]) == 5
    assert result["targets"][0]["rank"] == 4 and 0.03 < result["targets"][0]["prob"] < 0.06


def test_lens_writes_html_and_png(monkeypatch, capsys, tmp_path):
    html, png = tmp_path / "lens.html", tmp_path / "lens.png"
    code, out, _ = run_main(monkeypatch, capsys, "lens", PROMPT, "-t", " questionable", "--html", str(html), "--png", str(png))
    assert code == 0 and "logit lens" in out
    page = html.read_text()
    assert "questionable" in page and "top:" in page  # hover text
    assert "<script src" not in page and len(page) < 200_000  # self-contained and light: no plotly.js
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sites_lists_every_site(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "sites", "--json")
    shapes = json.loads(out)
    assert code == 0 and len(shapes) == 2 + 30 * 9
    assert shapes["blocks.0.mlp.hook_post"] == ["batch", "pos", 1536]
    assert shapes["blocks.29.attn.hook_z"] == ["batch", "pos", 9, 64]


def test_read_saves_safetensors(monkeypatch, capsys, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "acts.safetensors"
    code, _, _ = run_main(monkeypatch, capsys, "read", PROMPT, "-s", "blocks.4.hook_resid_post", "--out", str(path))
    assert code == 0
    assert load_file(path)["blocks.4.hook_resid_post"].shape == (1, 6, 576)


def test_demo_writes_report(monkeypatch, capsys, tmp_path):
    code, out, _ = run_main(monkeypatch, capsys, "demo", "--out", str(tmp_path))
    assert code == 0 and "' questionable'" in out
    page = (tmp_path / "demo.html").read_text()
    assert "Logit lens of" in page and "class='ms-tok skip'" in page and "top 6 of" in page  # lens, heatmap, index
    assert "<script" not in page and len(page) < 500_000 and (tmp_path / "demo-lens.png").exists()  # light: no plotly.js
    dictionary_parts = ("Its quality on", "Features that fire most on the prompt", "Feature f:sae-l15:", "Features for the")
    for part in (*dictionary_parts, "Steering: add"):
        assert part in page, part  # the dictionary section


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "hi", "--model", "/no/such/model"], "no such model file or folder '/no/such/model'"),
        (["read", PROMPT, "-s", "blocks.3.hook_nonsense"], "unknown site 'blocks.3.hook_nonsense'"),
        (["read", PROMPT, "-s", "blocks.30.hook_resid_post"], "layer 30 out of range"),
        (["lens", PROMPT, "-t", " x", "--pos", "6"], "position 6 out of range"),
        (["predict", ""], "empty text"),
        (["predict", "word " * 9000], "longer than the model's context of 8192"),
        (["predict", PROMPT, "--target", ""], "target '' tokenises to nothing"),
        (["predict", PROMPT, "--dtype", "int3"], "unknown dtype 'int3'"),
        (["attribute", PROMPT, "-t", " questionable", "--vs", ""], "vs '' is empty"),
        (["lens", PROMPT, "-t", " x", "--png", "/tmp/same.png", "--html", "/tmp/same.png"], "--html and --png are the same file"),
    ],
)
def test_bad_input_one_line(monkeypatch, capsys, argv, message):
    code, _, err = run_main(monkeypatch, capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unknown_family_from_cli(monkeypatch, capsys, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(
        OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4)
    ).save_pretrained(tmp_path)
    code, _, err = run_main(monkeypatch, capsys, "sites", "--model", str(tmp_path))
    assert code == 2 and "unknown model family 'opt'" in err and len(err.strip().splitlines()) == 1


def test_entry_point_hub_id_offline():
    """The installed command, end to end: a hub id without the hub says how to pass a local folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mechscope.cli", "predict", "hi", "--model", "someone/some-model"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "local folder" in done.stderr and "someone/some-model" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_attribute_lists_units_that_sum_to_the_logit(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "attribute", PROMPT, "-t", " questionable", "--vs", " high", "--top", "5")
    assert code == 0 and "neuron" in out
    flat = " ".join(out.split())  # the console wraps long lines
    match = re.search(r" sum ([-+.\d]+) = .* ([-+.\d]+) \(final norm", flat)
    assert match and float(match.group(1)) == float(match.group(2))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["attribute", PROMPT, "-t", " high", "--vs", " high"], "same token as the target"),
        (["attribute", PROMPT, "-t", " high", "--pos", "6"], "position 6 out of range"),
    ],
)
def test_attribute_bad_input(monkeypatch, capsys, argv, message):
    code, _, err = run_main(monkeypatch, capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_intervene_shows_before_and_after(monkeypatch, capsys):
    argv = ["intervene", PROMPT, "--ablate", "29:288", "--scale", "27:846=0", "-t", " questionable", "--generate", "3"]
    code, out, _ = run_main(monkeypatch, capsys, *argv)
    assert code == 0 and "zero-ablate 29:288" in out and "target" in out and "questionable" in out
    assert "without:" in out and "with:" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["intervene", PROMPT, "--ablate", "30:1"], "layer 30 out of range"),
        (["intervene", PROMPT, "--ablate", "3:1536"], "neuron 1536"),
        (["intervene", PROMPT, "--set", "3:12"], "bad assignment"),
        (["intervene", PROMPT, "--ablate", "twelve"], "bad unit 'twelve'"),
    ],
)
def test_intervene_bad_units(monkeypatch, capsys, argv, message):
    code, _, err = run_main(monkeypatch, capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_neuron_heatmap_and_stats(monkeypatch, capsys, tmp_path):
    html, png = tmp_path / "n.html", tmp_path / "n.png"
    argv = ["neuron", "29:288", PROMPT, "This source is dubious.", "--html", str(html), "--png", str(png)]
    code, out, _ = run_main(monkeypatch, capsys, *argv)
    assert code == 0 and "neuron 29:288" in out and "reliability" in out
    assert "title=" in html.read_text() and png.read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run_main(monkeypatch, capsys, "neuron", "3:7", PROMPT, "--json")
    (values,) = json.loads(out)
    assert len(values["tokens"]) == len(values["values"]) == 6


def test_neuron_bad_unit(monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "neuron", "3:1536", PROMPT)
    assert code == 2 and "1536" in err and len(err.strip().splitlines()) == 1


def test_patch_grid_and_attribution_correlation(monkeypatch, capsys, tmp_path):
    argv = ["patch", "--clean", "The capital of France is", "--corrupt", "The capital of Italy is", "-t", " Paris"]
    argv += ["--vs", " Rome", "--kind", "hook_resid_pre", "--attribution", "--html", str(tmp_path / "p.html")]
    code, out, _ = run_main(monkeypatch, capsys, *argv)
    assert code == 0 and "share of the metric restored" in out
    r = float(re.search(r"r = ([-.\d]+)", out).group(1))
    assert r > 0.8 and (tmp_path / "p.html").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["patch", "--clean", "The capital of France is", "--corrupt", "Paris", "-t", " Paris"], "corrupted prompt"),
        (["patch", "--clean", "a b", "--corrupt", "a c", "-t", " x", "--vs", " x"], "same token"),
    ],
)
def test_patch_bad_input(monkeypatch, capsys, argv, message):
    code, _, err = run_main(monkeypatch, capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_attribute_rankings(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "attribute", PROMPT, "-t", " questionable", "--rankings", "--top", "4")
    assert code == 0 and "real effect" in out and "Spearman" in out


def test_pattern_of_a_head(monkeypatch, capsys, tmp_path):
    code, out, _ = run_main(
        monkeypatch, capsys, "pattern", "5.3", PROMPT, "--png", str(tmp_path / "p.png"), "--html", str(tmp_path / "p.html")
    )
    assert code == 0 and "strongest keys" in out and (tmp_path / "p.png").exists() and (tmp_path / "p.html").exists()
    code, _, err = run_main(monkeypatch, capsys, "pattern", "5.9", PROMPT)
    assert code == 2 and "head 9" in err and len(err.strip().splitlines()) == 1


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "mechscope", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train-dict" in done.stdout, done.stderr
