"""A small GPT written here and registered with transformers as `model_type = "mechscope_tiny"`.

One or two pre-LayerNorm blocks over learned token and position embeddings, as in GPT-2:

    x = wte(tokens) + wpe(positions)
    x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))        # per block
    logits = lm_head(ln_f(x))                            # untied from wte

The MLP is `fc_out(act(fc_in(x)))` with one of three activations (`ACTIVATIONS`):

- `gelu`: GELU (exact, erf form), the baseline.
- `solu`: SoLU, `x * softmax(x)` over the MLP's units, then a LayerNorm over them (Elhage et al. 2022,
  "Softmax Linear Units"). The LayerNorm adds 2 * d_mlp parameters per layer; the neurons mechscope
  reads (`mlp.hook_post`, the input of `fc_out`) are after it.
- `topk`: the k largest pre-activations of each token pass through GELU and every other unit is zero,
  so exactly k neurons are non-zero per token. GELU rather than ReLU keeps the kept units' values those
  of the baseline, and keeps k non-zeros even where fewer than k pre-activations are positive.

Otherwise the three share every shape, so `init_weights(model, seed)` gives them the same starting
weights. The unembedding is untied: the embedding reads tokens and the unembedding writes them, and
direct logit attribution reads the unembedding alone.

Attention calls the function `config._attn_implementation` names (eager, SDPA, flex attention, or
mechscope's own, which reads and writes attention patterns), with the causal mask transformers builds.
Importing this module registers the classes with `AutoConfig` and `AutoModelForCausalLM`, so that
`AutoModelForCausalLM.from_pretrained(folder)` loads a saved folder without remote code.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from mechscope.toys.tiny_shape import check_shape

MODEL_TYPE = "mechscope_tiny"


class TinyConfig(PreTrainedConfig):
    """The shape of a tiny model. Also readable under TransformerLens names: d_model, n_layers, n_heads,
    d_mlp, n_ctx, d_vocab."""

    model_type = MODEL_TYPE
    attribute_map = {
        "d_model": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "d_mlp": "intermediate_size",
        "n_ctx": "max_position_embeddings",
        "d_vocab": "vocab_size",
    }

    vocab_size: int = 4096
    max_position_embeddings: int = 128
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int | None = None
    """None: 4 * hidden_size."""
    act: str = "gelu"
    """gelu, solu or topk."""
    k: int = 32
    """Neurons kept per token by topk (ignored by gelu and solu)."""
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        super().__post_init__(**kwargs)
        check_shape(self.act, self.num_hidden_layers, self.hidden_size, self.num_attention_heads, self.intermediate_size, self.k)


# -- attention ------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: Tensor,  # [batch, n_heads, q_pos, d_head]
    key: Tensor,  # [batch, n_heads, k_pos, d_head]
    value: Tensor,  # [batch, n_heads, k_pos, d_head]
    attention_mask: Tensor | None,  # additive [batch, 1, q_pos, k_pos], or None
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scaling + mask) v: ([batch, q_pos, n_heads, d_head], probabilities [batch, n_heads, q_pos, k_pos])."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class TinyAttention(nn.Module):
    """Causal multi-head attention; the attention function is looked up by `config._attn_implementation`."""

    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        d_model = config.hidden_size
        self.d_head = d_model // config.num_attention_heads
        self.scaling = self.d_head**-0.5
        self.is_causal = True
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, hidden_states: Tensor, attention_mask=None, cache: Cache | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        shape = (*hidden_states.shape[:-1], -1, self.d_head)  # [batch, pos, n_heads, d_head]
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        z, probs = attention(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o_proj(z.reshape(*hidden_states.shape[:-1], -1)), probs


# -- MLP ------------------------------------------------------------------------------------------


class SoLU(nn.Module):
    """x * softmax(x) over the units, then a LayerNorm over them (Elhage et al. 2022)."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.ln = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x * torch.softmax(x, dim=-1))


