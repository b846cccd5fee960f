"""Per-token activations equal independent PyTorch computations on SmolLM2; the heatmaps show every token, safely,
and leave the first positions (the index's rule) out of their scale."""

import html

import pytest
import torch
from rich.console import Console

from mechscope.attribution.activations import (
    TokenValues,
    attention_pattern,
    direction_activations,
    head_activations,
    neuron_activations,
    unit_activations,
)
from mechscope.errors import MechscopeError
from mechscope.index import IndexSettings
from mechscope.viz.report import write_report
from mechscope.viz.shown import token_label
from mechscope.viz.token_heatmap import (
    attention_pattern_figure,
    attention_pattern_png,
    shared_vmax,
    token_heatmap_html,
    token_heatmap_png,
    token_heatmap_text,
    token_scale,
    token_stats_table,
    value_rgb,
)

TEXT = "The reliability of Wikipedia is very"
TRICKY = 'Say <b>&amp; "hi"\n\tthen $x$ done'


def _capture_input(module, ids, model):
    """The input of `module` on a plain HF forward pass, via a forward pre-hook (mechscope not involved)."""
    seen = {}
    handle = module.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            model.hf(ids, use_cache=False)
    finally:
        handle.remove()
    return seen["x"][0]


@pytest.mark.parametrize("layer, neuron", [(3, 123), (29, 1535), (-1, 0)])
def test_neuron_matches_down_proj_input(smollm2, layer, neuron):
    tv = neuron_activations(smollm2, TEXT, layer, neuron)
    ids = smollm2.to_ids(TEXT)
    x = _capture_input(smollm2.hf.model.layers[layer].mlp.down_proj, ids, smollm2)
    torch.testing.assert_close(tv.values, x[:, neuron].float(), rtol=1e-5, atol=1e-6)
    assert tv.tokens == smollm2.to_str_tokens(ids[0])
    assert tv.label == f"neuron {layer % 30}:{neuron}"
    assert tv.argmax == int(x[:, neuron].argmax()) and tv.argmax_token == tv.tokens[tv.argmax]
    assert tv.max == pytest.approx(float(x[:, neuron].max()), rel=1e-5)
    assert tv.mean == pytest.approx(float(x[:, neuron].mean()), rel=1e-4, abs=1e-6)


def test_head_matches_o_proj_input_slice(smollm2):
    layer, head, d_head = 5, 3, smollm2.dims.d_head
    ids = smollm2.to_ids(TEXT)
    o_proj = smollm2.hf.model.layers[layer].self_attn.o_proj
    z = _capture_input(o_proj, ids, smollm2)[:, head * d_head : (head + 1) * d_head]
    tv = head_activations(smollm2, TEXT, layer, head)
    torch.testing.assert_close(tv.values, z.norm(dim=-1).float(), rtol=1e-5, atol=1e-6)
    out = head_activations(smollm2, TEXT, layer, head, measure="out")
    written = z @ o_proj.weight[:, head * d_head : (head + 1) * d_head].T
    torch.testing.assert_close(out.values, written.norm(dim=-1).float(), rtol=1e-4, atol=1e-5)
    assert unit_activations(smollm2, TEXT, f"{layer}.{head}").values.equal(tv.values)


def test_direction_is_a_dot_product_with_the_unit_direction(smollm2):
    direction = torch.randn(smollm2.dims.d_model, generator=torch.Generator().manual_seed(0)) * 7
    tv = direction_activations(smollm2, TEXT, "blocks.10.hook_resid_post", direction)
    with torch.no_grad():
        hidden = smollm2.hf(smollm2.to_ids(TEXT), output_hidden_states=True).hidden_states[11][0]
    expected = hidden.double() @ (direction.double() / direction.double().norm())
    torch.testing.assert_close(tv.values.double(), expected, rtol=1e-4, atol=1e-4)


