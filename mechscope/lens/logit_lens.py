"""Logit lens: unembed the residual stream after every layer, through the model's own final norm.

Rows are the embeddings (`blocks.0.hook_resid_pre`, which includes learned position embeddings
where the model has them) and each block's `hook_resid_post`, optionally with each `hook_resid_mid`
between them. The last row equals the model's own next-token distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.lens.predict import as_targets, check_position, split_inputs, target_ids
from mechscope.models import Inputs, Model
from mechscope.models.precision import wide_unembed

_CHUNK_TOKENS = 512  # residual vectors unembedded at once: bounds memory to a few chunk x d_vocab floats


class LensResult(NamedTuple):
    tokens: list[str]
    """The prompt's tokens (the columns)."""
    positions: list[int]
    """Which positions the columns are."""
    rows: list[str]
    """Row labels: "embed", then "0", "1", ... (and "0 mid", ... with mid=True)."""
    sites: list[str]
    """The site each row unembeds."""
    targets: list[str | int]
    target_ids: list[int]
    """First token of each target."""
    probs: Tensor
    """[row, pos, target] probability of each target."""
    ranks: Tensor
    """[row, pos, target] 1-based rank of each target."""
    top_ids: Tensor
    """[row, pos, k] most likely tokens."""
    top_probs: Tensor
    """[row, pos, k] their probabilities."""
    top_tokens: list[list[list[str]]]
    """[row][pos][k] their texts."""


def lens_sites(model: Model, mid: bool = False) -> tuple[list[str], list[str]]:
    """Row labels and the site each row reads."""
    rows, sites = ["embed"], ["blocks.0.hook_resid_pre"]
    for layer in range(model.dims.n_layers):
        if mid:
            rows.append(f"{layer} mid")
            sites.append(model.site(f"blocks.{layer}.hook_resid_mid").name)
        rows.append(str(layer))
        sites.append(f"blocks.{layer}.hook_resid_post")
    return rows, sites


@torch.inference_mode()
def logit_lens(
    model: Model,
    text: Inputs,
    targets: str | int | Sequence[str | int] = (),
    k: int = 5,
    mid: bool = False,
    positions: Sequence[int] | None = None,
) -> LensResult | list[LensResult]:
    """Each target's probability and rank, and the top-k tokens, after every layer at every position.

    Targets are optional (one string is one target): without them the lens gives each layer's top
    tokens. A list of texts (of any lengths) runs as one batch and gives one `LensResult` per text,
    each equal to the lens of that text alone; `positions` then count within each text.

    >>> lens = mechscope.logit_lens(model, "The reliability of Wikipedia is very", [" questionable"])
    >>> lens.probs[:, -1, 0]  # P(" questionable") after each layer, at the last position
    """
    if k < 1:
        raise MechscopeError(f"k={k} is invalid: k must be at least 1")
    targets = as_targets(targets)
    items, single = split_inputs(text)
    tokens = model.encode(items)
    for n_pos in tokens.lengths:  # positions are checked before the forward pass
        for p in positions or ():
            check_position(p, n_pos)
    rows, sites = lens_sites(model, mid)
    cache = model.run(tokens.ids, attention_mask=tokens.mask, read=sites).cache
    unembed = wide_unembed(model, final_norm=True)
    results = []
    for i, (item, n_pos) in enumerate(zip(items, tokens.lengths, strict=True)):
        cols = list(range(n_pos)) if positions is None else [check_position(p, n_pos) for p in positions]
        resid = torch.stack([cache[s][i, cols] for s in sites])  # [row, pos, d_model]
        tids = [t[0] for t in target_ids(model, targets, item)]
        probs, ranks, top_ids, top_probs = _unembed_rows(unembed, resid, torch.tensor(tids, dtype=torch.long), k)
        top_tokens = [[model.to_str_tokens(cell) for cell in row] for row in top_ids]
        tokens_i = model.to_str_tokens(tokens.row(i))
        results.append(LensResult(tokens_i, cols, rows, sites, targets, tids, probs, ranks, top_ids, top_probs, top_tokens))
    return results[0] if single else results


def _unembed_rows(unembed, resid: Tensor, tids: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Target probs/ranks and top-k of every residual vector [row, pos, d_model], in bounded chunks.

    `unembed` (`wide_unembed(model, final_norm=True)`) runs the final norm and unembedding in the wide
    dtype (float32 for a 16-bit model), as do the softmax, ranks and top-k after them; probs are float32.
    """
    flat = resid.reshape(-1, resid.shape[-1])
    outs = []
    for chunk in flat.split(_CHUNK_TOKENS):
        logprobs = unembed(chunk).float().log_softmax(-1)  # [n, d_vocab]
        target_lp = logprobs[:, tids.to(logprobs.device)]  # [n, target]
        ranks = torch.zeros(target_lp.shape, dtype=torch.long, device=logprobs.device)  # [n, target]
        for j, lp in enumerate(target_lp.T):
            ranks[:, j] = (logprobs > lp[:, None]).sum(-1) + 1
        top = logprobs.topk(k, dim=-1)
        outs.append((target_lp.exp(), ranks, top.indices, top.values.exp()))
    shape = resid.shape[:2]
    return tuple(torch.cat(parts).reshape(*shape, -1).cpu() for parts in zip(*outs, strict=True))
