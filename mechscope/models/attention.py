"""The attention function mechscope installs, so that `attn.hook_pattern` can be read and written.

Attention probabilities are not the output of any module: HF computes them inside an attention
function chosen by `config._attn_implementation`. mechscope registers two such functions with
transformers, `mechscope_sdpa` and `mechscope_eager`. While no pattern site of a layer is active they
hand the call, unchanged, to the function the model used before (SDPA, or the family's own eager
code), so an unhooked forward computes exactly what plain HF computes. While a pattern is read they
also compute the probabilities explicitly and pass them to the hook, still returning the model's own
kernel's output; while one is written they multiply the rewritten probabilities with the values.
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


def _probs(
    query: Tensor,  # [batch, n_heads, q_pos, d_head]
    key: Tensor,  # [batch, n_heads, k_pos, d_head], already repeated for grouped-query attention
    attention_mask: Tensor | None,
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
    q_len, k_len = scores.shape[-2:]
    if attention_mask is None:  # SDPA's causal shortcut: the queries are the last q_len keys
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., :k_len]
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


@functools.cache
def _register() -> None:
    """Register mechscope's attention functions with transformers (once, when the first model is wrapped,
    so that `import mechscope` does not pay for importing transformers' modelling code)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register("mechscope_sdpa", _dispatcher(lambda module: sdpa_attention_forward))
    AttentionInterface.register("mechscope_eager", _dispatcher(_family_eager))
    AttentionMaskInterface.register("mechscope_sdpa", sdpa_mask)
    AttentionMaskInterface.register("mechscope_eager", eager_mask)


def install(hf_model) -> None:
    """Route the model's attention through mechscope's dispatcher, keeping its own kernel as the base."""
    _register()
    current = hf_model.config._attn_implementation
    if current and current.startswith("mechscope_"):
        return
    hf_model.set_attn_implementation("mechscope_eager" if current == "eager" else "mechscope_sdpa")