def test_several_texts_give_one_result_each(smollm2):
    texts = [TEXT, "A much longer text, which tokenises to more tokens than the first one does."]
    tvs = neuron_activations(smollm2, texts, 3, 123)
    assert isinstance(tvs, list) and len(tvs) == 2
    for text, tv in zip(texts, tvs, strict=True):
        # One padded batch: the shorter text runs with an attention mask, through another SDPA path than
        # alone, so float32 rounding differs (observed 3e-8 on values of 0.08)
        torch.testing.assert_close(tv.values, neuron_activations(smollm2, text, 3, 123).values, rtol=1e-5, atol=1e-6)
        assert "".join(tv.tokens) == text


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: neuron_activations(m, TEXT, 3, 1536), "neuron 1536 out of range for layer 3: valid neurons are 0..1535"),
        (lambda m: neuron_activations(m, TEXT, 30, 0), "layer 30 out of range: valid layers are 0..29"),
        (lambda m: head_activations(m, TEXT, 2, 9), "head 9 out of range for layer 2: valid heads are 0..8"),
        (lambda m: head_activations(m, TEXT, 2, -1), "head -1 out of range for layer 2: valid heads are 0..8"),
        (lambda m: head_activations(m, TEXT, 2, 1, measure="q"), "unknown head measure 'q': valid measures are z, out"),
        (lambda m: neuron_activations(m, TEXT, 3, 1.5), "neuron 1.5 is not an integer"),
        (lambda m: direction_activations(m, TEXT, "blocks.3.hook_resid_post", [1.0, 2.0]), "give a vector of 576 numbers"),
        (lambda m: direction_activations(m, TEXT, "blocks.3.hook_resid_post", torch.zeros(576)), "finite non-zero vector"),
        (lambda m: direction_activations(m, TEXT, "blocks.3.attn.hook_pattern", torch.ones(576)), "[batch, pos, width] site"),
        (lambda m: attention_pattern(m, TEXT, 40, 0), "layer 40 out of range"),
    ],
)
def test_bad_input_is_one_line(smollm2, call, message):
    with pytest.raises(MechscopeError) as err:
        call(smollm2)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_attention_pattern_rows_are_distributions(smollm2):
    ap = attention_pattern(smollm2, TEXT, 5, 3)
    n = len(ap.tokens)
    assert ap.pattern.shape == (n, n)
    torch.testing.assert_close(ap.pattern.sum(-1), torch.ones(n), rtol=1e-4, atol=1e-4)
    assert float(ap.pattern.triu(1).abs().max()) == 0


@pytest.mark.slow
def test_neuron_heatmap_scale_ignores_the_first_positions(smollm2, tmp_path):
    """29:288 peaks at position 0 of any text (about 62): that position must not set the scale or the max."""
    texts = ["The reliability of Wikipedia is very questionable.", "Critics say the evidence is weak."]
    values = neuron_activations(smollm2, texts, 29, 288)
    assert all(tv.argmax == 0 and tv.max > 55 for tv in values)  # the outlier the views leave out
    skip = IndexSettings.skip
    scale = token_scale(values)
    assert scale.skip == skip == 4 and scale.vmax == max(float(tv.values[skip:].abs().max()) for tv in values) < 45
    console = Console(record=True, width=140, color_system="truecolor", force_terminal=True)
    console.print(token_stats_table(values))
    table = console.export_text()
    for tv in values:
        top = skip + int(tv.values[skip:].argmax())
        assert f"{top}:{token_label(tv.tokens[top])}" in table and f"{tv.max:.4g}" in table  # max, and position 0 apart
    page = token_heatmap_html(values)
    assert page.count("class='ms-tok skip'") == 2 * skip + 1 and "not scored" in page  # and the legend's sample
    token_heatmap_png(values, tmp_path / "n.png")


# -- rendering (synthetic values: no model needed) --------------------------------------------------

TOKENS = ["Say", " <b>", "&amp;", ' "hi"', "\n", "\t", "then", " $x$", " done"]
VALUES = torch.tensor([0.0, 1.5, -2.0, 0.25, 3.0, -0.5, 0.0, 2.0, -3.0])


def _tv(label="neuron 3:123"):
    return TokenValues(list(TOKENS), VALUES.clone(), label)


