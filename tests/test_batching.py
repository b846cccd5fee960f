"""Prompts of different lengths in one call: every result per text equals running that text alone, and
padding never reaches a cache or a statistic.

Every family runs (GPT-2's learned positions and the sliding windows of Mistral and Gemma 2/3
included, with sequences longer than the window), right-padded by mechscope and left-padded by the
caller with an attention mask. The independent side is each sequence run on its own.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_case

import mechscope
from mechscope.attribution import Intervention, attention_pattern, generate, neuron_activations
from mechscope.attribution.interventions import unit_means
from mechscope.models.tokens import pad

LENGTHS = (3, 8, 6, 1)
TEXTS = (
    "The reliability of Wikipedia is very",
    "Paris",
    "The committee postponed its final decision until the researchers had finished analysing every sample.",
)


def sequences(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in LENGTHS]


def tol(model: mechscope.Model) -> dict:
    """float64 tiny models agree to rounding; float32 models to ~1e-6 of the scale of their values."""
    if next(model.hf.parameters()).dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10)
    return dict(rtol=1e-4, atol=1e-4)  # float32, e.g. left padding runs masked SDPA instead of the causal flag


def rows_of(value: torch.Tensor, mask_row: torch.Tensor, pattern: bool) -> torch.Tensor:
    cols = mask_row.nonzero()[:, 0]
    return value[:, cols][:, :, cols] if pattern else value[cols]


def in_float32(model: mechscope.Model) -> mechscope.Model:
    """The same model in float32. HF's eager kernels softmax float64 scores in float32, where float64's
    most negative mask value becomes -inf: a query with no visible key (left padding) gives NaN, in HF
    itself. Left padding and generation are tested in float32, as models run."""
    return mechscope.load(model.hf, dtype=torch.float32)


@pytest.mark.parametrize("side", ["right", "left"])
def test_run_equals_each_sequence_alone(tiny, side):
    model, seqs = (tiny.model if side == "right" else in_float32(tiny.model)), sequences()
    tokens = pad(seqs, model.pad_id, side)
    out = model.run(tokens.ids, read=model.site_names(), logits=True, attention_mask=tokens.mask)
    assert torch.equal(out.mask, tokens.mask)
    for i, seq in enumerate(seqs):
        alone = model.run(seq, read=model.site_names(), logits=True)
        keep = tokens.mask[i]
        torch.testing.assert_close(out.logits[i][keep], alone.logits[0], **tol(model))
        for name, value in alone.cache.items():
            pattern = name.endswith("hook_pattern")
            torch.testing.assert_close(rows_of(out.cache[name][i], keep, pattern), value[0], **tol(model), msg=name)
            padded = out.cache[name][i]
            if pattern:  # padded queries and keys are zero
                assert (padded[:, ~keep].abs().sum() + padded[:, :, ~keep].abs().sum()) == 0, name
            else:
                assert (padded[~keep] == 0).all(), name


def test_last_only_takes_each_sequences_last_token(tiny):
    model, seqs = tiny.model, sequences(1)
    out = model.run(seqs, last_only=True)  # a list of id sequences of different lengths
    assert out.logits.shape == (len(seqs), 1, model.config.vocab_size)
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(out.logits[i, 0], model.run(seq).logits[0, -1], **tol(model))


def test_functions_taking_texts_accept_different_lengths():
    case = tiny_case("gemma3")  # sliding window of 4, sequences up to 8
    model, seqs = case.model, sequences(2)
    ids = [s.tolist() for s in seqs]
    for batch, alone in zip(
        mechscope.predict(model, ids, targets=[5, 7]), [mechscope.predict(model, s) for s in ids], strict=True
    ):
        assert [t.id for t in batch.top] == [t.id for t in alone.top]
    lenses = mechscope.logit_lens(model, ids, [5])
    for seq, lens in zip(seqs, lenses, strict=True):
        alone = mechscope.logit_lens(model, seq, [5])
        torch.testing.assert_close(lens.probs, alone.probs, **tol(model))
        assert lens.positions == list(range(len(seq)))
    for seq, tv in zip(seqs, neuron_activations(model, ids, 1, 3), strict=True):
        torch.testing.assert_close(tv.values, neuron_activations(model, seq, 1, 3).values)
    for seq, ap in zip(seqs, attention_pattern(model, ids, 0, 1), strict=True):
        torch.testing.assert_close(ap.pattern, attention_pattern(model, seq, 0, 1).pattern)
    rankings = mechscope.rank_units(model, ids[:2], 5, top=3)
    assert [r.rows for r in rankings] == [mechscope.rank_units(model, s, 5, top=3).rows for s in ids[:2]]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_generate_a_batch(family):
    model = in_float32(tiny_case(family).model)
    ids = [s.tolist() for s in sequences(3)]
    ablate = [Intervention.zero(["1:3", "0.1"])]
    batch = generate(model, ids, ablate, max_new_tokens=6)
    for seq, g in zip(ids, batch, strict=True):
        alone = generate(model, seq, ablate, max_new_tokens=6)
        assert (g.before_ids, g.after_ids) == (alone.before_ids, alone.after_ids)
    at_positions = generate(model, ids, [Intervention.scale("1:3", 5.0, positions=[-1])], max_new_tokens=4)
    assert at_positions[0] == generate(model, ids[0], [Intervention.scale("1:3", 5.0, positions=[-1])], max_new_tokens=4)


def test_means_leave_padding_out():
    model = tiny_case("llama").model
    seqs = sequences(4)
    batched = unit_means(model, mechscope.attribution.units.parse_units(["1:3", "2.1"], model), [s.tolist() for s in seqs])
    posts = torch.cat([model.run(s, read=["blocks.1.mlp.hook_post"]).cache["blocks.1.mlp.hook_post"][0, :, 3] for s in seqs])
    zs = torch.cat([model.run(s, read=["blocks.2.attn.hook_z"]).cache["blocks.2.attn.hook_z"][0, :, 1] for s in seqs])
    torch.testing.assert_close(batched[0], posts.mean())
    torch.testing.assert_close(batched[1], zs.mean(0))


@pytest.mark.slow
def test_smollm2_texts_of_different_lengths(smollm2):
    predictions = mechscope.predict(smollm2, list(TEXTS), k=5, targets=" questionable")
    for text, p in zip(TEXTS, predictions, strict=True):
        alone = mechscope.predict(smollm2, text, k=5, targets=" questionable")
        assert [t.id for t in p.top] == [t.id for t in alone.top] and p.tokens == alone.tokens
        assert p.targets[0].prob == pytest.approx(alone.targets[0].prob, rel=1e-4)
    for text, lens in zip(TEXTS, mechscope.logit_lens(smollm2, list(TEXTS), " questionable"), strict=True):
        torch.testing.assert_close(lens.probs, mechscope.logit_lens(smollm2, text, " questionable").probs, **tol(smollm2))
    for text, g in zip(TEXTS, generate(smollm2, list(TEXTS), [Intervention.zero("29:288")], max_new_tokens=8), strict=True):
        alone = generate(smollm2, text, [Intervention.zero("29:288")], max_new_tokens=8)
        assert (g.before_ids, g.after_ids) == (alone.before_ids, alone.after_ids)


def test_to_ids_still_needs_one_length():
    model = tiny_case("llama").model
    with pytest.raises(mechscope.MechscopeError, match="different lengths"):
        model.to_ids([[5, 6], [5, 6, 7]])
    with pytest.raises(mechscope.MechscopeError, match="attention_mask of shape"):
        model.run(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 2))
