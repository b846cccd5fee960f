"""Norms as linear maps, with their scale frozen at given inputs.

Direct logit attribution splits what a norm reads into parts; that is only exact when the norm's
scale (1/rms, or 1/std for LayerNorm) is frozen at its value on the whole input. For any input x
such a norm computes `scale(x) * weight * centre(x) + bias`, where `centre` subtracts the mean for
LayerNorm and does nothing for RMSNorm. The effective weight is read off the module itself (so
Gemma's `1 + weight` needs no special case), and the scale is solved from the module's own output.

The norm is solved in the wide dtype (`models.precision`): float32 for a 16-bit model, whose sum of
squares over d_model overflows float16 (SmolLM2's final residual stream reaches 5e5), and the
model's own dtype for a float32 or float64 model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from mechscope.models.placement import module_tensors
from mechscope.models.precision import widen, widened


class FrozenNorm(NamedTuple):
    """A norm with its scale frozen; its tensors and everything it returns are in the wide dtype."""

    scale: Tensor
    """[..., 1] the norm's scale at each input."""
    weight: Tensor
    """[d] effective elementwise weight."""
    bias: Tensor
    """[d] additive bias (zeros for RMSNorm)."""
    centred: bool
    """Whether the norm subtracts the mean (LayerNorm)."""

    def apply(self, x: Tensor) -> Tensor:
        """The norm with the frozen scale: linear in x, plus the bias."""
        return self.linear(x) + self.bias

    def linear(self, x: Tensor) -> Tensor:
        x = x.to(self.scale.dtype)  # a 16-bit x is centred and scaled in float32
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        return self.scale * self.weight * x

    def transpose(self, g: Tensor) -> Tensor:
        """The adjoint of `linear`: a direction read after the norm, as a direction read before it."""
        g = self.scale * self.weight * g.to(self.scale.dtype)
        return g - g.mean(-1, keepdim=True) if self.centred else g


@torch.no_grad()
def freeze_norm(norm: nn.Module, x: Tensor) -> FrozenNorm:
    """Freeze `norm`'s scale at the inputs `x` [..., d].

    Every tensor of the result is in `wide_dtype(x.dtype)` (float32 for a float16 or bfloat16 `x`):
    the norm runs on `x` widened, with its weights widened on a copy.
    """
    x, d, run = widen(x), x.shape[-1], widened(norm)
    centred = isinstance(norm, nn.LayerNorm)
    if centred:
        held = module_tensors(norm)  # its values, also where accelerate offloaded them
        weight = widen(held["weight"]).to(x.device) if norm.weight is not None else torch.ones(d, dtype=x.dtype, device=x.device)
        bias = widen(held["bias"]).to(x.device) if norm.bias is not None else torch.zeros_like(weight)
    else:
        big = torch.full((d,), 1e3, dtype=x.dtype, device=x.device)  # rms(big) = 1e3 makes eps negligible
        weight, bias = run(big), torch.zeros(d, dtype=x.dtype, device=x.device)
    unscaled = weight * (x - x.mean(-1, keepdim=True) if centred else x)
    out = run(x) - bias
    scale = (out * unscaled).sum(-1, keepdim=True) / (unscaled * unscaled).sum(-1, keepdim=True)
    return FrozenNorm(scale, weight.detach(), bias.detach(), centred)
