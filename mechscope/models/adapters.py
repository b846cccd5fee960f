"""Adapters: where each architecture family keeps the points that mechscope names as sites.

Per-family differences live here, as data, and nowhere else. Every path is a dotted attribute
path: the top-level ones start at the HF `*ForCausalLM` module, the per-block ones at one decoder
block. A site is read or written at a module's *output* or at its *input*; which one is fixed by
the site kind (see `sites.py`), so an adapter only says which module.
"""

from __future__ import annotations

from dataclasses import dataclass

from mechscope.errors import MechscopeError, one_of


@dataclass(frozen=True)
class Adapter:
    """Module paths of one architecture family."""

    name: str
    """Family name shown to users."""
    model_types: tuple[str, ...]
    """HF `config.model_type` values this adapter serves."""
    blocks: str
    """ModuleList of decoder blocks."""
    embed: str
    """Token embedding; its output is `hook_embed` (scaled, where the module scales)."""
    final_norm: str
    """Final norm; its output is `ln_final.hook_normalized`."""
    unembed: str
    """Unembedding (lm_head)."""
    attn: str
    """Attention module of a block (the one that calls the attention function)."""
    attn_out: str
    """Module whose output is exactly what attention adds to the residual stream."""
    mlp_out: str
    """Module whose output is exactly what the MLP adds to the residual stream."""
    mlp_norm: str
    """The norm in front of the MLP; its output is `ln2.hook_normalized`, what the MLP reads."""
    neurons: str
    """Module whose input is the MLP's neurons (`mlp.hook_post`)."""
    heads_out: str
    """Module whose input is the heads' concatenated outputs (`attn.hook_z`)."""
    pos_embed: str | None = None
    """Learned position embedding, added to `hook_embed` before block 0, where the family has one."""
    parallel: bool | str = False
    """True when attention and the MLP both read the block input (so there is no `hook_resid_mid`);
    a string names the config flag that decides it."""
    final_softcap: str | None = None
    """Config attribute holding the final-logit soft cap, where the family caps logits."""
    branch_norms: bool = False
    """True when `attn_out` and `mlp_out` are norms applied to the output of `heads_out` / `neurons`
    (Gemma 2 and 3); otherwise those outputs reach the residual stream unchanged."""

    def is_parallel(self, config) -> bool:
        if isinstance(self.parallel, str):
            return bool(getattr(config, self.parallel, False))
        return self.parallel


_LLAMA_LIKE = dict(
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    attn_out="self_attn",
    mlp_out="mlp",
    mlp_norm="post_attention_layernorm",
    neurons="mlp.down_proj",
    heads_out="self_attn.o_proj",
)

_GPT2_LIKE = dict(
    blocks="transformer.h",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    attn="attn",
    attn_out="attn",
    mlp_out="mlp",
    mlp_norm="ln_2",
    neurons="mlp.c_proj",
    heads_out="attn.c_proj",
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(name="llama", model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"), **_LLAMA_LIKE),
    Adapter(
        name="gemma2-3",
        model_types=("gemma2", "gemma3", "gemma3_text"),
        final_softcap="final_logit_softcapping",
        branch_norms=True,
        # Gemma 2 and 3 normalise each branch's output before adding it to the residual stream.
        **{
            **_LLAMA_LIKE,
            "attn_out": "post_attention_layernorm",
            "mlp_out": "post_feedforward_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
        },
    ),
    Adapter(
        name="phi3",
        model_types=("phi3",),
        **{**_LLAMA_LIKE, "attn_out": "resid_attn_dropout", "mlp_out": "resid_mlp_dropout"},
    ),
    Adapter(name="gpt2", model_types=("gpt2",), **_GPT2_LIKE),
    Adapter(
        name="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        attn="attention",
        attn_out="post_attention_dropout",
        mlp_out="post_mlp_dropout",
        mlp_norm="post_attention_layernorm",
        neurons="mlp.dense_4h_to_h",
        heads_out="attention.dense",
        parallel="use_parallel_residual",
    ),
    Adapter(
        name="mechscope_tiny",  # the tiny GELU / SoLU / TopK models of mechscope.toys.tiny_model: GPT-2's layout
        model_types=("mechscope_tiny",),
        **{**_GPT2_LIKE, "neurons": "mlp.fc_out", "heads_out": "attn.o_proj"},
    ),
)


def adapter_for(model_type: str) -> Adapter:
    """The adapter serving an HF `model_type`, or a one-line error listing those supported."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = [t for a in ADAPTERS for t in a.model_types]
    raise MechscopeError(f"unknown model family {model_type!r}: supported families are {one_of(supported, 20)}")


def get_module(root, path: str):
    """Follow a dotted attribute path (`"model.layers"`) from `root`."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module