class TopK(nn.Module):
    """GELU of the k largest units of each token; every other unit is zero."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.k = config.k

    def forward(self, x: Tensor) -> Tensor:
        values, indices = x.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(x).scatter(-1, indices, nn.functional.gelu(values))


def _activation(config: TinyConfig) -> nn.Module:
    return {"gelu": lambda c: nn.GELU(), "solu": SoLU, "topk": TopK}[config.act](config)


class TinyMLP(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)  # its input is mlp.hook_post

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class TinyBlock(nn.Module):
    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = TinyAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = TinyMLP(config)

    def forward(self, hidden_states: Tensor, attention_mask=None, cache: Cache | None = None, **kwargs) -> Tensor:
        x = hidden_states
        x = x + self.attn(self.ln_1(x), attention_mask=attention_mask, cache=cache, **kwargs)[0]
        return x + self.mlp(self.ln_2(x))


# -- models ---------------------------------------------------------------------------------------


class TinyPreTrainedModel(PreTrainedModel):
    config_class = TinyConfig
    config: TinyConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["TinyBlock"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": TinyBlock, "attentions": TinyAttention}


class TinyModel(TinyPreTrainedModel):
    """The blocks between the embeddings and the final LayerNorm."""

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(TinyBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: Tensor | None = None,  # [batch, pos]
        attention_mask: Tensor | None = None,  # [batch, pos], 1 at real tokens
        position_ids: Tensor | None = None,  # [batch, pos] or [1, pos]
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(seen, seen + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, position_ids=position_ids
        )
        x = inputs_embeds + self.wpe(position_ids)
        for block in self.h:
            x = block(x, attention_mask=mask, cache=cache, position_ids=position_ids, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), cache=cache if use_cache else None)


class TinyForCausalLM(TinyPreTrainedModel, GenerationMixin):
    """A tiny GPT with a gelu, solu or topk MLP; `lm_head` is untied from the token embedding."""

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.transformer = TinyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )  # fmt: skip
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states, attentions=out.attentions
        )


# -- initialisation and counting --------------------------------------------------------------------

_RESIDUAL_WRITERS = ("attn.o_proj.weight", "mlp.fc_out.weight")
"""Weights that write the residual stream: drawn with std / sqrt(2 * layers), as GPT-2 does."""


@torch.no_grad()
def init_weights(model: TinyForCausalLM, seed: int) -> TinyForCausalLM:
    """Draw every parameter afresh from `seed`: matrices and embeddings normal(0, initializer_range) (those
    writing the residual stream scaled by 1/sqrt(2 * layers)), biases 0, LayerNorm weights 1.

    Each parameter is drawn from its own generator, seeded from `seed` and the parameter's name, so
    models that share a parameter's name and shape (the three activations) start with it equal.
    """
    config = model.config
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.zero_()
        elif param.ndim == 1:  # a LayerNorm's weight
            param.fill_(1.0)
        else:
            std = config.initializer_range
            if name.endswith(_RESIDUAL_WRITERS):
                std /= (2 * config.num_hidden_layers) ** 0.5
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(std))
    return model


def parameter_count(config: TinyConfig) -> int:
    """Parameters of a tiny model, by hand: embeddings, blocks, final norm, unembedding.

    Every activation has the same count except SoLU, whose LayerNorm adds 2 * d_mlp per layer.
    """
    d, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
    attention = 4 * (d * d + d)
    mlp = (d * m + m) + (m * d + d) + (2 * m if config.act == "solu" else 0)
    block = 2 * (2 * d) + attention + mlp
    return v * d + config.max_position_embeddings * d + config.num_hidden_layers * block + 2 * d + d * v


def register() -> None:
    """Register the classes with transformers' Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, TinyConfig, exist_ok=True)
    AutoModelForCausalLM.register(TinyConfig, TinyForCausalLM, exist_ok=True)


register()
