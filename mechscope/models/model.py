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
from mechscope.models.sites import Dims, Site, parse_site, site_names
from mechscope.models.text import check_text

Inputs = str | Sequence[str] | Tensor | Sequence[int]
"""Text, a batch of texts, or token ids ([pos] or [batch, pos])."""


class RunOutput(NamedTuple):
    logits: Tensor | None
    """[batch, pos, d_vocab], or None when the forward pass stopped after the last read site."""
    cache: dict[str, Tensor]
    """Site name -> value, for every site read."""


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
        return next(self.hf.parameters()).device

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

    def to_ids(self, inputs: Inputs) -> Tensor:
        """Token ids [batch, pos] on the model's device; text is tokenised as the model expects (BOS included)."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, Tensor):
            ids = inputs if inputs.ndim == 2 else inputs.reshape(1, -1)
        elif len(inputs) and isinstance(inputs[0], str):
            for text in inputs:
                if not check_text(text).strip():
                    raise MechscopeError("empty text: give at least one non-blank character")
            encoded = [self._need_tokenizer()(t).input_ids for t in inputs]
            if len({len(e) for e in encoded}) > 1:
                raise MechscopeError(f"texts tokenise to different lengths {[len(e) for e in encoded]}: run them one at a time")
            ids = torch.tensor(encoded)
        else:
            ids = torch.as_tensor(inputs).reshape(1, -1)
        if ids.shape[-1] == 0:
            raise MechscopeError("empty input: there are no tokens to run")
        if ids.shape[-1] > self.n_ctx:
            raise MechscopeError(f"input of {ids.shape[-1]} tokens is longer than the model's context of {self.n_ctx} tokens")
        return ids.to(self.device)

    def to_str_tokens(self, ids: Tensor | Sequence[int]) -> list[str]:
        """Each token id as the text it stands for (`<id>` when the model has no tokenizer)."""
        ids = [int(i) for i in torch.as_tensor(ids).reshape(-1)]
        if self.tokenizer is None:
            return [f"<{i}>" for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

    def token_ids(self, text: str | int) -> list[int]:
        """Token ids of a continuation (no BOS), or a single token id; one-line error if it gives no token."""
        if isinstance(text, int):
            if not 0 <= text < self.config.vocab_size:
                raise MechscopeError(f"token id {text} out of range: valid ids are 0..{self.config.vocab_size - 1}")
            return [text]
        ids = self._need_tokenizer()(check_text(text, "target"), add_special_tokens=False).input_ids
        if not ids:
            raise MechscopeError(f"target {text!r} tokenises to nothing: give at least one character")
        return ids

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
    ) -> RunOutput:
        """One forward pass that reads `read` and applies `write`.

        Logits are computed when asked, and by default whenever something is written or nothing is
        read; otherwise the pass stops right after the last site read.

        >>> out = model.run("The reliability of Wikipedia is very", read=["blocks.3.hook_resid_post"])
        >>> out.cache["blocks.3.hook_resid_post"].shape   # [1, 7, 576]
        """
        ids = self.to_ids(inputs)
        read = [read] if isinstance(read, str | Site) else list(read)
        want_logits = bool(write) or not read if logits is None else logits
        with torch.set_grad_enabled(grad), self.hooks(read, write, stop_early=not want_logits) as hooks:
            if want_logits:
                return RunOutput(self.hf(ids, use_cache=False, logits_to_keep=int(last_only)).logits, hooks.cache)
            self.hf(ids, use_cache=False, logits_to_keep=1)
        return RunOutput(None, hooks.cache)

    def unembed(self, resid: Tensor) -> Tensor:
        """Logits from residual-stream vectors [..., d_model], through the model's own final norm and unembedding."""
        logits = self.module(self.adapter.unembed)(self.module(self.adapter.final_norm)(resid))
        cap = getattr(self.config, self.adapter.final_softcap, None) if self.adapter.final_softcap else None
        return torch.tanh(logits / cap) * cap if cap else logits
