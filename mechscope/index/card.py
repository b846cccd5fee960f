"""A unit card: what an index knows about one unit, and, for a neuron, what it writes.

1. statistics and histogram, from the index;
2. input tokens: the tokens the unit fires on, aggregated over its top examples and those of its
   stratified samples where it is active (above the build's threshold; each (context, position)
   once), ranked by mean activation, with counts;
3. output tokens (neurons only, given the model): the neuron's output weight column carried through
   the final norm's elementwise weight (and, for families that normalise the MLP branch, the branch
   norm's weight) to the unembedding. These are the tokens whose logits one unit of the neuron's
   activation raises (promoted) or lowers (suppressed) most directly, ignoring the norms' scales.
   `residual_logits` and `ranked_tokens` do the same for any direction (a dictionary feature's
   decoder direction: `feature_card.py`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mechscope.index.query import Histogram, Index, UnitInfo, UnitSummary
from mechscope.models.norms import freeze_norm
from mechscope.models.placement import module_tensors
from mechscope.models.precision import widen


class InputToken(NamedTuple):
    token_id: int
    token: str | None
    mean: float
    """Mean activation of the unit on this token, over the examples and active samples that hold it."""
    max: float
    count: int
    """How many of the unit's top examples and active samples sit on this token."""


class OutputToken(NamedTuple):
    token_id: int
    token: str
    weight: float
    """Direct change of this token's logit per unit of activation (before the final norm's scale), less the mean
    change over the vocabulary."""


class UnitCard(NamedTuple):
    unit: UnitInfo
    stats: UnitSummary
    histogram: Histogram
    input_tokens: list[InputToken]
    promoted: list[OutputToken] | None
    """Tokens the neuron raises most; None for non-neurons or without a model."""
    suppressed: list[OutputToken] | None
    """Tokens the neuron lowers most (most negative first)."""


def unit_card(index: Index, unit: str | int | UnitInfo, model=None, n_tokens: int = 10, n_out: int = 10) -> UnitCard:
    """Everything on one unit; output tokens when the unit is a neuron and `model` (or the index's model) is given."""
    u = index.unit(unit)
    model = model if model is not None else index.model
    promoted = suppressed = None
    if model is not None and u.site.endswith(".mlp.hook_post"):
        promoted, suppressed = output_tokens(model, u.layer, u.index, n_out)
    return UnitCard(u, index.stats(u), index.histogram(u), input_tokens(index, u, n_tokens), promoted, suppressed)


def input_tokens(index: Index, unit: str | int | UnitInfo, n: int = 10) -> list[InputToken]:
    """The tokens the unit fires on most: top examples and active samples together, ranked by mean activation."""
    seen: dict[tuple[int, int], tuple[int, float]] = {}
    active = [e for s in index.samples(unit) for e in s.examples if e.value > index.meta.get("threshold", 0.0)]
    examples = index.top(unit, n=index.meta.get("k", 20)) + active
    for ex in examples:
        seen[(ex.ctx, ex.pos)] = (ex.token_id, ex.value)
    values: dict[int, list[float]] = defaultdict(list)
    for token_id, value in seen.values():
        values[token_id].append(value)
    ranked = sorted(values.items(), key=lambda kv: (-sum(kv[1]) / len(kv[1]), -len(kv[1]), kv[0]))[:n]
    names = index.decode([t for t, _ in ranked]) or [None] * len(ranked)
    return [InputToken(t, name, sum(v) / len(v), max(v), len(v)) for (t, v), name in zip(ranked, names, strict=True)]


def neuron_output_weight(model, layer: int, neuron: int) -> Tensor:
    """[d_model] what one unit of the neuron's activation adds through the MLP's output projection."""
    return mlp_output_weight(model, layer)[:, neuron]


def mlp_output_weight(model, layer: int) -> Tensor:
    """[d_model, d_mlp] the MLP's output projection: what each neuron adds per unit of activation."""
    module = model.block_module(layer, model.adapter.neurons)
    weight = module_tensors(module)["weight"]  # its values, also where accelerate offloaded them
    return weight if isinstance(module, nn.Linear) else weight.T  # GPT-2's Conv1D stores [d_mlp, d_model]


def _elementwise(norm, direction: Tensor) -> Tensor:
    """A direction through a norm's elementwise weight (centred first for LayerNorm), scale ignored."""
    frozen = freeze_norm(norm, direction[None])
    centred = direction - direction.mean() if frozen.centred else direction
    return frozen.weight * centred


@torch.no_grad()
def residual_logits(model, direction: Tensor, mlp_layer: int | None = None) -> Tensor:
    """[d_vocab] float32: the direct effect on each logit of `direction` [d_model] added to the residual stream
    (norm scales ignored). With `mlp_layer`, `direction` is what that layer's MLP outputs, taken first
    through the branch norm of the families that normalise the MLP's output before it joins the stream.

    Computed in the wide dtype (float32 for a 16-bit model): the dot products over d_model too.
    """
    a = model.adapter
    unembed = widen(module_tensors(model.module(a.unembed))["weight"])  # [d_vocab, d_model]
    direction = direction.to(unembed.device, unembed.dtype)
    if mlp_layer is not None and a.branch_norms:  # the MLP's output is normalised before it joins the residual stream
        direction = _elementwise(model.block_module(mlp_layer, a.mlp_out), direction)
    direction = _elementwise(model.module(a.final_norm), direction)
    return (unembed @ direction).float()


def output_direction(model, layer: int, neuron: int) -> Tensor:
    """[d_vocab] float32: the neuron's direct effect on each logit per unit of activation (norm scales ignored)."""
    return residual_logits(model, neuron_output_weight(model, layer, neuron), mlp_layer=layer)


def ranked_tokens(model, logits: Tensor, n: int = 10) -> tuple[list[OutputToken], list[OutputToken]]:
    """The n tokens `logits` [d_vocab] (a direct effect on each logit) raises most and the n it lowers most.

    Effects are centred on their mean over the vocabulary: softmax ignores a shift shared by every
    logit, so only the difference from the mean moves a token's probability.
    """
    logits = logits.float().cpu()
    logits = logits - logits.mean()
    up, down = logits.topk(n), (-logits).topk(n)

    def tokens(ids: Tensor, values: Tensor) -> list[OutputToken]:
        names = model.to_str_tokens(ids)
        return [OutputToken(int(i), name, float(v)) for i, name, v in zip(ids, names, values.tolist(), strict=True)]

    return tokens(up.indices, up.values), tokens(down.indices, -down.values)


def output_tokens(model, layer: int, neuron: int, n: int = 10) -> tuple[list[OutputToken], list[OutputToken]]:
    """The n tokens the neuron promotes most and the n it suppresses most, through the unembedding (centred)."""
    return ranked_tokens(model, output_direction(model, layer, neuron), n)
