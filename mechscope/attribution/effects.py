"""What an intervention does: the next-token distribution before and after, and greedy continuations.

`intervene` compares the distributions (with per-token deltas and the KL divergence); `generate`
compares greedy continuations, keeping the intervention for every new token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mechscope.attribution.interventions import Intervention, Steering, resolve, writes
from mechscope.errors import MechscopeError
from mechscope.lens.predict import (
    Prediction,
    as_targets,
    continuation_logprob,
    distribution,
    one_sequence,
    split_inputs,
    target_ids,
    target_score,
)
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


def _prediction(model: Model, ids: Tensor, logprobs: Tensor, k: int, targets, tids, make_write) -> Prediction:
    top, firsts = distribution(model, logprobs, k, tids)

    def full(t: list[int]) -> float:
        return continuation_logprob(model, ids, t, make_write() if make_write else None)

    scores = [
        target_score(model, target, t, first, rank, float(first) if len(t) == 1 else full(t))
        for target, t, (first, rank) in zip(targets, tids, firsts, strict=True)
    ]
    return Prediction(model.to_str_tokens(ids[0]), top, scores)


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
    targets = as_targets(targets)
    tids = target_ids(model, targets, text)
    make_write = lambda: writes(model, resolved, ids)  # a fresh dict per pass: its edits count positions
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


def _eos_ids(model: Model) -> set[int]:
    eos = model.hf.generation_config.eos_token_id if model.hf.generation_config else None
    eos = model.config.eos_token_id if eos is None else eos
    return set() if eos is None else set(eos if isinstance(eos, list) else [eos])


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    """New tokens up to and including the first end-of-sequence token (a batch pads finished rows after it)."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    return ids


def _greedy(model: Model, prompts: list, interventions: list[Intervention] | None, max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens of each prompt, as one left-padded batch, under `interventions` (None: none)."""
    tokens = model.encode(prompts, side="left")
    kwargs = dict(
        attention_mask=tokens.mask.long(), max_new_tokens=max_new_tokens, do_sample=False,
        num_beams=1, pad_token_id=model.pad_id, temperature=None, top_p=None, top_k=None,
    )  # fmt: skip
    with model.hooks(write=writes(model, interventions) if interventions else None):
        out = model.hf.generate(tokens.ids, **kwargs)[:, tokens.ids.shape[1] :].tolist()
    return [_until_eos(row, _eos_ids(model)) for row in out]


def _depends_on_prompt(iv: Intervention) -> bool:
    """Whether an intervention means something different for each prompt (positions, or the prompt's own mean)."""
    own_mean = isinstance(iv, Intervention) and iv.op == "mean" and iv.reference is None and iv.means is None
    return iv.positions is not None or own_mean


@torch.inference_mode()
def generate(
    model: Model, text: Inputs, interventions: Intervention | Iterable[Intervention], max_new_tokens: int = 30
) -> Generation | list[Generation]:
    """Greedy continuations of `text` without and with `interventions`, which apply on every new token
    (or, with chosen positions, only at those prompt positions).

    A list of prompts (of any lengths) gives one `Generation` per prompt, equal to generating from
    each alone. They run as one left-padded batch; interventions that depend on the prompt (chosen
    positions, or a mean over the prompt itself) run prompt by prompt.

    >>> g = generate(model, "The capital of France is", [Intervention.scale("20:1234", 10)])
    >>> g.before, g.after
    """
    if max_new_tokens < 1:
        raise MechscopeError(f"max_new_tokens={max_new_tokens} is invalid: generate at least 1 token")
    items, single = split_inputs(text)
    longest = max(model.encode(items).lengths)  # one-line errors for bad prompts before any work
    if max_new_tokens > model.n_ctx - longest:
        raise MechscopeError(
            f"max_new_tokens={max_new_tokens} does not fit: the model's context of {model.n_ctx} tokens leaves room for "
            f"{model.n_ctx - longest} after a prompt of {longest}"
        )
    interventions = [interventions] if isinstance(interventions, Intervention | Steering) else list(interventions)
    plain = _greedy(model, items, None, max_new_tokens)
    if any(_depends_on_prompt(iv) for iv in interventions):
        steered = [_greedy(model, [item], resolve(model, interventions, model.to_ids(item)), max_new_tokens)[0] for item in items]
    else:
        steered = _greedy(model, items, resolve(model, interventions), max_new_tokens)
    results = [Generation(_decode(model, p), _decode(model, s), p, s) for p, s in zip(plain, steered, strict=True)]
    return results[0] if single else results
