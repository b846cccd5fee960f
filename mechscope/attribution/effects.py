"""What an intervention does: the next-token distribution before and after, and greedy continuations.

`intervene` compares the distributions (with per-token deltas and the KL divergence); `generate`
compares greedy continuations, keeping the intervention for every new token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mechscope.attribution.interventions import Intervention, resolve, writes
from mechscope.errors import MechscopeError
from mechscope.lens.predict import Prediction, TargetScore, TokenProb, one_sequence, target_ids
from mechscope.models import Inputs, Model

# -- before and after ------------------------------------------------------------------------------


class TokenDelta(NamedTuple):
    token: str
    id: int
    prob_before: float
    prob_after: float
    logprob_before: float
    logprob_after: float
    delta_prob: float
    """prob_after - prob_before."""
    delta_logprob: float
    """logprob_after - logprob_before."""


class InterventionResult(NamedTuple):
    tokens: list[str]
    """The prompt's tokens."""
    interventions: list[str]
    """What was done, in words."""
    before: Prediction
    """The next-token distribution without the interventions."""
    after: Prediction
    """The next-token distribution with them."""
    deltas: list[TokenDelta]
    """Every token in the top k before or after, most likely (before or after) first."""
    targets: list[TokenDelta]
    """The first token of each target."""
    kl: float
    """KL(before || after) of the next-token distributions, in nats."""


def _prediction(model: Model, ids: Tensor, logprobs: Tensor, k: int, targets, tids, write) -> Prediction:
    top = logprobs.topk(min(k, logprobs.numel()))
    top_tokens = [
        TokenProb(tok, int(i), float(lp.exp()), float(lp))
        for tok, i, lp in zip(model.to_str_tokens(top.indices), top.indices, top.values, strict=True)
    ]
    scores = []
    for target, t in zip(targets, tids, strict=True):
        first = logprobs[t[0]]
        if len(t) == 1:
            full = float(first)
        else:
            seq = torch.cat([ids[0], torch.tensor(t, device=ids.device)])
            w = write() if write else None
            lp = model.run(seq, write=w, logits=True).logits[0, ids.shape[1] - 1 : -1].float().log_softmax(-1)
            full = float(lp.gather(-1, torch.tensor(t, device=ids.device)[:, None]).sum())
        rank = int((logprobs > first).sum()) + 1
        scores.append(
            TargetScore(target, model.to_str_tokens(t[:1])[0], t[0], float(first.exp()), rank, float(first), full, len(t))
        )
    return Prediction(model.to_str_tokens(ids[0]), top_tokens, scores)


def _delta(model: Model, tid: int, before: Tensor, after: Tensor) -> TokenDelta:
    b, a = float(before[tid]), float(after[tid])
    pb, pa = float(before[tid].exp()), float(after[tid].exp())
    return TokenDelta(model.to_str_tokens([tid])[0], tid, pb, pa, b, a, pa - pb, a - b)


@torch.inference_mode()
def intervene(
    model: Model,
    text: Inputs,
    interventions: Intervention | Iterable[Intervention],
    k: int = 10,
    targets: Sequence[str | int] = (),
) -> InterventionResult:
    """The next-token distribution of `text` before and after `interventions`, and how each likely token moved.

    >>> r = intervene(model, "The reliability of Wikipedia is very", [Intervention.zero("20:1234")], targets=[" questionable"])
    >>> r.targets[0].delta_prob
    """
    if k < 1:
        raise MechscopeError(f"k={k} is invalid: k must be at least 1")
    ids = one_sequence(model, text)
    resolved = resolve(model, interventions, ids)
    tids = target_ids(model, targets)
    make_write = lambda: writes(model, resolved, ids)
    before_lp = model.run(ids).logits[0, -1].float().log_softmax(-1)
    after_lp = model.run(ids, write=make_write(), logits=True).logits[0, -1].float().log_softmax(-1)
    before = _prediction(model, ids, before_lp, k, targets, tids, None)
    after = _prediction(model, ids, after_lp, k, targets, tids, make_write)
    seen: dict[int, None] = {}
    for t in [*before.top, *after.top]:
        seen.setdefault(t.id)
    deltas = sorted((_delta(model, i, before_lp, after_lp) for i in seen), key=lambda d: -max(d.prob_before, d.prob_after))
    target_deltas = [_delta(model, t[0], before_lp, after_lp) for t in tids]
    kl = float((before_lp.exp() * (before_lp - after_lp)).sum())
    return InterventionResult(before.tokens, [str(iv) for iv in resolved], before, after, deltas, target_deltas, kl)


# -- generation ------------------------------------------------------------------------------------


class Generation(NamedTuple):
    before: str
    """The greedy continuation without the interventions (new tokens only)."""
    after: str
    """The greedy continuation with them."""
    before_ids: list[int]
    after_ids: list[int]


def _decode(model: Model, ids: list[int]) -> str:
    if model.tokenizer is None:
        return "".join(model.to_str_tokens(ids))
    return model.tokenizer.decode(ids, skip_special_tokens=True)


@torch.inference_mode()
def generate(
    model: Model, text: Inputs, interventions: Intervention | Iterable[Intervention], max_new_tokens: int = 30
) -> Generation:
    """Greedy continuations of `text` without and with `interventions`, which apply on every new token
    (or, with chosen positions, only at those prompt positions).

    >>> g = generate(model, "The capital of France is", [Intervention.scale("20:1234", 10)])
    >>> g.before, g.after
    """
    if max_new_tokens < 1:
        raise MechscopeError(f"max_new_tokens={max_new_tokens} is invalid: generate at least 1 token")
    ids = one_sequence(model, text)
    resolved = resolve(model, interventions, ids)
    pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    kwargs = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        num_beams=1, pad_token_id=pad, temperature=None, top_p=None, top_k=None,
    )  # fmt: skip
    plain = model.hf.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
    with model.hooks(write=writes(model, resolved, ids)):
        steered = model.hf.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
    return Generation(_decode(model, plain), _decode(model, steered), plain, steered)
