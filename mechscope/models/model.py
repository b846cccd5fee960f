"""`Model`: one HF causal LM, its tokenizer and its adapter, spoken to in sites.

Everything above `models/` uses this object and never an HF module name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.models import attention
from mechscope.models.adapters import adapter_for, get_module
from mechscope.models.hooks import Edit, Hooks
from mechscope.models.placement import execution_device
from mechscope.models.sites import Dims, Site, parse_site, site_names
from mechscope.models.text import check_text
from mechscope.models.tokens import Tokens, TokenText, continuation_ids, pad

Inputs = str | Sequence[str] | Tensor | Sequence[int]
"""Text, a batch of texts, or token ids ([pos] or [batch, pos])."""


class RunOutput(NamedTuple):
    logits: Tensor | None
    """[batch, pos, d_vocab], or None when the forward pass stopped after the last read site."""
    cache: dict[str, Tensor]
    """Site name -> value, for every site read. Values at padding are zero."""
    mask: Tensor | None = None
    """[batch, pos] bool: True at real tokens, False at padding (inputs of different lengths)."""


def _in_features(module) -> int:
    """Input width of a Linear (or of GPT-2's transposed Conv1D)."""
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[0]


class Model:
    """A loaded causal LM. Build one with `mechscope.load`."""

    def __init__(self, hf_model, tokenizer=None, name: str = "model"):
        self.hf = hf_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.config = hf_model.config
        self._token_text: TokenText | None = None
        self.adapter = adapter_for(self.config.model_type)
        attention.route(self.hf, False)  # a copy made while routed gets its own setting back
        heads_in = _in_features(self.block_module(0, self.adapter.heads_out))
        self.dims = Dims(
            n_layers=len(self.module(self.adapter.blocks)),
            d_model=self.config.hidden_size,
            d_mlp=_in_features(self.block_module(0, self.adapter.neurons)),
            n_heads=self.config.num_attention_heads,
            d_head=heads_in // self.config.num_attention_heads,
            has_resid_mid=not self.adapter.is_parallel(self.config),
            has_pos_embed=self.adapter.pos_embed is not None,
        )

    def __repr__(self) -> str:
        d = self.dims
        return f"Model({self.name!r}, {self.adapter.name}, {d.n_layers} layers, d_model={d.d_model}, d_mlp={d.d_mlp})"

    # -- modules (the only place module paths are followed) ----------------------------------------

    def module(self, path: str):
        return get_module(self.hf, path)

    def block(self, layer: int):
        return self.module(self.adapter.blocks)[layer]

    def block_module(self, layer: int, path: str):
        return get_module(self.block(layer), path)

    @property
    def device(self) -> torch.device:
        """Where inputs go, and where `run` returns logits and cached values: the device the token embedding
        computes on (for a model placed by a `device_map`, the execution device accelerate gave it)."""
        return execution_device(self.module(self.adapter.embed))

    @property
    def n_ctx(self) -> int:
        return getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", 2048)

    # -- sites ------------------------------------------------------------------------------------

    def site(self, name: str | Site) -> Site:
        """Check a site name against this model (one-line error if it is not valid)."""
        return parse_site(name, self.dims)

    def site_names(self) -> list[str]:
        """Every site of this model, in forward order."""
        return site_names(self.dims)

    def shape(self, site: str | Site) -> tuple[str | int, ...]:
        return self.dims.shape(self.site(site))

    def check_layer(self, layer: int) -> int:
        if not -self.dims.n_layers <= layer < self.dims.n_layers:
            raise MechscopeError(f"layer {layer} out of range: valid layers are 0..{self.dims.n_layers - 1}")
        return layer % self.dims.n_layers

    # -- tokens -----------------------------------------------------------------------------------

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise MechscopeError(f"{self.name} has no tokenizer: pass token ids instead of text")
        return self.tokenizer

    @property
    def pad_id(self) -> int:
        """The id padding is filled with (any valid id: padding is masked out)."""
        for value in (getattr(self.tokenizer, "pad_token_id", None), self.config.pad_token_id, self.config.eos_token_id):
            value = value[0] if isinstance(value, list) else value
            if value is not None:
                return int(value)
        return 0

    def encode(self, inputs: Inputs, attention_mask: Tensor | None = None, side: str = "right") -> Tokens:
        """Token ids and attention mask of text, texts, or token ids, padded to one length on `side`.

        Texts are tokenised as the model expects (BOS included); texts and id sequences may differ in
        length. Token ids [batch, pos] may come with their own `attention_mask` [batch, pos] (1 = real).

        >>> t = model.encode(["The capital of France is", "Rome is"])
        >>> t.ids.shape, t.lengths   # torch.Size([2, 5]), [5, 2]
        """
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, Tensor):
            ids = inputs if inputs.ndim == 2 else inputs.reshape(1, -1)
            if attention_mask is not None and attention_mask.shape != ids.shape:
                raise MechscopeError(
                    f"attention_mask of shape {list(attention_mask.shape)} does not match ids of shape {list(ids.shape)}"
                )
            mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            tokens = Tokens(ids.long(), mask.to(ids.device))
        else:
            if not len(inputs):
                raise MechscopeError("no texts given: give at least one text")
            if all(isinstance(t, int) for t in inputs):
                inputs = [inputs]  # one sequence of token ids
            if all(isinstance(t, str) for t in inputs):
                for text in inputs:
                    if not check_text(text).strip():
                        raise MechscopeError("empty text: give at least one non-blank character")
                tokenizer = self._need_tokenizer()
                inputs = [tokenizer(t).input_ids for t in inputs]
            tokens = pad(inputs, self.pad_id, side)
        lengths = tokens.lengths
        if min(lengths) == 0:
            raise MechscopeError("empty input: there are no tokens to run")
        if max(lengths) > self.n_ctx:
            raise MechscopeError(f"input of {max(lengths)} tokens is longer than the model's context of {self.n_ctx} tokens")
        return Tokens(tokens.ids.to(self.device), tokens.mask.to(self.device))

    def to_ids(self, inputs: Inputs) -> Tensor:
        """Token ids [batch, pos] on the model's device, for inputs of one length (see `encode` for any lengths)."""
        tokens = self.encode(inputs)
        if tokens.padded:
            raise MechscopeError(
                f"texts tokenise to different lengths {tokens.lengths}: use model.encode(texts) for padded ids with "
                "a mask, or pass the texts themselves, which every function that takes a list accepts"
            )
        return tokens.ids

    def to_str_tokens(self, ids: Tensor | Sequence[int]) -> list[str]:
        """Each token id as the text it stands for, leading space included (`<id>` when the model has no tokenizer)."""
        ids = [int(i) for i in torch.as_tensor(ids).reshape(-1)]
        if self.tokenizer is None:
            return [f"<{i}>" for i in ids]
        if self._token_text is None:
            self._token_text = TokenText(self.tokenizer)
        return self._token_text(ids)

    def token_ids(self, text: str | int, prompt: str | Tensor | None = None) -> list[int]:
        """Token ids of a continuation of `prompt` (no BOS), or a single token id; one-line error if it gives no token.

        A target string stands for the tokens it has after the prompt's text (`continuation_ids`), so
        tokenizers that prepend `▁` to a text do not turn `" Paris"` into `['▁', '▁Paris']`.
        """
        if isinstance(text, int):
            if not 0 <= text < self.config.vocab_size:
                raise MechscopeError(f"token id {text} out of range: valid ids are 0..{self.config.vocab_size - 1}")
            return [text]
        check_text(text, "target")
        return continuation_ids(self._need_tokenizer(), text, prompt if isinstance(prompt, str) else None)

    # -- running ----------------------------------------------------------------------------------

    def hooks(self, read: Iterable[str | Site] = (), write: Mapping[str | Site, Edit] | None = None, stop_early=False):
        """Context manager reading and writing sites on every forward pass of `self.hf` inside it."""
        read_sites = [self.site(s) for s in ([read] if isinstance(read, str | Site) else read)]
        write_sites = {self.site(s): fn for s, fn in (write or {}).items()}
        return Hooks(self, read_sites, write_sites, stop_early=stop_early)

    def run(
        self,
        inputs: Inputs,
        read: Iterable[str | Site] = (),
        write: Mapping[str | Site, Edit] | None = None,
        logits: bool | None = None,
        grad: bool = False,
        last_only: bool = False,
        attention_mask: Tensor | None = None,
    ) -> RunOutput:
        """One forward pass that reads `read` and applies `write`.

        Logits are computed when asked, and by default whenever something is written or nothing is
        read; otherwise the pass stops right after the last site read. `last_only` keeps the logits of
        each sequence's last real token only ([batch, 1, d_vocab]).

        Logits and cached values are on `model.device`, also when a `device_map` spread the blocks over
        several devices; with `grad=True` cached values stay on the device of the block that computed
        them, so that gradients with respect to them can be taken.

        Texts (or id sequences) of different lengths run as one batch, padded on the right, where
        causal attention keeps padding from reaching any real token; each sequence's values equal
        those of running it alone. Token ids may come with their own `attention_mask` [batch, pos]:
        padding anywhere else (on the left, as for generation) is masked out of attention and every
        token gets its own position. Values at padding are zero in the cache, and `mask` says where
        they are.

        >>> out = model.run("The reliability of Wikipedia is very", read=["blocks.3.hook_resid_post"])
        >>> out.cache["blocks.3.hook_resid_post"].shape   # [1, 7, 576]
        """
        tokens = self.encode(inputs, attention_mask)
        read = [read] if isinstance(read, str | Site) else list(read)
        want_logits = bool(write) or not read if logits is None else logits
        kwargs = {}
        if not tokens.right_padded:  # right padding needs no mask: causal attention never looks ahead
            kwargs = dict(attention_mask=tokens.mask.long(), position_ids=tokens.position_ids())
        gather_last = want_logits and last_only and tokens.padded and bool((tokens.last() != tokens.ids.shape[1] - 1).any())
        final = "ln_final.hook_normalized"
        extra = [final] if gather_last and final not in read else []
        with torch.set_grad_enabled(grad), self.hooks([*read, *extra], write, stop_early=not want_logits) as hooks:
            out = self.hf(tokens.ids, use_cache=False, logits_to_keep=int(last_only) if want_logits else 1, **kwargs)
        cache = hooks.cache if grad else {name: value.to(tokens.ids.device) for name, value in hooks.cache.items()}
        out_logits = out.logits if want_logits else None
        if gather_last:  # each sequence's last real token, through the unembedding
            rows = torch.arange(tokens.ids.shape[0], device=cache[final].device)
            out_logits = self.unembed_normalized(cache[final][rows, tokens.last().to(rows.device)])[:, None].to(tokens.ids.device)
            cache = {k: v for k, v in cache.items() if k not in extra}
        if tokens.padded:
            cache = {name: self._zero_padding(name, value, tokens.mask) for name, value in cache.items()}
        return RunOutput(out_logits, cache, tokens.mask)

    def _zero_padding(self, name: str, value: Tensor, mask: Tensor) -> Tensor:
        """A site's value with every padded position (query or key, for patterns) set to zero."""
        dims = self.dims.shape(self.site(name))
        keep = torch.ones_like(value, dtype=torch.bool)
        for axis, dim in enumerate(dims):
            if dim in ("pos", "q_pos", "k_pos"):
                shape = [1] * value.ndim
                shape[0], shape[axis] = mask.shape[0], mask.shape[1]
                keep = keep & mask.to(value.device).reshape(shape)
        return value.masked_fill(~keep, 0)

    def unembed(self, resid: Tensor) -> Tensor:
        """Logits from residual-stream vectors [..., d_model], through the model's own final norm and unembedding."""
        return self.unembed_normalized(self.module(self.adapter.final_norm)(resid))

    def unembed_normalized(self, normalized: Tensor) -> Tensor:
        """Logits from final-norm outputs [..., d_model] (`ln_final.hook_normalized`): the unembedding and any soft cap.

        The logits are on the device of `normalized`, wherever a device map put the unembedding."""
        return self.soft_cap(self.module(self.adapter.unembed)(normalized)).to(normalized.device)

    def soft_cap(self, logits: Tensor) -> Tensor:
        """The family's final logit soft cap, `cap * tanh(logits / cap)`, where it has one; else `logits`."""
        cap = getattr(self.config, self.adapter.final_softcap, None) if self.adapter.final_softcap else None
        return torch.tanh(logits / cap) * cap if cap else logits
