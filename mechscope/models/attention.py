"""The attention function mechscope installs, so that `attn.hook_pattern` can be read and written.

Attention probabilities are not the output of any module: HF computes them inside an attention
function chosen by `config._attn_implementation`. mechscope registers two such functions with
transformers, `mechscope_sdpa` and `mechscope_eager`, and routes a model through them only while some
hook context reads or writes a pattern (`route`); the rest of the time the model runs under its own
setting, untouched, so that every branch HF takes for that setting stays taken. While routed, a layer
whose pattern is not hooked hands the call, unchanged, to the kernel the model used before (the
family's own eager code for `eager`, SDPA for anything else). A layer whose pattern is read also has
its probabilities computed explicitly and passed to the hook, still returning the model's own
kernel's output; one whose pattern is written multiplies the rewritten probabilities with the values.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mechscope.errors import MechscopeError

# attention module -> (the function that reads/writes its probabilities [batch, n_heads, q_pos, k_pos],
#                     whether that function writes)
PATTERN_HOOKS: weakref.WeakKeyDictionary[nn.Module, tuple[Callable[[Tensor], Tensor], bool]] = weakref.WeakKeyDictionary()


def _family_eager(module: nn.Module) -> Callable:
    """The eager attention function defined next to the module's own class."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _dense_mask(attention_mask, q_len: int, k_len: int, device) -> Tensor:
    """The mask as a tensor the scores can take: bool (True = may attend) or additive floats.

    None is SDPA's causal shortcut (the queries are the last q_len keys); a flex-attention `BlockMask`
    is expanded from its own mask function.
    """
    if attention_mask is None:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    if isinstance(attention_mask, Tensor):
        return attention_mask[..., :k_len]
    from torch.nn.attention.flex_attention import create_mask

    return create_mask(attention_mask.mask_mod, attention_mask.shape[0], 1, q_len, k_len, device=device)


def _probs(
    query: Tensor,  # [batch, n_heads, q_pos, d_head]
    key: Tensor,  # [batch, n_heads, k_pos, d_head], already repeated for grouped-query attention
    attention_mask,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> Tensor:
    """Attention probabilities [batch, n_heads, q_pos, k_pos], computed as the eager kernels do."""
    if kwargs.get("s_aux") is not None:
        raise MechscopeError("attn.hook_pattern is not supported for attention with sink tokens")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = _dense_mask(attention_mask, *scores.shape[-2:], scores.device)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


def _dispatcher(base: Callable[[nn.Module], Callable]) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        hook = PATTERN_HOOKS.get(module)
        if hook is None:
            return base(module)(module, query, key, value, attention_mask, **kwargs)
        visit, writes = hook
        n_rep = query.shape[1] // key.shape[1]  # grouped-query attention shares each k/v head
        repeated_key = key.repeat_interleave(n_rep, dim=1)
        probs = visit(_probs(query, repeated_key, attention_mask, **kwargs))
        if not writes:  # a read must not perturb the computation: keep the model's own kernel
            return base(module)(module, query, key, value, attention_mask, **kwargs)
        out = torch.matmul(probs.to(value.dtype), value.repeat_interleave(n_rep, dim=1))
        return out.transpose(1, 2).contiguous(), probs

    return attention


# The implementations routed with their own kernel and masks; any other goes through SDPA's.
_KERNELS = ("eager", "sdpa", "flex_attention")


@functools.cache
def _register() -> None:
    """Register mechscope's attention functions with transformers (once, when a pattern is first hooked,
    so that `import mechscope` does not pay for importing transformers' modelling code)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in _KERNELS:
        if name == "eager":
            base = _family_eager
        else:
            kernel = ALL_ATTENTION_FUNCTIONS[name]
            base = lambda module, kernel=kernel: kernel  # noqa: E731
        AttentionInterface.register(f"mechscope_{name}", _dispatcher(base))
        AttentionMaskInterface.register(f"mechscope_{name}", ALL_MASK_ATTENTION_FUNCTIONS[name])


_ROUTED = {f"mechscope_{name}": name for name in _KERNELS}
# HF model -> the attention implementation it had before `route` switched it to mechscope's
_BEFORE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def route(hf_model, on: bool) -> None:
    """Route the model's attention through mechscope's dispatcher (`on`), or give it back its own setting.

    The own setting's kernel and masks stay the base (eager, SDPA or flex attention); any other
    implementation is routed through SDPA's.
    """
    current = hf_model.config._attn_implementation
    if on and current not in _ROUTED:
        _register()
        _BEFORE[hf_model] = current
        hf_model.set_attn_implementation(f"mechscope_{current if current in _KERNELS else 'sdpa'}")
    elif not on and current in _ROUTED:
        hf_model.set_attn_implementation(_BEFORE.pop(hf_model, _ROUTED[current]))
