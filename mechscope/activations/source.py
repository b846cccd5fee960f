"""Activations for training: chunks of [tokens, n_sites, d] from the model or a disk store, shuffled into batches.

A *source* cuts its stream of activations into numbered chunks of equal size, each a deterministic
function of its number (`chunks(start)`), so that a training run can resume at any step by
recomputing one chunk. `batches` shuffles each chunk (the bounded shuffle buffer) with a seed of its
own and cuts it into batches; the rows of a chunk that do not fill a last batch are left out.

Two sources: `ModelSource` runs the model over packed contexts of a corpus, reading the sites and
stopping after the deepest; `store.StoreSource` reads a store written by `harvest`. Both leave out
the first `skip` positions of each context (`mechscope.data.SKIP_POSITIONS`: attention-sink tokens
whose norms are many times the median, which would otherwise dominate the variance).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.data import SKIP_POSITIONS, corpus, pack
from mechscope.errors import MechscopeError


def site_width(model, sites: list[str]) -> int:
    """The common width d of `sites` ([batch, pos, d] each); one-line error if they differ or are not per token."""
    widths = set()
    for name in sites:
        shape = model.shape(name)
        if len(shape) != 3 or shape[:2] != ("batch", "pos"):
            raise MechscopeError(
                f"site {name!r} has shape [{', '.join(map(str, shape))}]: dictionaries read [batch, pos, d] sites"
            )
        widths.add(shape[2])
    if len(widths) != 1:
        raise MechscopeError(f"sites {sites} have different widths {sorted(widths)}: one dictionary reads sites of one width")
    return widths.pop()


@dataclass(frozen=True)
class StreamSpec:
    """Which activations: the sites, and the corpus contexts they are read on."""

    sites: tuple[str, ...]
    corpus: str | None = None
    """Corpus spec (None: the built-in documentation; "builtin:all" adds the stdlib source)."""
    field: str = "text"
    ctx_len: int = 128
    skip: int = SKIP_POSITIONS
    seed: int = 0
    batch_contexts: int = 32
    """Contexts per forward pass (at most; lowered to a divisor of chunk_contexts)."""
    chunk_contexts: int = 1024
    """Contexts per chunk (the shuffle buffer holds one chunk)."""

    def __post_init__(self):
        if not 1 <= self.skip < self.ctx_len:
            raise MechscopeError(f"skip={self.skip} is invalid: give 1..{self.ctx_len - 1} (the start token is never read)")
        for name in ("batch_contexts", "chunk_contexts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MechscopeError(f"{name}={value!r} is invalid: it must be a positive integer")
        size = min(self.batch_contexts, self.chunk_contexts)
        while self.chunk_contexts % size:
            size -= 1
        object.__setattr__(self, "batch_contexts", size)

    @property
    def tokens_per_context(self) -> int:
        return self.ctx_len - self.skip

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_contexts * self.tokens_per_context


def read_contexts(model, sites: list[str], tokens: Tensor, skip: int) -> Tensor:
    """Activations [n·(ctx_len - skip), n_sites, d] float32 of contexts `tokens` [n, ctx_len], positions skip.. only."""
    with torch.inference_mode():
        cache = model.run(tokens.to(model.device), read=sites).cache
        return torch.stack([cache[s][:, skip:] for s in sites], dim=2).flatten(0, 1).float().cpu()


class ModelSource:
    """Activations read from the model as it runs over a corpus, one chunk of contexts at a time."""

    def __init__(self, model, spec: StreamSpec, corpus_obj=None):
        self.model, self.spec = model, spec
        self.sites = [model.site(s).name for s in spec.sites]
        self.d = site_width(model, self.sites)
        self.corpus = corpus_obj if corpus_obj is not None else corpus(spec.corpus, field=spec.field)

    @property
    def chunk_tokens(self) -> int:
        return self.spec.chunk_tokens

    def contexts(self, start_chunk: int = 0) -> Iterator[tuple[int, Tensor]]:
        """(chunk number, its contexts [chunk_contexts, ctx_len]) from chunk `start_chunk` on, endlessly: after
        the corpus's last whole chunk, a new pass reshuffles its documents with the next seed and the numbers
        go on. Chunks before `start_chunk` are tokenised again but not run."""
        s = self.spec
        per_chunk = s.chunk_contexts // s.batch_contexts
        number = 0
        for epoch in itertools.count():
            held: list[Tensor] = []
            before = number
            packed = pack(self.corpus, self.model.tokenizer, s.ctx_len, seed=s.seed + epoch, batch_size=s.batch_contexts)
            for batch in packed:
                if len(batch.tokens) < s.batch_contexts:
                    continue
                if number >= start_chunk:
                    held.append(batch.tokens)
                else:
                    held.append(None)
                if len(held) == per_chunk:
                    if number >= start_chunk:
                        yield number, torch.cat(held)
                    number += 1
                    held = []
            if number == before:
                raise MechscopeError(
                    f"corpus {self.corpus.id!r} holds less than one chunk of {s.chunk_contexts} contexts of {s.ctx_len} tokens: "
                    "use a larger corpus or a smaller chunk"
                )

    def chunks(self, start: int = 0) -> Iterator[tuple[int, Tensor]]:
        """(chunk number, activations [chunk_tokens, n_sites, d] float32) from chunk `start` on."""
        s = self.spec
        for number, contexts in self.contexts(start):
            parts = [read_contexts(self.model, self.sites, c, s.skip) for c in contexts.split(s.batch_contexts)]
            yield number, torch.cat(parts)


class TensorSource:
    """Activations already in memory, [n, n_sites, d], as a source: chunks of `chunk_tokens` rows, passes repeating."""

    def __init__(self, acts: Tensor, sites: list[str], chunk_tokens: int | None = None):
        if acts.ndim != 3 or acts.shape[1] != len(sites):
            raise MechscopeError(
                f"activations of shape {list(acts.shape)} do not fit {len(sites)} sites: give [n, {len(sites)}, d]"
            )
        self.acts, self.sites, self.d = acts, list(sites), acts.shape[2]
        self.chunk_tokens = min(chunk_tokens or len(acts), len(acts))

    def chunks(self, start: int = 0) -> Iterator[tuple[int, Tensor]]:
        per_pass = len(self.acts) // self.chunk_tokens
        for number in itertools.count(start):
            within = number % per_pass
            yield number, self.acts[within * self.chunk_tokens : (within + 1) * self.chunk_tokens].float()


def batches(source, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[tuple[int, Tensor]]:
    """(step, batch [batch_size, n_sites, d]) from `source`, shuffled within each chunk, from `start_step` on.

    Step s is batch s % per_chunk of chunk s // per_chunk, where per_chunk = chunk_tokens // batch_size,
    so a resumed run sees exactly the batches an uninterrupted one would.
    """
    per_chunk = source.chunk_tokens // batch_size
    if per_chunk < 1:
        raise MechscopeError(
            f"batch_size={batch_size} is larger than one chunk of {source.chunk_tokens} tokens: "
            "use a smaller batch or more contexts per chunk"
        )
    for number, chunk in source.chunks(start_step // per_chunk):
        order = torch.randperm(len(chunk), generator=torch.Generator().manual_seed(seed * 1_000_003 + number))
        first = start_step - number * per_chunk if number == start_step // per_chunk else 0
        for b in range(max(first, 0), per_chunk):
            yield number * per_chunk + b, chunk[order[b * batch_size : (b + 1) * batch_size]]
