"""The next-token distribution for a prompt, and how likely chosen continuations are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from mechscope.errors import MechscopeError
from mechscope.models import Inputs, Model


class TokenProb(NamedTuple):
    token: str
    """The token's text."""
    id: int
    prob: float
    logprob: float


class TargetScore(NamedTuple):
    target: str | int
    """The continuation (or token id) asked about."""
    token: str
    """Its first token's text."""
    id: int
    """Its first token's id."""
    prob: float
    """Probability of the first token."""
    rank: int
    """1 + the number of tokens more likely than the first token."""
    logprob: float
    """Log-probability of the first token."""
    full_logprob: float
    """Log-probability of the whole continuation, every token of it."""
    n_tokens: int


class Prediction(NamedTuple):
    tokens: list[str]
    """The prompt's tokens."""
    top: list[TokenProb]
    """The k most likely next tokens, most likely first."""
    targets: list[TargetScore]


def check_position(pos: int, n_pos: int) -> int:
    """A position in range, negative counting from the end; one-line error otherwise."""
    if not -n_pos <= pos < n_pos:
        raise MechscopeError(f"position {pos} out of range: the text has {n_pos} tokens, so valid positions are 0..{n_pos - 1}")
    return pos % n_pos


def one_sequence(model: Model, text: Inputs) -> torch.Tensor:
    """Token ids [1, pos] of a single text (one-line error for a batch)."""
    ids = model.to_ids(text)
    if ids.shape[0] != 1:
        raise MechscopeError(f"expected one text, got a batch of {ids.shape[0]}: pass them one at a time")
    return ids


def target_ids(model: Model, targets: Sequence[str | int]) -> list[list[int]]:
    """Token ids of each target continuation (one-line error for a target that tokenises to nothing)."""
    return [model.token_ids(t) for t in targets]


@torch.inference_mode()
def predict(model: Model, text: Inputs, k: int = 10, targets: Sequence[str | int] = ()) -> Prediction:
    """Top-k next tokens after `text`, and the probability and rank of each target continuation.

    Targets are strings (continuations) or single token ids. A multi-token target is scored by its
    first token (prob, rank) and by the log-probability of all its tokens (`full_logprob`), from one
    extra forward pass over the prompt and the target.

    >>> p = mechscope.predict(model, "The reliability of Wikipedia is very", targets=[" questionable"])
    >>> p.targets[0].prob  # about 0.04
    """
    if k < 1:
        raise MechscopeError(f"k={k} is invalid: k must be at least 1")
    ids = one_sequence(model, text)
    logprobs = model.run(ids).logits[0, -1].float().log_softmax(-1)
    top = logprobs.topk(min(k, logprobs.numel()))
    top_tokens = [
        TokenProb(tok, int(i), float(lp.exp()), float(lp))
        for tok, i, lp in zip(model.to_str_tokens(top.indices), top.indices, top.values, strict=True)
    ]
    scores = []
    for target, tids in zip(targets, target_ids(model, targets), strict=True):
        first = logprobs[tids[0]]
        full = float(first) if len(tids) == 1 else _continuation_logprob(model, ids, tids)
        rank = int((logprobs > first).sum()) + 1
        scores.append(
            TargetScore(
                target, model.to_str_tokens(tids[:1])[0], tids[0], float(first.exp()), rank, float(first), full, len(tids)
            )
        )
    return Prediction(model.to_str_tokens(ids[0]), top_tokens, scores)


def _continuation_logprob(model: Model, ids: torch.Tensor, continuation: list[int]) -> float:
    """Sum of log p(continuation[i] | prompt, continuation[:i])."""
    full = torch.cat([ids[0], torch.tensor(continuation, device=ids.device)])
    logprobs = model.run(full).logits[0, ids.shape[1] - 1 : -1].float().log_softmax(-1)
    return float(logprobs.gather(-1, torch.tensor(continuation, device=ids.device)[:, None]).sum())
