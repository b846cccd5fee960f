"""Reading and writing sites on an unmodified HF model.

`Hooks` is a context manager that installs, for one set of reads and writes, the fewest PyTorch
hooks that express them, and removes them on exit. A write is any function of the site's value
(`replace` and `add` build the common ones); the rest of the forward pass sees what it returns.

Where a site is not the input or output of any module, the hook is placed where it still means
exactly what it says:

- `hook_resid_mid` is `resid_pre + attn_out`. It is read at the attention branch's output, and a
  write is applied there as the difference it makes, so the MLP *and* the residual connection both
  see the written value.
- `attn.hook_pattern` lives inside the attention function (see `attention.py`).

When only reads are wanted (`stop_early=True`), the forward pass is abandoned as soon as the last
requested site has been read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import torch
from torch import Tensor

from mechscope.models import attention
from mechscope.models.sites import Site

Edit = Callable[[Tensor], Tensor]
"""A write: takes a site's value and returns the value the rest of the model should see."""


def replace(value: Tensor | float) -> Edit:
    """A write that replaces the site's value (broadcast to its shape)."""
    return lambda x: torch.as_tensor(value, dtype=x.dtype, device=x.device).expand_as(x).clone()


def add(delta: Tensor | float) -> Edit:
    """A write that adds `delta` (broadcast) to the site's value."""
    return lambda x: x + torch.as_tensor(delta, dtype=x.dtype, device=x.device)


class StopForward(Exception):
    """Raised inside the forward pass once every requested site has been read."""


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _with_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


class Hooks:
    """Reads `read` and applies `write` on every forward pass of `model.hf` inside the `with` block.

    `cache` maps each read site name to its value on the latest forward pass (after any write to
    the same site).
    """

    def __init__(self, model, read: Iterable[Site], write: Mapping[Site, Edit], stop_early: bool = False):
        self.model = model
        self.read = set(read)
        self.write = dict(write)
        self.stop_early = stop_early
        self.cache: dict[str, Tensor] = {}
        self._handles: list = []
        self._patterns: list = []
        self._resid_pre: dict[int, Tensor] = {}
        self._batch = 1

    # -- applying one site ------------------------------------------------------------------------

    def _visit(self, site: Site, value: Tensor) -> Tensor:
        edit = self.write.get(site)
        if edit is not None:
            if any(value is cached for cached in self.cache.values()):
                value = value.clone()  # an in-place edit must not reach a value already read
            value = edit(value)
        if site in self.read:
            self.cache[site.name] = value
            if self.stop_early and len(self.cache) == len(self.read):
                raise StopForward
        return value

    def _visit_heads(self, site: Site, value: Tensor) -> Tensor:
        """Sites whose module input is [batch, pos, n_heads * d_head] but whose value is per head."""
        dims = self.model.dims
        heads = self._visit(site, value.view(*value.shape[:-1], dims.n_heads, dims.d_head))
        return heads.reshape(value.shape)

    # -- installing -------------------------------------------------------------------------------

    def __enter__(self) -> Hooks:
        self.cache.clear()
        sites = self.read | set(self.write)
        by_kind: dict[str, set[int | None]] = defaultdict(set)
        for site in sites:
            by_kind[site.kind].add(site.layer)
        try:
            self._install(by_kind)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        for module in self._patterns:
            attention.PATTERN_HOOKS.pop(module, None)
        self._handles, self._patterns = [], []
        self._resid_pre.clear()
        return bool(exc and exc[0] is StopForward)

    def _on_output(self, module, fn: Callable[[Tensor], Tensor]) -> None:
        self._handles.append(module.register_forward_hook(lambda m, args, out: _with_first(out, fn(_first(out)))))

    def _on_input(self, module, fn: Callable[[Tensor], Tensor]) -> None:
        def pre_hook(m, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def _install(self, by_kind: dict[str, set[int | None]]) -> None:
        model, adapter = self.model, self.model.adapter
        for kind, module_path in (
            ("hook_embed", adapter.embed),
            ("ln_final.hook_normalized", adapter.final_norm),
        ):
            if kind in by_kind:
                self._on_output(model.module(module_path), partial(self._visit, Site(kind)))
        if "hook_pos_embed" in by_kind:
            self._on_output(model.module(adapter.embed), self._note_batch)
            self._on_output(model.module(adapter.pos_embed), self._pos_embed_hook)
        mids = by_kind.get("hook_resid_mid", set())
        for layer in by_kind.get("hook_resid_pre", set()) | mids:
            self._on_input(model.block(layer), partial(self._resid_pre_hook, layer))
        for layer in by_kind.get("hook_attn_out", set()) | mids:
            self._on_output(model.block_module(layer, adapter.attn_out), partial(self._attn_out_hook, layer))
        for kind, path, point in (
            ("hook_mlp_out", adapter.mlp_out, self._on_output),
            ("mlp.hook_post", adapter.neurons, self._on_input),
        ):
            for layer in by_kind.get(kind, set()):
                point(model.block_module(layer, path), partial(self._visit, Site(kind, layer)))
        for layer in by_kind.get("hook_resid_post", set()):
            self._on_output(model.block(layer), partial(self._visit, Site("hook_resid_post", layer)))
        for layer in by_kind.get("attn.hook_z", set()):
            module = model.block_module(layer, adapter.heads_out)
            self._on_input(module, partial(self._visit_heads, Site("attn.hook_z", layer)))
        for layer in by_kind.get("attn.hook_pattern", set()):
            module = model.block_module(layer, adapter.attn)
            site = Site("attn.hook_pattern", layer)
            attention.PATTERN_HOOKS[module] = (partial(self._visit, site), site in self.write)
            self._patterns.append(module)

    def _note_batch(self, embed: Tensor) -> Tensor:
        self._batch = embed.shape[0]
        return embed

    def _pos_embed_hook(self, value: Tensor) -> Tensor:
        """The position embedding is computed once, [1, pos, d_model], and broadcast over the batch by
        the model; the site holds it per sequence, [batch, pos, d_model], like `hook_embed`."""
        if value.shape[0] == 1 and self._batch > 1:
            value = value.expand(self._batch, *value.shape[1:]).contiguous()
        return self._visit(Site("hook_pos_embed"), value)

    def _resid_pre_hook(self, layer: int, value: Tensor) -> Tensor:
        site = Site("hook_resid_pre", layer)
        if site in self.read or site in self.write:
            value = self._visit(site, value)
        self._resid_pre[layer] = value
        return value

    def _attn_out_hook(self, layer: int, attn_out: Tensor) -> Tensor:
        site = Site("hook_attn_out", layer)
        if site in self.read or site in self.write:
            attn_out = self._visit(site, attn_out)
        mid_site = Site("hook_resid_mid", layer)
        if mid_site in self.read or mid_site in self.write:
            mid = self._resid_pre[layer] + attn_out
            new_mid = self._visit(mid_site, mid)
            if new_mid is not mid:  # the block adds attn_out to resid_pre itself: write the difference
                attn_out = attn_out + (new_mid - mid)
        return attn_out
