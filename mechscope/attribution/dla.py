"""Direct logit attribution: split one logit (or a logit difference) into the parts that wrote it.

Phases:
1. One forward pass reads the embeddings, every head's output (`attn.hook_z`), every neuron
   (`mlp.hook_post`) and the final residual stream, stopping before the unembedding.
2. The final norm is frozen at its scale on the clean final residual stream, which makes the logit a
   linear function of the residual stream; the unembedding direction of the target (minus that of
   `vs`) is carried back through it to a direction `g` in the residual stream.
3. Every part of the final residual stream is read along `g`: the embeddings, each head (through its
   slice of the attention output projection), each neuron (through its column of the MLP output
   projection) and the biases. Families that normalise a branch before it joins the residual stream
   (Gemma 2 and 3) have that norm frozen at its clean scale too.

The parts sum to the logit exactly, up to float rounding. It is the *direct* effect only: what a
unit adds to the logit through the residual stream, not through later layers. Models with a final
logit soft cap are attributed before the cap.

Precision: the forward pass runs in the model's dtype; phases 2 and 3 (and the logit they explain)
run in the wide dtype of `models.precision`, float32 for a float16 or bfloat16 model (float64 for a
float64 one), on the forward's values and on widened copies of the weights they read. In a 16-bit
model the parts then add up to the logit to within the rounding of the model's own residual stream.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.lens.predict import check_position, one_sequence, single_token
from mechscope.models import Inputs, Model
from mechscope.models.norms import freeze_norm
from mechscope.models.placement import module_tensors
from mechscope.models.precision import widen, widened


class Attribution(NamedTuple):
    target: str | int
    vs: str | int | None
    position: int
    logit: float
    """The logit (or logit difference) explained, before any final soft cap: the model's final norm and
    unembedding on its final residual stream, computed in the wide dtype (float32 for a 16-bit model)."""
    embed: float
    """Token (and position) embeddings."""
    heads: Tensor
    """[n_layers, n_heads] float32: each attention head's direct contribution."""
    neurons: Tensor
    """[n_layers, d_mlp] float32: each MLP neuron's direct contribution."""
    biases: float
    """Every bias: output projections, final norm and unembedding."""

    @property
    def total(self) -> float:
        return self.embed + float(self.heads.sum()) + float(self.neurons.sum()) + self.biases

    def top(self, n: int = 20) -> list[tuple[str, float]]:
        """The n units with the largest |contribution|: heads as `L.H`, neurons as `L:N`."""
        units = [(f"{layer}.{h}", v) for (layer, h), v in _flat(self.heads)]
        units += [(f"{layer}:{i}", v) for (layer, i), v in _flat(self.neurons)]
        return sorted(units, key=lambda u: -abs(u[1]))[:n]


def _flat(grid: Tensor) -> list[tuple[tuple[int, int], float]]:
    cols = grid.shape[1]
    return [((i // cols, i % cols), v) for i, v in enumerate(grid.flatten().tolist())]


def _read_back(module, direction: Tensor, width: int) -> tuple[Tensor, float]:
    """For a linear module (or function) y = W x + b: (W^T direction, b . direction), in direction's dtype."""
    x = torch.zeros(width, dtype=direction.dtype, device=direction.device, requires_grad=True)
    with torch.enable_grad():
        y = module(x)
        (weights,) = torch.autograd.grad((y * direction).sum(), x)
    return weights, float((y.detach() * direction).sum())


def direct_logit_attribution(
    model: Model, text: Inputs, target: str | int, vs: str | int | None = None, position: int = -1
) -> Attribution:
    """Attribute `logit(target) - logit(vs)` at `position` to the embeddings, every head, every neuron and the biases.

    >>> a = mechscope.direct_logit_attribution(model, "The reliability of Wikipedia is very", " questionable")
    >>> a.top(10)          # [('29:1085', 0.61), ('27.4', -0.4), ...]
    >>> a.total, a.logit   # equal, up to float rounding
    """
    ids = one_sequence(model, text)
    pos = check_position(position, ids.shape[1])
    t = single_token(model, target, text)
    v = None if vs is None else single_token(model, vs, text, "vs")
    if v == t:
        raise MechscopeError(f"--vs {vs!r} is the same token as the target {target!r}: choose a different token")
    d, a = model.dims, model.adapter
    last = f"blocks.{d.n_layers - 1}.hook_resid_post"
    embeds = ["hook_embed"] + (["hook_pos_embed"] if d.has_pos_embed else [])
    reads = embeds + [f"blocks.{layer}.{k}" for layer in range(d.n_layers) for k in ("attn.hook_z", "mlp.hook_post")]
    with torch.no_grad():
        cache = {k: widen(x[0, pos]) for k, x in model.run(ids, read=[*reads, last]).cache.items()}

    unembed = module_tensors(model.module(a.unembed))  # its values, also where accelerate offloaded them
    W_U = unembed["weight"]
    u = widen(W_U[t]) - (widen(W_U[v]) if v is not None else 0)
    unembed_bias = 0.0
    if unembed.get("bias") is not None:
        b_U = unembed["bias"]
        unembed_bias = float(widen(b_U[t]) - (widen(b_U[v]) if v is not None else 0))
    biases = unembed_bias
    final = freeze_norm(model.module(a.final_norm), cache[last])
    g = final.transpose(u)
    biases += float(final.bias @ u)
    embed = sum(float(cache[k] @ g) for k in embeds)

    heads, neurons = torch.zeros(d.n_layers, d.n_heads), torch.zeros(d.n_layers, d.d_mlp)
    for layer in range(d.n_layers):
        for kind, path, norm_path, grid in (
            ("attn.hook_z", a.heads_out, a.attn_out, heads),
            ("mlp.hook_post", a.neurons, a.mlp_out, neurons),
        ):
            module, acts = widened(model.block_module(layer, path)), cache[f"blocks.{layer}.{kind}"].flatten()
            direction = g
            if a.branch_norms:  # the branch is normalised before it joins the residual stream
                with torch.no_grad():
                    direction = freeze_norm(model.block_module(layer, norm_path), module(acts)).transpose(g)
            weights, bias = _read_back(module, direction, acts.numel())
            grid[layer] = (acts * weights).reshape(grid.shape[1], -1).sum(-1).float()
            biases += bias

    with torch.no_grad():  # the model's own norm and unembedding, before any soft cap: what the parts must add up to
        logit = float(widened(model.module(a.final_norm))(cache[last]) @ u) + unembed_bias
    return Attribution(target, vs, pos, logit, embed, heads, neurons, biases)
