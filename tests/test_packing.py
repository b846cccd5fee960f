"""Packing: shapes, start tokens, separators, document ids, reproducible shuffling, limits and bad input.

Most tests use a tiny word-level tokenizer built in memory (token `wK` has id K + 3), so that every
token of every document can be checked; one packs the built-in corpus with SmolLM2's own tokenizer.
"""

import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mechscope.data import Contexts, Corpus, corpus, pack, special_tokens
from mechscope.data.packing import shuffled
from mechscope.errors import MechscopeError
from mechscope.models.load import converted_gguf, default_gguf

UNK, BOS, EOS = 0, 1, 2
VOCAB = {"<unk>": UNK, "<s>": BOS, "</s>": EOS, **{f"w{k}": k + 3 for k in range(200)}}


def word_tokenizer(adds_bos: bool = False, eos: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer; with `adds_bos` it puts <s> in front of text, as Llama 2 and Gemma do."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>" if eos else None, unk_token="<unk>")


def word_corpus(n_docs: int = 60, seed: int = 0) -> Corpus:
    """Documents of 0 to 60 random words (some empty), so that many span several contexts."""
    rng = random.Random(seed)
    texts = [" ".join(f"w{rng.randrange(200)}" for _ in range(rng.choice([0, 1, 5, 20, 60]))) for _ in range(n_docs)]
    return Corpus("test:words", lambda: ((f"doc{i}", t) for i, t in enumerate(texts)))


@pytest.fixture(scope="module")
def words():
    return word_tokenizer()


def stream_length(c: Corpus, tokenizer) -> int:
    """Tokens in the packed stream: every document's, and a separator between each two non-empty ones."""
    lengths = [len(tokenizer(d.text, add_special_tokens=False).input_ids) for d in c.documents()]
    return sum(lengths) + sum(n > 0 for n in lengths) - 1


def check_packed(batches: list[Contexts], c: Corpus, tokenizer, ctx_len: int, batch_size: int) -> list[int]:
    """Check every invariant of packed batches; return the document ids in the order they were packed."""
    start, sep = special_tokens(tokenizer)
    assert [b.start for b in batches] == [i * batch_size for i in range(len(batches))]
    assert all(len(b.tokens) == batch_size for b in batches[:-1]) and 1 <= len(batches[-1].tokens) <= batch_size
    tokens, docs = torch.cat([b.tokens for b in batches]), torch.cat([b.docs for b in batches])
    assert tokens.dtype == torch.int64 and docs.dtype == torch.int32 and tokens.shape == docs.shape
    assert tokens.shape[1] == ctx_len and (tokens[:, 0] == start).all() and (docs[:, 0] == -1).all()
    stream, owners = tokens[:, 1:].flatten(), docs[:, 1:].flatten()  # contexts are consecutive cuts of one stream
    assert torch.equal(owners == -1, stream == sep)  # separators are exactly the -1 positions
    runs, lengths = torch.unique_consecutive(owners, return_counts=True)
    assert runs[0] != -1 and (runs[1::2] == -1).all() and (lengths[1::2] == 1).all()  # doc, sep, doc, sep, ...
    order = runs[::2].tolist()
    assert len(set(order)) == len(order)  # each document once, in one piece
    texts = {d.id: d.text for d in c.documents()}
    pieces = torch.split(stream, lengths.tolist())[::2]
    for i, (doc, piece) in enumerate(zip(order, pieces, strict=True)):
        expected = tokenizer(texts[doc], add_special_tokens=False).input_ids
        assert piece.tolist() == (expected if i < len(order) - 1 else expected[: len(piece)])  # the last may be cut
    return order


def test_special_tokens():
    assert special_tokens(word_tokenizer()) == (EOS, EOS)  # no BOS by default: contexts start like the stream does
    assert special_tokens(word_tokenizer(adds_bos=True)) == (BOS, EOS)
    assert special_tokens(word_tokenizer(adds_bos=True, eos=False)) == (BOS, BOS)
    bare = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer()._tokenizer)
    with pytest.raises(MechscopeError, match="no EOS or BOS"):
        special_tokens(bare)


@pytest.mark.parametrize("adds_bos", [False, True])
def test_source_order_packs_every_document_in_turn(adds_bos):
    tok, c = word_tokenizer(adds_bos), word_corpus()
    batches = list(pack(c, tok, 16, seed=None, batch_size=4))
    order = check_packed(batches, c, tok, 16, 4)
    assert order == [d.id for d in c.documents() if d.text][: len(order)]
    assert sum(len(b.tokens) for b in batches) == stream_length(c, tok) // 15  # only the final partial context is dropped


def test_shuffled_packing_is_reproducible(words):
    c = word_corpus()
    first = list(pack(c, words, 32, seed=1, batch_size=3))
    order = check_packed(first, c, words, 32, 3)
    assert order != sorted(order)
    again = list(pack(c, words, 32, seed=1, batch_size=3))
    assert all(torch.equal(a.tokens, b.tokens) and torch.equal(a.docs, b.docs) for a, b in zip(first, again, strict=True))
    other = torch.cat([b.tokens for b in pack(c, words, 32, seed=2, batch_size=3)])
    assert not torch.equal(torch.cat([b.tokens for b in first]), other)


def test_small_shuffle_buffer_still_packs_everything(words):
    c = word_corpus(200)
    batches = list(pack(c, words, 64, seed=0, shuffle_buffer=8))
    check_packed(batches, c, words, 64, 8)
    assert sum(len(b.tokens) for b in batches) == stream_length(c, words) // 63


def test_shuffled_is_a_seeded_permutation():
    items = list(range(100))
    for buffer in (1, 7, 100, 1000):
        out = list(shuffled(items, seed=3, buffer=buffer))
        assert sorted(out) == items and out == list(shuffled(items, seed=3, buffer=buffer))
        assert (out == items) == (buffer == 1)


def test_max_contexts(words):
    batches = list(pack(word_corpus(), words, 16, batch_size=2, max_contexts=5))
    assert [len(b.tokens) for b in batches] == [2, 2, 1] and [b.start for b in batches] == [0, 2, 4]


@pytest.mark.parametrize(
    "kw, bad",
    [
        ({"ctx_len": 1}, "ctx_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_contexts": 0}, "max_contexts"),
        ({"shuffle_buffer": 0}, "shuffle_buffer"),
    ],
)
def test_bad_arguments_fail_at_once(words, kw, bad):
    with pytest.raises(MechscopeError, match=f"^{bad} must be") as err:
        pack(word_corpus(), words, **kw)  # before any iteration
    assert "\n" not in str(err.value)


def test_a_corpus_without_enough_tokens(words):
    empty = Corpus("test:empty", lambda: iter([("a", ""), ("b", "   ")]))
    with pytest.raises(MechscopeError, match="^corpus 'test:empty' yields no tokens$"):
        next(pack(empty, words))
    short = Corpus("test:short", lambda: iter([("a", "w1 w2"), ("b", "w3")]))
    with pytest.raises(MechscopeError, match="only 4 tokens"):  # 3 words and a separator
        next(pack(short, words, ctx_len=8))


@pytest.mark.slow
def test_builtin_corpus_with_smollm2():
    tok = AutoTokenizer.from_pretrained(converted_gguf(default_gguf()))
    c = corpus()
    batches = list(pack(c, tok, 128, batch_size=64))
    order = check_packed(batches, c, tok, 128, 64)
    assert special_tokens(tok) == (tok.eos_token_id, tok.eos_token_id)  # SmolLM2 adds no BOS
    assert sum(len(b.tokens) for b in batches) > 4000 and len(order) > 600
