"""Targets and token strings on tokenizers of every kind, built here from a few sentences (nothing is downloaded).

- byte-level BPE (GPT-2, SmolLM2): a space is part of the next token (`Ġ`), every byte has a symbol;
- Metaspace with a prepended `▁` (SentencePiece converted to a fast tokenizer);
- Gemma-style: spaces become `▁`, nothing prepended, raw bytes as `<0xNN>` tokens;
- Phi-3 / Llama-2-style from GGUF: `▁` prepended by the normalizer, a `▁▁` merge, and a decoder that
  strips the first space of a text, so that `" Paris"` alone tokenises to `['▁', '▁Paris']` and
  decoding one token at a time loses its space.

The independent side is the tokenizer itself: the ids of prompt + target, and decoding whole texts.
"""

from __future__ import annotations

import codecs
import functools
import json

import pytest
import torch
import transformers as tf
from conftest import _common
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import mechscope
from mechscope.attribution import direct_logit_attribution
from mechscope.models.tokens import TokenText, continuation_ids

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Paris and Rome are capitals. The capital of Spain is Madrid.",
    "total += arr[i] * w[j]  # indexing, spaces  and  double  spaces",
] * 20
BYTES = [f"<0x{b:02X}>" for b in range(256)]
PROMPT = "The capital of France is"
KINDS = ("byte_level", "metaspace", "gemma", "phi3")


def _trained(tokenizer: Tokenizer, alphabet=(), special=("<s>", "</s>", "<unk>")) -> Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(special), initial_alphabet=list(alphabet))
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _edited(tok: Tokenizer, edit) -> Tokenizer:
    spec = json.loads(tok.to_str())
    edit(spec["model"])
    return Tokenizer.from_str(json.dumps(spec))


def _with_vocab(tok: Tokenizer, pieces) -> Tokenizer:
    """The tokenizer with `pieces` in its model's vocabulary (as SentencePiece keeps its `<0xNN>` byte pieces)."""
    return _edited(tok, lambda model: model["vocab"].update({p: len(model["vocab"]) + i for i, p in enumerate(pieces)}))


def _with_last_merge(tok: Tokenizer, a: str, b: str) -> Tokenizer:
    """The tokenizer with one more merge, of the lowest priority (as GGUF vocabularies of Phi-3 have `▁▁`)."""

    def edit(model):
        model["vocab"][a + b] = len(model["vocab"])
        model["merges"].append([a, b] if model["merges"] and isinstance(model["merges"][0], list) else f"{a} {b}")

    return _edited(tok, edit)


@functools.cache
def tokenizer(kind: str) -> tf.PreTrainedTokenizerFast:
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok = _trained(tok, pre_tokenizers.ByteLevel.alphabet())
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        tok = _trained(tok)
    else:  # SentencePiece BPE with byte fallback, spaces as ▁
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        steps = [normalizers.Prepend("▁")] if kind == "phi3" else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        # Trained as SentencePiece trains (pieces start at a ▁, never span two words), then run as the
        # converted tokenizers run: with no pre-tokenizer, or Gemma's split on a space, which the
        # normalizer has already replaced.
        tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
        tok = _with_vocab(_trained(tok), BYTES)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous") if kind == "gemma" else None
        parts = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(parts + ([decoders.Strip(" ", 1, 0)] if kind == "phi3" else []))
        if kind == "phi3":
            tok = _with_last_merge(tok, "▁", "▁")
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if kind == "phi3":
        assert "▁▁" in fast.get_vocab()  # the merge that makes a prepended space a token of its own
    return fast


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def test_target_is_what_follows_the_prompt(kind):
    tok = tokenizer(kind)
    for target in (" Paris", " Rome", " Madrid", " capital"):
        ids = continuation_ids(tok, target, PROMPT)
        assert encode(tok, PROMPT) + ids == encode(tok, PROMPT + target)
        assert tok.convert_ids_to_tokens(ids[0]) not in ("▁", "Ġ")
        assert TokenText(tok)(ids)[0] == target[: len(TokenText(tok)(ids)[0])]


def test_target_without_prompt_text_drops_a_prepended_space_token(kind):
    tok = tokenizer(kind)
    alone = encode(tok, " Paris")
    if kind == "phi3":  # the fault this guards against: " Paris" alone starts with a lone ▁
        assert tok.convert_ids_to_tokens(alone)[0] in ("▁", "▁▁")
    ids = continuation_ids(tok, " Paris")
    assert ids == continuation_ids(tok, " Paris", PROMPT)
    assert "".join(TokenText(tok)(ids)) == " Paris"


def test_token_strings_keep_their_space_and_rebuild_the_text(kind):
    tok = tokenizer(kind)
    text = "The capital of France is Paris"
    strings = TokenText(tok)(encode(tok, text))
    assert " Paris" in strings and " capital" in strings  # the space is kept on each token
    joined = "".join(strings)
    assert joined.lstrip(" ") == text  # a prepended ▁ is shown as the space it is
    if kind in ("phi3", "metaspace"):
        assert [tok.decode([i]) for i in encode(tok, text)][-1] == "Paris"  # what decoding one id gives


def test_bytes_of_one_character_stay_distinguishable(kind):
    tok = tokenizer(kind)
    text = "é😀\u200b"  # two- and four-byte characters and a zero-width space, none in the training text
    ids = encode(tok, text)
    strings = TokenText(tok)(ids)
    assert len(set(strings)) == len(set(ids))  # different tokens never look alike
    assert "\ufffd" not in "".join(strings)
    if kind != "metaspace":  # (it has no byte pieces: unknown characters are <unk>)
        # pieces of one character show as \xNN escapes, which put back together give the character
        assert any("\\x" in s for s in strings)
        assert codecs.escape_decode("".join(strings).lstrip(" ").encode())[0].decode() == text


def tiny_model(kind: str) -> mechscope.Model:
    tok = tokenizer(kind)
    torch.manual_seed(0)
    config = tf.LlamaConfig(**_common(vocab_size=len(tok), num_key_value_heads=2))
    hf = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    return mechscope.load(hf, tokenizer=tok)


def test_predict_and_dla_use_the_continuation(kind):
    model = tiny_model(kind)
    tok = tokenizer(kind)
    p = mechscope.predict(model, PROMPT, targets=[" Paris", " Rome"])
    paris = continuation_ids(tok, " Paris", PROMPT)
    assert p.targets[0].id == paris[0] and p.targets[0].n_tokens == len(paris)
    assert p.targets[0].token.endswith("Paris") or len(paris) > 1
    if len(paris) == 1 and len(continuation_ids(tok, " Rome", PROMPT)) == 1:
        a = direct_logit_attribution(model, PROMPT, " Paris", vs=" Rome")  # used to refuse: both were '▁'
        assert abs(a.total - a.logit) < 1e-6  # DLA's grids are float32
    assert "".join(p.tokens).lstrip(" ") == PROMPT
