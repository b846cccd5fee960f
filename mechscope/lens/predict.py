"""The next-token distribution for a prompt, and how likely chosen continuations are."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

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


def split_inputs(inputs: Inputs) -> tuple[list, bool]:
    """Inputs as a list of single inputs (one text or one id sequence each), and whether a single one was given.

    A string, a 1-d id tensor, a list of ints or a [1, pos] id tensor is one input; a list of texts
    (or of id sequences) or a [batch, pos] id tensor is several.
    """
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, Tensor):
        if inputs.ndim <= 1 or inputs.shape[0] == 1:
            return [inputs.reshape(-1)], True
        return list(inputs), False
    items = list(inputs)
    if not items:
        raise MechscopeError("no texts given: give at least one text")
    if all(isinstance(t, int) for t in items):
        return [items], True
    return items, False


def one_sequence(model: Model, text: Inputs) -> Tensor:
    """Token ids [1, pos] of a single text (one-line error for a batch)."""
    ids = model.to_ids(text)
    if ids.shape[0] != 1:
        raise MechscopeError(f"expected one text, got a batch of {ids.shape[0]}: pass them one at a time")
    return ids


def as_targets(targets: str | int | Sequence[str | int] | None) -> list[str | int]:
    """Targets as a list: one string or id is one target, never split into characters; None is none."""
    if targets is None:
        return []
    return [targets] if isinstance(targets, str | int) else list(targets)


def target_ids(model: Model, targets: Sequence[str | int], prompt: Inputs | None = None) -> list[list[int]]:
    """Token ids of each target as a continuation of `prompt` (one-line error for a target that tokenises to nothing)."""
    return [model.token_ids(t, prompt if isinstance(prompt, str) else None) for t in targets]


def single_token(model: Model, target: str | int, prompt: Inputs | None = None, what: str = "target") -> int:
    """The one token id of `target` as a continuation of `prompt`; a one-line error for a multi-token target
    (or for a list, even of one: this method takes exactly one target)."""
    if not isinstance(target, str | int):
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            target = operator.index(target)  # a numpy or torch integer (scalar) is a token id
    if not isinstance(target, str | int):
        items = list(target) if isinstance(target, Sequence) else None
        if items == []:
            raise MechscopeError(f"no {what} given (an empty list): give one {what}, a string such as ' Paris' or a token id")
        raise MechscopeError(
            f"{what} must be one string or token id, got {type(target).__name__} {target!r}: this method explains one token"
        )
    if target == "":
        raise MechscopeError(f"{what} '' is empty: give at least one character, such as ' Paris'")
    ids = model.token_ids(target, prompt if isinstance(prompt, str) else None)
    if len(ids) > 1:
        pieces = model.to_str_tokens(ids)
        raise MechscopeError(
            f"{what} {target!r} is {len(ids)} tokens {pieces}: this method explains one token's logit; "
            f"give a single-token {what}, such as its first token {pieces[0]!r}"
        )
    return ids[0]


def distribution(model: Model, logprobs: Tensor, k: int, tids: list[list[int]]):
    """The top k of a next-token distribution `logprobs` [d_vocab], and each target's first-token score."""
    top = logprobs.topk(min(k, logprobs.numel()))
    top_tokens = [
        TokenProb(tok, int(i), float(lp.exp()), float(lp))
        for tok, i, lp in zip(model.to_str_tokens(top.indices), top.indices, top.values, strict=True)
    ]
    firsts = [logprobs[t[0]] for t in tids]
    return top_tokens, [(first, int((logprobs > first).sum()) + 1) for first in firsts]


def target_score(model: Model, target: str | int, tids: list[int], first: Tensor, rank: int, full: float) -> TargetScore:
    return TargetScore(target, model.to_str_tokens(tids[:1])[0], tids[0], float(first.exp()), rank, float(first), full, len(tids))


def _check_k(k: int) -> None:
    if k < 1:
        raise MechscopeError(f"k={k} is invalid: k must be at least 1")


@torch.inference_mode()
def predict(
    model: Model, text: Inputs, k: int = 10, targets: str | int | Sequence[str | int] = ()
) -> Prediction | list[Prediction]:
    """Top-k next tokens after `text`, and the probability and rank of each target continuation.

    Targets are strings (continuations of the text, tokenised as they follow it) or single token ids;
    one string is one target. A multi-token target is scored by its first token (prob, rank) and by
    the log-probability of all its tokens (`full_logprob`), from one extra forward pass over the
    prompt and the target. A list of texts (of any lengths) runs as one batch and gives one
    `Prediction` per text, each equal to predicting that text alone.

    >>> p = mechscope.predict(model, "The reliability of Wikipedia is very", targets=" questionable")
    >>> p.targets[0].prob  # about 0.04
    """
    _check_k(k)
    targets = as_targets(targets)
    items, single = split_inputs(text)
    tokens = model.encode(items)
    logprobs = model.run(tokens.ids, attention_mask=tokens.mask, last_only=True).logits[:, -1].float().log_softmax(-1)
    results = []
    for i, item in enumerate(items):
        ids = tokens.row(i)[None]
        tids = target_ids(model, targets, item)
        top, firsts = distribution(model, logprobs[i], k, tids)
        scores = [
            target_score(model, target, t, first, rank, float(first) if len(t) == 1 else continuation_logprob(model, ids, t))
            for target, t, (first, rank) in zip(targets, tids, firsts, strict=True)
        ]
        results.append(Prediction(model.to_str_tokens(ids[0]), top, scores))
    return results[0] if single else results


def continuation_logprob(model: Model, ids: Tensor, continuation: list[int], write=None) -> float:
    """Sum of log p(continuation[i] | prompt, continuation[:i]) after the prompt `ids` [1, pos], under `write`."""
    full = torch.cat([ids[0], torch.tensor(continuation, device=ids.device)])
    logprobs = model.run(full, write=write, logits=True).logits[0, ids.shape[1] - 1 : -1].float().log_softmax(-1)
    return float(logprobs.gather(-1, torch.tensor(continuation, device=ids.device)[:, None]).sum())
