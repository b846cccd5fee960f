"""Packing: a corpus becomes batches of fixed-length contexts of token ids, with no padding.

Phases:
1. Documents are shuffled reproducibly from a seed through a bounded buffer, so that a streamed
   source can be shuffled too (a corpus smaller than the buffer comes out fully shuffled).
2. They are tokenised in chunks of many documents at once, without special tokens.
3. Their tokens are concatenated into one stream with a separator token between documents, and the
   stream is cut into contexts of `ctx_len`: the start token, then `ctx_len - 1` stream tokens. Long
   documents run on over several contexts; `Contexts.docs` says which document each token came from.

This is how GPT-2-style pretraining data and SAE activation stores are built: every position is text
the model reads in earnest, and every context begins the way the model expects a text to begin.

>>> for batch in pack(corpus(), model.tokenizer, ctx_len=128, max_contexts=1000):
...     batch.tokens  # [8, 128] int64
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from mechscope.data.corpus import Corpus, Document
from mechscope.errors import MechscopeError

SKIP_POSITIONS = 4
"""Positions at the start of each context that statistics, activation stores and dictionaries leave out:
the start token and the first few text tokens, where a model without a BOS token parks its attention
(an attention sink) and its activations take outlier values, many times the typical norm (SmolLM2's
residual stream at layer 15 is ~150x its median norm at the start token). Left in, those few tokens
dominate every variance."""
CHUNK_DOCS = 256
"""Documents tokenised per call: the fast tokenizer encodes a batch in parallel."""
NO_DOC = -1
"""`Contexts.docs` value of the start token and of separators."""

T = TypeVar("T")


@dataclass(frozen=True)
class Contexts:
    """A batch of packed contexts."""

    start: int
    """Global index of this batch's first context: contexts are numbered 0, 1, 2, ... across batches."""
    tokens: Tensor
    """[n, ctx_len] int64 token ids; column 0 is the start token."""
    docs: Tensor
    """[n, ctx_len] int32: the `Document.id` each token came from; -1 for the start token and separators."""


def special_tokens(tokenizer) -> tuple[int, int]:
    """(start_id, sep_id): the token that opens every context, and the one between documents.

    The separator is EOS (else BOS). A context starts with BOS where the tokenizer puts BOS in front
    of text by default (Llama 2, Gemma), since the model never saw text without it; otherwise (GPT-2,
    SmolLM2) with the separator, as in the model's own pretraining stream.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    sep = eos if eos is not None else bos
    if sep is None:
        raise MechscopeError(
            f"tokenizer {type(tokenizer).__name__} has no EOS or BOS token: packing needs one to separate documents"
        )
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    return (bos if adds_bos else sep), sep


def pack(
    corpus: Corpus,
    tokenizer,
    ctx_len: int = 128,
    *,
    seed: int | None = 0,
    batch_size: int = 8,
    max_contexts: int | None = None,
    shuffle_buffer: int = 10_000,
) -> Iterator[Contexts]:
    """Batches of `batch_size` contexts of `ctx_len` tokens from `corpus` (the last batch may be smaller).

    The same corpus, tokenizer and seed always give the same tensors; `seed=None` keeps the corpus's
    order. A final partial context is dropped, so every context is full. Stops after `max_contexts`.
    """
    for name, value, least in (("ctx_len", ctx_len, 2), ("batch_size", batch_size, 1), ("shuffle_buffer", shuffle_buffer, 1)):
        if not isinstance(value, int) or value < least:
            raise MechscopeError(f"{name} must be an integer of at least {least}; got {value!r}")
    if max_contexts is not None and (not isinstance(max_contexts, int) or max_contexts < 1):
        raise MechscopeError(f"max_contexts must be None or an integer of at least 1; got {max_contexts!r}")
    start_id, sep_id = special_tokens(tokenizer)
    docs = corpus.documents() if seed is None else shuffled(corpus.documents(), seed, shuffle_buffer)
    stream = _token_stream(docs, tokenizer, sep_id)
    return _contexts(stream, corpus.id, ctx_len, start_id, batch_size, max_contexts)


def shuffled(items: Iterable[T], seed: int, buffer: int) -> Iterator[T]:
    """`items` in a reproducible random order, holding at most `buffer` of them at a time.

    Once the buffer is full, each new item takes the place of a random one, which is yielded; at the
    end the rest is shuffled. A source no larger than the buffer gets a uniform permutation.
    """
    rng = random.Random(seed)
    pool: list[T] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = item
    rng.shuffle(pool)
    yield from pool


def _token_stream(docs: Iterator[Document], tokenizer, sep_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The documents' tokens as one stream, in chunks of (ids int64, doc ids int32), with `sep_id` between documents.

    Documents with no tokens are left out, so two separators never meet.
    """
    first = True
    while chunk := list(itertools.islice(docs, CHUNK_DOCS)):
        encoded = tokenizer([d.text for d in chunk], add_special_tokens=False, verbose=False).input_ids
        pieces, owners, lengths = [], [], []
        for doc, ids in zip(chunk, encoded, strict=True):
            if not ids:
                continue
            if not first:
                pieces.append((sep_id,))
                owners.append(NO_DOC)
                lengths.append(1)
            first = False
            pieces.append(ids)
            owners.append(doc.id)
            lengths.append(len(ids))
        if pieces:
            ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=sum(lengths))
            yield ids, np.repeat(np.array(owners, dtype=np.int32), lengths)


def _cut(stream: Iterator[tuple[np.ndarray, np.ndarray]], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Re-cut a chunked stream into pieces of exactly `size` tokens, then the shorter rest (if any)."""
    held_ids, held_docs, held = [], [], 0
    for ids, docs in stream:
        held_ids.append(ids)
        held_docs.append(docs)
        held += len(ids)
        if held >= size:
            all_ids, all_docs = np.concatenate(held_ids), np.concatenate(held_docs)
            whole = held // size * size
            for i in range(0, whole, size):
                yield all_ids[i : i + size], all_docs[i : i + size]
            held_ids, held_docs, held = [all_ids[whole:]], [all_docs[whole:]], held - whole
    if held:
        yield np.concatenate(held_ids), np.concatenate(held_docs)


def _contexts(
    stream: Iterator[tuple[np.ndarray, np.ndarray]],
    corpus_id: str,
    ctx_len: int,
    start_id: int,
    batch_size: int,
    max_contexts: int | None,
) -> Iterator[Contexts]:
    """Batches of contexts: each is the start token and the next `ctx_len - 1` tokens of the stream."""
    width = ctx_len - 1
    done, seen = 0, 0
    for ids, docs in _cut(stream, width * batch_size):
        seen = len(ids)
        n = len(ids) // width if max_contexts is None else min(len(ids) // width, max_contexts - done)
        if n == 0:
            break
        tokens = np.concatenate([np.full((n, 1), start_id, np.int64), ids[: n * width].reshape(n, width)], axis=1)
        owners = np.concatenate([np.full((n, 1), NO_DOC, np.int32), docs[: n * width].reshape(n, width)], axis=1)
        yield Contexts(done, torch.from_numpy(tokens), torch.from_numpy(owners))
        done += n
        if done == max_contexts:
            return
    if done == 0:
        got = f"only {seen} tokens, fewer than one context of ctx_len={ctx_len} needs" if seen else "no tokens"
        raise MechscopeError(f"corpus {corpus_id!r} yields {got}")
