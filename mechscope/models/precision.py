"""Where mechscope computes wider than the model: reductions over what a 16-bit model produced.

A model may run in float16 or bfloat16, and its forward pass stays in that dtype. A method that
reduces over the forward's values (a sum, norm, dot product, softmax, mean, variance, histogram or
top-k) first widens them to `wide_dtype`: float32 for 16-bit floats, and a float32 or float64 model's
own dtype. float16 overflows past 65504, which the sum of squares of a residual stream passes
easily, and bfloat16 keeps 8 significant bits, too few to sum hundreds of terms.

Weights such a reduction reads are widened the same way, on a copy: the model itself never changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mechscope.models.placement import bare, module_tensors


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for a 16-bit float dtype; float32 and float64 stay as they are."""
    return torch.promote_types(dtype, torch.float32)


def widen(x: Tensor) -> Tensor:
    """`x` in `wide_dtype(x.dtype)` (`x` itself when it is already float32 or wider)."""
    return x.to(wide_dtype(x.dtype))


def widened(module: nn.Module) -> Callable[..., Tensor]:
    """`module` as a function of inputs in the wide dtype: its own forward, with its floating parameters
    and buffers widened on a copy (the module is not changed). Gradients flow through it.

    On a model placed by a device map (`models.placement`) the weights are those accelerate may keep
    offloaded, read once here; inputs go to the device the weights are on, and the output comes back
    to the device of the first input.

    >>> norm = widened(model.module(model.adapter.final_norm))
    >>> norm(widen(resid))   # float32 for a float16 model
    """
    state = {name: widen(t) if t.is_floating_point() else t for name, t in module_tensors(module).items()}
    run, device = bare(module), next(iter(state.values())).device if state else None

    def call(*args: Tensor) -> Tensor:
        moved = tuple(a.to(device) if device is not None and isinstance(a, Tensor) else a for a in args)
        return torch.func.functional_call(run, state, moved).to(args[0].device)

    return call


def wide_unembed(model, final_norm: bool = False) -> Callable[[Tensor], Tensor]:
    """The model's unembedding (and any final logit soft cap) as a function computing in the wide dtype.

    It takes final-norm outputs [..., d_model] (`ln_final.hook_normalized`), or with `final_norm=True`
    residual-stream vectors that it first puts through the model's final norm, and returns logits
    [..., d_vocab] in the wide dtype (float32 for a 16-bit model): what `Model.unembed` computes, with
    the dot products over d_model in float32. The weights are widened once, when this is called.

    >>> unembed = wide_unembed(model)
    >>> logits = unembed(model.run(ids, read=["ln_final.hook_normalized"]).cache["ln_final.hook_normalized"])
    """
    a = model.adapter
    unembed = widened(model.module(a.unembed))
    norm = widened(model.module(a.final_norm)) if final_norm else lambda x: x
    return lambda x: model.soft_cap(unembed(norm(widen(x))))
