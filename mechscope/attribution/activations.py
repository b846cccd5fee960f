"""What one unit does on a text, token by token: a neuron's activation, a head's output size, a direction's projection.

Each function runs one forward pass over all its texts (padded to one length) that reads a single
site, so the pass stops right after the layer it needs, and returns a `TokenValues` (the text's tokens, one value per token, a
label) for `mechscope.viz.token_heatmap` to colour.

- `neuron_activations(model, text, layer, neuron)`: `blocks.L.mlp.hook_post[..., neuron]`, the
  input of the MLP's output projection (after the activation function, and the gate for gated MLPs).
- `head_activations(model, text, layer, head)`: the L2 norm of the head's output `z` at each
  position (`blocks.L.attn.hook_z[..., head, :]`, before the output projection); with
  `measure="out"`, the norm of what the head writes into the residual stream instead (`z` through
  the head's slice of the output projection, bias excluded, before any post-attention norm).
- `direction_activations(model, text, site, direction)`: the value at `site` projected onto
  `direction / |direction|` at each position.
- `unit_activations(model, text, "L:N" | "L.H")`: either of the first two, from a unit string.
- `attention_pattern(model, text, layer, head)`: one head's attention probabilities [q, k].

Pass one text (str, or token ids [pos]) for one `TokenValues`; a list of texts (or ids [batch, pos])
for a list of them, one per text. Texts may differ in length.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.lens.predict import split_inputs
from mechscope.models import Inputs, Model
from mechscope.models.precision import widen

HeadMeasure = Literal["z", "out"]


class TokenValues(NamedTuple):
    """One value per token of one text."""

    tokens: list[str]
    """The text's tokens, as the text they stand for."""
    values: Tensor
    """[pos] float32 on the CPU, one value per token."""
    label: str
    """What the values are, e.g. `neuron 3:123`."""

    @property
    def max(self) -> float:
        return float(self.values.max())

    @property
    def min(self) -> float:
        return float(self.values.min())

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def argmax(self) -> int:
        """Position of the largest value (the first, if tied)."""
        return int(self.values.argmax())

    @property
    def argmax_token(self) -> str:
        return self.tokens[self.argmax]

    def stats(self) -> dict[str, float | int | str]:
        """max, its position and token, mean, min: for a table or `--json`."""
        return {
            "label": self.label,
            "max": self.max,
            "argmax": self.argmax,
            "argmax_token": self.argmax_token,
            "mean": self.mean,
            "min": self.min,
        }


class AttentionPattern(NamedTuple):
    """One head's attention probabilities on one text."""

    tokens: list[str]
    pattern: Tensor
    """[q_pos, k_pos] float32 on the CPU; row q is where position q looks."""
    label: str


# -- checks ---------------------------------------------------------------------------------------


def _index(value, what: str) -> int:
    if isinstance(value, bool):
        raise MechscopeError(f"{what} {value!r} is not an integer: give a {what} number")
    try:
        return operator.index(value)
    except TypeError:
        raise MechscopeError(f"{what} {value!r} is not an integer: give a {what} number") from None


def _check_layer(model: Model, layer) -> int:
    return model.check_layer(_index(layer, "layer"))


def _check_in(value, size: int, what: str, layer: int) -> int:
    index = _index(value, what)
    if not 0 <= index < size:
        raise MechscopeError(f"{what} {index} out of range for layer {layer}: valid {what}s are 0..{size - 1}")
    return index


# -- texts ----------------------------------------------------------------------------------------


def _batch(model: Model, text: Inputs, site: str) -> tuple[list[Tensor], list[list[str]], bool]:
    """One forward pass over every text (padded to one length): each text's value at `site` without its
    padding ([pos, ...], or [q_pos, k_pos, ...] rows and columns for a pattern), its tokens, and whether
    a single text was given."""
    items, single = split_inputs(text)
    tokens = model.encode(items)
    with torch.no_grad():
        value = model.run(tokens.ids, attention_mask=tokens.mask, read=[site]).cache[site]
    values, token_strs = [], []
    for i in range(len(items)):
        cols = tokens.mask[i].nonzero()[:, 0]
        row = value[i][:, cols][:, :, cols] if site.endswith("hook_pattern") else value[i][cols]
        values.append(row)
        token_strs.append(model.to_str_tokens(tokens.row(i)))
    return values, token_strs, single


def _per_text(model: Model, text: Inputs, site: str, value_fn, label: str):
    values, token_strs, single = _batch(model, text, site)
    with torch.no_grad():
        results = [TokenValues(t, value_fn(x).detach().float().cpu(), label) for x, t in zip(values, token_strs, strict=True)]
    return results[0] if single else results


# -- units ----------------------------------------------------------------------------------------


