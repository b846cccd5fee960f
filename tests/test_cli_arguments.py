"""One meaning per argument, every number bounded before any work, and the exit codes: 0 ok, 2 bad input
(a bad value, or an option that does not parse: one line naming the option and the value), 1 an
internal failure (one line; the traceback with MECHSCOPE_DEBUG=1)."""

import subprocess
import sys

import pytest
import torch
from conftest import invoke_cli

import mechscope as ms
from mechscope.attribution import activation_patching, direct_logit_attribution, generate, rank_units

PROMPT = "The reliability of Wikipedia is very"


def run_main(monkeypatch, capsys, model, *argv):
    """Run the CLI in-process; `model` is what loading gives (a callable that fails: the model must not load)."""
    return invoke_cli(monkeypatch, capsys, *argv, load=model if callable(model) else lambda *args: model)


def not_loaded(*args):
    raise AssertionError("the model was loaded before the input was checked")


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- option parsing and bounds checked before the model loads ---------------------------------------

BEFORE_LOADING = [
    (["predict", PROMPT, "--k", "abc"], "error: --k 'abc' is not valid: input should be a valid integer"),
    (["predict", PROMPT, "--k=1.5"], "error: --k '1.5' is not valid"),
    (["predict", PROMPT, "--k"], "error: option --k needs a value"),
    (["lens", PROMPT], "error: missing option '--target' / '-t' for 'mechscope lens'"),
    (["attribute", PROMPT], "error: missing option '--target' / '-t' for 'mechscope attribute'"),
    (["predict"], "error: missing argument 'text' for 'mechscope predict'"),
    (["neuron", "-1:5", PROMPT], "error: no such option '-1:5' for 'mechscope neuron'"),
    (["predict", PROMPT, "--bogus"], "error: no such option '--bogus' for 'mechscope predict'"),
    (["predict", PROMPT, "--kk", "3"], "did you mean --k?"),
    (["nosuch"], "error: no such command 'nosuch': valid commands are "),
    (["predict", PROMPT, "extra"], "error: got unexpected extra argument(s) (extra)"),
    (["index", "build", "--tokens", "1e12"], "error: --tokens '1e12' is not valid"),
    (["predict", PROMPT, "--k", "100000"], "error: --k 100000 is out of range: valid values are 1..1000"),
    (["predict", PROMPT, "--k", "0"], "error: --k 0 is out of range: valid values are 1..1000"),
    (["lens", PROMPT, "-t", " x", "--k", "51"], "error: --k 51 is out of range: valid values are 1..50"),
    (["attribute", PROMPT, "-t", " x", "--top", "-1"], "error: --top -1 is out of range: valid values are 1..1000"),
    (["attribute", PROMPT, "-t", " x", "--top", "0"], "error: --top 0 is out of range: valid values are 1..1000"),
    (["attribute", PROMPT, "-t", " x", "--vs", " y", "--rankings"], "error: --rankings explains the target's log-probability"),
    (["intervene", PROMPT, "--ablate", "1:1", "--k", "-5"], "error: --k -5 is out of range: valid values are 1..1000"),
    (["intervene", PROMPT, "--ablate", "1:1", "--generate", "-1"], "error: --generate -1 is out of range"),
]


@pytest.mark.parametrize(("argv", "message"), BEFORE_LOADING)
def test_bad_options_are_one_line_before_loading(monkeypatch, capsys, argv, message):
    code, out, err = run_main(monkeypatch, capsys, not_loaded, *argv)
    assert code == 2 and not out
    assert message in one_line(err)


def test_no_command_prints_the_help(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, not_loaded)
    assert code == 0 and "predict" in out + err and "lens" in out + err


# -- exit codes ------------------------------------------------------------------------------------


def test_exit_codes(monkeypatch, capsys, tiny_model):
    code, out, err = run_main(monkeypatch, capsys, tiny_model("llama"), "sites", "--json")
    assert code == 0 and "blocks.2.mlp.hook_post" in out and not err

    code, _, err = run_main(monkeypatch, capsys, tiny_model("llama"), "pattern", "9.0", "x")
    assert code == 2 and one_line(err).startswith("error: layer 9 out of range")

    def broken(*args):
        raise RuntimeError("something broke\n  on a second line")

    code, _, err = run_main(monkeypatch, capsys, broken, "sites")
    assert code == 1
    assert one_line(err) == (
        "internal error: RuntimeError: something broke on a second line (set MECHSCOPE_DEBUG=1 for the traceback)"
    )
    monkeypatch.setenv("MECHSCOPE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        run_main(monkeypatch, capsys, broken, "sites")


def test_entry_point_exit_code_for_an_option_that_does_not_parse():
    done = subprocess.run(
        [sys.executable, "-m", "mechscope.cli", "predict", "hi", "--k", "ten"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and not done.stdout
    assert one_line(done.stderr).startswith("error: --k 'ten' is not valid")


# -- bounds that need the model (its context, vocabulary, or the prompt's length) -----------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["intervene", PROMPT, "--ablate", "29:288", "--generate", "100000"],
            "--generate 100000 is out of range: valid values are 0..8186 (the model's context of 8192 tokens minus the prompt",
        ),
        (["lens", PROMPT, "-t", " x", "--pos", "6"], "position 6 out of range (--pos): the text has 6 tokens"),
        (["lens", PROMPT, "-t", " x", "--pos", "-7"], "valid positions are 0..5, or -6..-1 counting from the end"),
        (["attribute", PROMPT, "-t", " x", "--pos", "6"], "position 6 out of range (--pos)"),
        (["intervene", PROMPT, "--ablate", "1:1", "--position", "9"], "position 9 out of range (--position)"),
        (["attribute", PROMPT, "-t", " questionably unreliable"], "target ' questionably unreliable' is 3 tokens"),
        (["attribute", PROMPT, "-t", " questionably unreliable", "--rankings"], "target ' questionably unreliable' is 3"),
        (["attribute", PROMPT, "-t", " questionable", "--vs", " questionably unreliable"], "vs ' questionably unreliable' is 3"),
        (
            [
                "patch",
                "--clean",
                "The capital of France is",
                "--corrupt",
                "The capital of Italy is",
                "-t",
                " questionably unreliable",
            ],
            "target ' questionably unreliable' is 3 tokens [' question', 'ably', ' unreliable']",
        ),
    ],
)
def test_bounds_that_need_the_model(monkeypatch, capsys, smollm2, argv, message):
    code, out, err = run_main(monkeypatch, capsys, smollm2, *argv)
    assert code == 2 and not out
    assert message in one_line(err)