def test_colour_scale_is_diverging_and_legible():
    assert value_rgb(0.0, 1.0) == (255, 255, 255)
    r, g, b = value_rgb(1.0, 1.0)
    assert r > b and r > g
    r, g, b = value_rgb(-1.0, 1.0)
    assert b > r
    assert value_rgb(5.0, 1.0) == value_rgb(1.0, 1.0)  # clipped at vmax


def test_scale_leaves_out_the_first_positions_and_is_one_sided_without_negatives():
    scale = token_scale(_tv())
    assert scale.skip == 4 and scale.vmax == 3.0 and not scale.one_sided  # |-3| at position 8; 3.0 at 4 is scored
    assert token_scale(_tv()._replace(values=torch.tensor([9.0, 9, 9, 9, 1, 2, 0, 2, 1]))) == (2.0, True, 4)
    assert token_scale(_tv(), skip=0).vmax == 3.0 and token_scale(_tv(), skip=0).skip == 0
    short = TokenValues(["a", "b"], torch.tensor([5.0, -1.0]), "")  # nothing beyond the first positions: all count
    assert token_scale(short) == (5.0, False, 0)
    assert shared_vmax(_tv()._replace(values=torch.tensor([50.0, 0, 0, 0, 1, 2, 0, 2, -1]))) == 2.0


def test_terminal_text_shows_every_token():
    tv = _tv()
    text = token_heatmap_text([tv, tv._replace(label="second")])
    plain = text.plain
    for token in TOKENS:
        assert token.replace("\n", "↵\n").replace("\t", "→") in plain
    assert "↵" in plain and "→" in plain and "second" in plain
    simple = token_heatmap_text(TokenValues(["The", " cat"], torch.tensor([1.0, -1.0]), ""), legend=False, labels=False)
    assert simple.plain == "The cat"
    console = Console(record=True, width=120, color_system="truecolor", force_terminal=True)
    console.print(text)
    console.print(token_stats_table(tv))
    out = console.export_text()
    assert "dim: positions 0–3 of each text not scored" in out
    assert "│   3 │ 4:'↵' │  0.3 │  -3 │     1.5 │" in out and "over positions 4.." in out  # max over 0..3 apart


def test_html_escapes_tokens_and_shows_values(tmp_path):
    snippet = token_heatmap_html(_tv())
    assert " &lt;b&gt;" in snippet and "&amp;amp;" in snippet and "<b>" not in snippet
    for pos, (token, value) in enumerate(zip(TOKENS, VALUES.tolist(), strict=True)):
        tip = f"pos {pos} {token_label(token)} = {value:.4g}" + (" (not scored)" if pos < 4 else "")
        assert f'title="{html.escape(tip, quote=True)}"' in snippet
    assert snippet.count("class='ms-tok'") == len(TOKENS) - 4 and snippet.count("class='ms-tok skip'") == 4 + 1  # + legend
    assert "linear-gradient" in snippet and "-3" in snippet and "not scored" in snippet  # the legend, with the scale's ends
    page = write_report(tmp_path / "r.html", "tokens", [("neuron 3:123", snippet)]).read_text()
    assert snippet in page


def test_pngs_are_pngs(tmp_path):
    path = token_heatmap_png([_tv(), _tv("other")], tmp_path / "tokens.png", title="neuron $3$")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pattern = torch.tril(torch.rand(len(TOKENS), len(TOKENS)))
    pattern = pattern / pattern.sum(-1, keepdim=True)
    path = attention_pattern_png(TOKENS, tmp_path / "attn.png", pattern=pattern, title="head 5.3")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_figure_labels_and_hover():
    pattern = torch.eye(len(TOKENS))
    fig = attention_pattern_figure(TOKENS, pattern, title="head 5.3")
    heatmap = fig.data[0]
    assert len(set(heatmap.x)) == len(TOKENS)  # repeated tokens stay apart
    assert "&lt;b&gt;" in heatmap.x[1] and "<b>" not in "".join(heatmap.x)
    assert heatmap.hovertext[1][1].endswith(": 1 (key not scored: beyond the scale)") and "query 1:" in heatmap.hovertext[1][1]
