"""predict and logit_lens, checked against plain HF computations."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import mechscope as ms

PROMPT = "The reliability of Wikipedia is very"


@pytest.fixture(scope="module")
def model():
    return ms.load()


@pytest.fixture(scope="module")
def hf_out(model):
    ids = model.to_ids(PROMPT)
    with torch.inference_mode():
        return ids, model.hf(ids, output_hidden_states=True)


def test_predict_matches_hf_softmax(model, hf_out):
    ids, out = hf_out
    probs = out.logits[0, -1].softmax(-1)
    p = ms.predict(model, PROMPT, k=10, targets=[" questionable", " high"])
    assert p.tokens == model.to_str_tokens(ids[0])
    assert [t.id for t in p.top] == probs.topk(10).indices.tolist()
    assert [t.prob for t in p.top] == pytest.approx(probs.topk(10).values.tolist(), rel=1e-5)
    assert all(a.prob >= b.prob for a, b in zip(p.top, p.top[1:], strict=False))
    questionable = p.targets[0]
    assert questionable.prob == pytest.approx(float(probs[questionable.id]), rel=1e-5)
    assert questionable.rank == int((probs > probs[questionable.id]).sum()) + 1
    assert questionable.rank == [t.id for t in p.top].index(questionable.id) + 1
    assert p.targets[1].rank == 1 and p.targets[1].token == " high"


def test_multi_token_target_full_logprob(model):
    target = " questionable at best"
    tids = model.token_ids(target)
    assert len(tids) > 1
    p = ms.predict(model, PROMPT, targets=[target])
    ids = model.to_ids(PROMPT)[0]
    full = torch.cat([ids, torch.tensor(tids)])[None]
    with torch.inference_mode():
        logprobs = model.hf(full).logits[0].log_softmax(-1)
    expected = sum(float(logprobs[len(ids) - 1 + i, t]) for i, t in enumerate(tids))
    score = p.targets[0]
    assert score.n_tokens == len(tids)
    assert score.full_logprob == pytest.approx(expected, abs=1e-4)
    assert score.logprob == pytest.approx(float(logprobs[len(ids) - 1, tids[0]]), abs=1e-5)


def test_logit_lens_matches_hand_written_hf(model, hf_out):
    ids, out = hf_out
    lens = ms.logit_lens(model, PROMPT, [" questionable"], k=5)
    n_layers = model.dims.n_layers
    assert lens.rows == ["embed"] + [str(layer) for layer in range(n_layers)]
    assert lens.probs.shape == (n_layers + 1, ids.shape[1], 1)
    tid = lens.target_ids[0]
    with torch.inference_mode():
        for row, hidden in enumerate(out.hidden_states[:-1]):  # HF's last hidden state is already normed
            expected = model.hf.lm_head(model.hf.model.norm(hidden[0])).softmax(-1)
            torch.testing.assert_close(lens.probs[row, :, 0], expected[:, tid], rtol=1e-4, atol=1e-9)
        final = out.logits[0].softmax(-1)
    torch.testing.assert_close(lens.probs[-1, :, 0], final[:, tid], rtol=1e-4, atol=1e-9)
    assert lens.top_ids[-1, -1].tolist() == final[-1].topk(5).indices.tolist()
    assert lens.top_tokens[-1][-1][0] == " high"
    is_top = lens.top_ids[:, :, 0] == tid
    assert torch.equal(is_top, lens.ranks[:, :, 0] == 1)


def test_logit_lens_mid_and_positions(model):
    lens = ms.logit_lens(model, PROMPT, [" questionable", " low"], mid=True, positions=[-1, 0])
    assert lens.rows[:4] == ["embed", "0 mid", "0", "1 mid"]
    assert len(lens.rows) == 2 * model.dims.n_layers + 1
    assert lens.positions == [5, 0]
    assert lens.probs.shape == (len(lens.rows), 2, 2)
    assert lens.sites[1] == "blocks.0.hook_resid_mid"


def test_logit_lens_applies_final_softcap():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0, max_position_embeddings=64,
    )  # fmt: skip
    model = ms.load(Gemma2ForCausalLM(config))
    ids = torch.randint(0, 64, (1, 7))
    lens = ms.logit_lens(model, ids, [5, 9])
    with torch.inference_mode():
        final = model.hf(ids).logits[0].softmax(-1)
    torch.testing.assert_close(lens.probs[-1], final[:, [5, 9]], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: ms.predict(m, ""), "empty text"),
        (lambda m: ms.predict(m, "   "), "empty text"),
        (lambda m: ms.predict(m, PROMPT, targets=[""]), "tokenises to nothing"),
        (lambda m: ms.predict(m, PROMPT, k=0), "k=0"),
        (lambda m: ms.predict(m, "word " * 9000), "longer than the model's context of 8192"),
        (lambda m: ms.logit_lens(m, PROMPT, [" x"], positions=[6]), "position 6 out of range"),
        (lambda m: ms.logit_lens(m, PROMPT, [" x"], positions=[-7]), "valid positions are 0..5"),
        (lambda m: ms.predict(m, PROMPT, targets=[10**6]), "token id 1000000 out of range"),
    ],
)
def test_bad_input_gets_one_line(model, call, message):
    with pytest.raises(ms.MechscopeError, match=message) as err:
        call(model)
    assert "\n" not in str(err.value)


def test_unembed_of_the_last_block_is_the_models_logits(tiny):
    """Every family: the logit lens's last row goes through the model's own final norm and unembedding."""
    ids = tiny.ids[:1]
    lens = ms.logit_lens(tiny.model, ids, [3, 4])
    with torch.inference_mode():
        final = tiny.reference(ids).logits[0].softmax(-1)
    torch.testing.assert_close(lens.probs[-1], final[:, [3, 4]].to(lens.probs.dtype), rtol=1e-5, atol=1e-9)


def test_lens_figure_shows_tokens_as_they_are(model):
    """plotly reads tags in labels and hover text: a token like '<b' must come out escaped, not as markup."""
    from mechscope.viz import lens_figure

    lens = ms.logit_lens(model, "x <b>bold</b> & <br> y", [" <"], k=3)
    heatmap = lens_figure(lens).data[0]
    shown = " ".join([*heatmap.x, *(cell for row in heatmap.hovertext for cell in row)])
    assert shown.count("<br>") == 2 * len(lens.rows) * len(lens.positions)  # the line breaks the figure puts in
    assert "&lt;" in shown and "<" not in shown.replace("<br>", "") and ">" not in shown.replace("<br>", "")