def test_k_is_bounded_by_a_small_vocabulary(monkeypatch, capsys, tiny_model):
    code, _, err = run_main(monkeypatch, capsys, tiny_model("llama"), "predict", "x", "--k", "500")
    message = "--k 500 is out of range: valid values are 1..100 (the model's vocabulary has 100 tokens)"
    assert code == 2 and message in one_line(err)


@pytest.mark.slow
def test_predict_labels_a_multi_token_target_by_its_first_token(monkeypatch, capsys, smollm2):
    code, out, _ = run_main(monkeypatch, capsys, smollm2, "predict", PROMPT, "-t", " questionably unreliable", "--k", "1")
    assert code == 0
    row = next(line for line in out.splitlines() if "questionably unreliable" in line)
    assert "' question'" in row and "(3)" in row  # first token, and the log-prob of all 3 tokens


# -- the Python API: one string is one target; an empty list or a list where one is needed is refused ---


@pytest.mark.slow
def test_one_string_is_one_target(smollm2):
    p = ms.predict(smollm2, PROMPT, targets=" questionable")
    assert [t.target for t in p.targets] == [" questionable"] and p.targets[0].n_tokens == 1
    lens = ms.logit_lens(smollm2, PROMPT, " questionable")
    assert lens.targets == [" questionable"] and lens.probs.shape == (31, 6, 1)


def test_lens_without_targets_gives_top_tokens(tiny_model):
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    lens = ms.logit_lens(model, ids)
    assert lens.probs.shape == (4, 4, 0) and lens.top_ids.shape == (4, 4, 5)
    last = model.run(ids).logits[0, -1].float().softmax(-1)
    assert torch.equal(lens.top_ids[-1, -1], last.topk(5).indices)


def test_lens_checks_positions_before_running(tiny_model, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(model, "run", not_loaded)
    with pytest.raises(ms.MechscopeError, match="position 4 out of range"):
        ms.logit_lens(model, torch.tensor([[5, 6, 7, 8]]), positions=[4])


@pytest.mark.parametrize(
    "call",
    [
        lambda m, ids, t: direct_logit_attribution(m, ids, t),
        lambda m, ids, t: direct_logit_attribution(m, ids, 5, vs=t),
        lambda m, ids, t: rank_units(m, ids, t),
        lambda m, ids, t: activation_patching(m, ids, ids.flip(-1), t, vs=6),
    ],
    ids=["dla", "dla vs", "rank_units", "activation_patching"],
)
def test_a_method_of_one_target_refuses_lists(tiny_model, call):
    model, ids = tiny_model("llama"), torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ms.MechscopeError, match=r"^no (target|vs) given \(an empty list\): give one (target|vs), a string"):
        call(model, ids, [])
    with pytest.raises(ms.MechscopeError, match=r"^(target|vs) must be one string or token id, got list \[5\]"):
        call(model, ids, [5])


def test_predict_and_intervene_take_no_targets(tiny_model):
    model, ids = tiny_model("llama"), torch.tensor([[5, 6, 7, 8]])
    assert ms.predict(model, ids, targets=[]).targets == [] and ms.predict(model, ids, targets=None).targets == []
    assert [t.id for t in ms.predict(model, ids, targets=7).targets] == [7]


def test_generate_refuses_more_tokens_than_the_context_holds(tiny_model):
    model = tiny_model("llama")  # context of 64 tokens
    with pytest.raises(
        ms.MechscopeError,
        match="max_new_tokens=61 does not fit: the model's context of 64 tokens leaves room for 60 after a prompt",
    ):
        generate(model, torch.tensor([[5, 6, 7, 8]]), [], max_new_tokens=61)


def test_patched_metric_takes_one_site_name_as_one_site(tiny_model):
    from mechscope.attribution.patching import patched_metric

    model, ids = tiny_model("llama"), torch.tensor([[5, 6, 7, 8]])
    one = patched_metric(model, ids, ids.flip(-1), 5, 6, sites="blocks.1.hook_resid_pre")
    assert one == patched_metric(model, ids, ids.flip(-1), 5, 6, sites=["blocks.1.hook_resid_pre"])
    with pytest.raises(ms.MechscopeError, match=r"^no sites given"):
        patched_metric(model, ids, ids.flip(-1), 5, 6, sites=[])
    with pytest.raises(ms.MechscopeError, match=r"^no positions given \(an empty list\)"):
        patched_metric(model, ids, ids.flip(-1), 5, 6, sites="blocks.1.hook_resid_pre", positions=[])