def neuron_activations(model: Model, text: Inputs, layer: int, neuron: int) -> TokenValues | list[TokenValues]:
    """Neuron `neuron` of layer `layer` (`blocks.L.mlp.hook_post[..., neuron]`) at each token.

    >>> tv = neuron_activations(model, "The reliability of Wikipedia is very", 3, 123)
    >>> tv.values.shape, tv.max, tv.argmax_token
    """
    layer = _check_layer(model, layer)
    neuron = _check_in(neuron, model.dims.d_mlp, "neuron", layer)
    return _per_text(model, text, f"blocks.{layer}.mlp.hook_post", lambda x: x[:, neuron], f"neuron {layer}:{neuron}")


def head_activations(
    model: Model, text: Inputs, layer: int, head: int, measure: HeadMeasure = "z"
) -> TokenValues | list[TokenValues]:
    """How much head `head` of layer `layer` outputs at each token: a norm, so never negative.

    `measure="z"` (default): |z|, the head's output before the output projection
    (`blocks.L.attn.hook_z[..., head, :]`). `measure="out"`: |W_O^h z|, what the head writes into the
    residual stream (its slice of the output projection, bias excluded, before any post-attention
    norm). Heads' `z` norms are comparable within a head; `out` norms are comparable across heads.
    """
    layer = _check_layer(model, layer)
    head = _check_in(head, model.dims.n_heads, "head", layer)
    if measure not in ("z", "out"):
        raise MechscopeError(f"unknown head measure {measure!r}: valid measures are z, out")
    site = f"blocks.{layer}.attn.hook_z"
    if measure == "z":
        return _per_text(model, text, site, lambda z: widen(z[:, head]).norm(dim=-1), f"head {layer}.{head} |z|")

    out_proj = model.block_module(layer, model.adapter.heads_out)

    def written(z: Tensor) -> Tensor:  # z: [pos, n_heads, d_head]
        only = torch.zeros_like(z)
        only[:, head] = z[:, head]
        flat = only.reshape(z.shape[0], -1)
        return widen(out_proj(flat) - out_proj(torch.zeros_like(flat))).norm(dim=-1)

    return _per_text(model, text, site, written, f"head {layer}.{head} |out|")


def unit_activations(model: Model, text: Inputs, unit, measure: HeadMeasure = "z") -> TokenValues | list[TokenValues]:
    """A neuron `"L:N"` or a head `"L.H"` (or a `mechscope.attribution.units.Unit`) at each token."""
    from mechscope.attribution.units import parse_unit

    u = parse_unit(unit, model)
    if u.kind == "neuron":
        return neuron_activations(model, text, u.layer, u.index)
    return head_activations(model, text, u.layer, u.index, measure=measure)


def direction_activations(
    model: Model, text: Inputs, site: str, direction, label: str | None = None
) -> TokenValues | list[TokenValues]:
    """The value at `site` ([batch, pos, width]) projected onto `direction / |direction|` at each token.

    `direction` is a vector of the site's width (d_model for residual-stream sites, d_mlp for
    `mlp.hook_post`): a tensor, an array or a list of numbers.
    """
    s = model.site(site)
    shape = model.shape(s)
    if len(shape) != 3 or shape[:2] != ("batch", "pos"):
        raise MechscopeError(
            f"site {s.name!r} has shape [{', '.join(map(str, shape))}]: a direction needs a [batch, pos, width] site, "
            "e.g. blocks.L.hook_resid_post"
        )
    width = shape[2]
    try:
        d = torch.as_tensor(direction, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise MechscopeError(f"direction of type {type(direction).__name__} is not a vector: give {width} numbers") from None
    if d.ndim != 1 or d.numel() != width:
        raise MechscopeError(f"direction of shape {list(d.shape)} does not fit site {s.name!r}: give a vector of {width} numbers")
    norm = float(d.norm())
    if not norm > 0 or not torch.isfinite(d).all():
        raise MechscopeError(f"direction with norm {norm:g} cannot be normalised: give a finite non-zero vector")
    unit = d / norm
    return _per_text(model, text, s.name, lambda x: x.double() @ unit.to(x.device), label or f"{s.name} · direction")


def attention_pattern(model: Model, text: Inputs, layer: int, head: int) -> AttentionPattern | list[AttentionPattern]:
    """Head `head` of layer `layer`'s attention probabilities [q, k] (`blocks.L.attn.hook_pattern`)."""
    layer = _check_layer(model, layer)
    head = _check_in(head, model.dims.n_heads, "head", layer)
    site = f"blocks.{layer}.attn.hook_pattern"
    values, token_strs, single = _batch(model, text, site)
    label = f"head {layer}.{head} attention"
    results = [AttentionPattern(t, x[head].detach().float().cpu(), label) for x, t in zip(values, token_strs, strict=True)]
    return results[0] if single else results


def as_list(values: TokenValues | Sequence[TokenValues]) -> list[TokenValues]:
    """One `TokenValues` or several, as a list."""
    return [values] if isinstance(values, TokenValues) else list(values)
