"""Reading and writing sites on an unmodified HF model.

`Hooks` is a context manager holding one set of reads and writes. A write is any function of the
site's value (`replace` and `add` build the common ones); the rest of the forward pass sees what it
returns. Contexts compose: every model has one `HookStack` of the contexts active on it, outermost
first, and one set of PyTorch hooks serving all of them. At each site the contexts apply in the
order they were entered, so a reader sees the writes of every context entered before it (and its
own), and every later site sees every write. Leaving a context removes only its own reads and writes.

Where a site is not the input or output of any module, the hook is placed where it still means
exactly what it says:

- `hook_resid_mid` is `resid_pre + attn_out`. It is read at the attention branch's output, and a
  write is applied there as the difference it makes, so the MLP *and* the residual connection both
  see the written value.
- `attn.hook_pattern` lives inside the attention function (see `attention.py`), which the model is
  routed through only while some context reads or writes a pattern.

When only reads are wanted (`stop_early=True`), the forward pass is abandoned as soon as the last
requested site has been read.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import torch
from torch import Tensor, nn

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
    """Raised inside the forward pass once every site a `stop_early` context reads has been read."""

    def __init__(self, owner: Hooks):
        super().__init__("every requested site has been read")
        self.owner = owner


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _with_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


class Hooks:
    """Reads `read` and applies `write` on every forward pass of `model.hf` inside the `with` block.

    `cache` maps each read site name to its value on the latest forward pass (after the writes of
    this context, and of every context entered before it, to the same site).
    """

    def __init__(self, model, read: Iterable[Site], write: Mapping[Site, Edit], stop_early: bool = False):
        self.model = model
        self.read = set(read)
        self.write = dict(write)
        self.stop_early = stop_early
        self.cache: dict[str, Tensor] = {}
        self._stack = HookStack.of(model)

    @property
    def sites(self) -> set[Site]:
        return self.read | set(self.write)

    def visit(self, site: Site, value: Tensor) -> Tensor:
        """Apply this context's write to `site` and record its read, returning the value passed on."""
        edit = self.write.get(site)
        if edit is not None:
            if self._stack.was_read(value):
                value = value.clone()  # an in-place edit must not reach a value already read
            value = edit(value)
        if site in self.read:
            self.cache[site.name] = value
            if self.stop_early and len(self.cache) == len(self.read) and self._stack.innermost is self:
                raise StopForward(self)
        return value

    def __enter__(self) -> Hooks:
        self.cache.clear()
        self._stack.enter(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stack.leave(self)
        return isinstance(exc, StopForward) and exc.owner is self


class HookStack:
    """The hook contexts active on one HF model, outermost first, and the PyTorch hooks serving them.

    The PyTorch hooks are re-installed, for the union of every active context's sites, whenever a
    context enters or leaves; at each site they pass the value through every context in order.
    """

    _of: weakref.WeakKeyDictionary[nn.Module, HookStack] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model) -> HookStack:
        """The stack of `model.hf` (shared by every `Model` wrapping the same HF module)."""
        if model.hf not in cls._of:
            cls._of[model.hf] = cls(model)
        return cls._of[model.hf]

    def __init__(self, model):
        self.model = model
        self.contexts: list[Hooks] = []
        self.sites: set[Site] = set()
        self._handles: list = []
        self._patterns: list[nn.Module] = []
        self._resid_pre: dict[int, Tensor] = {}
        self._batch = 1

    @property
    def innermost(self) -> Hooks | None:
        return self.contexts[-1] if self.contexts else None

    def enter(self, context: Hooks) -> None:
        self.contexts.append(context)
        self._reinstall()

    def leave(self, context: Hooks) -> None:
        self.contexts.remove(context)
        self._reinstall()

    def was_read(self, value: Tensor) -> bool:
        return any(value is cached for context in self.contexts for cached in context.cache.values())

    def visit(self, site: Site, value: Tensor) -> Tensor:
        for context in self.contexts:
            if site in context.read or site in context.write:
                value = context.visit(site, value)
        return value

    # -- installing -------------------------------------------------------------------------------

    def _reinstall(self) -> None:
        self._remove()
        self.sites = set().union(*(c.sites for c in self.contexts))
        by_kind: dict[str, set[int | None]] = defaultdict(set)
        for site in self.sites:
            by_kind[site.kind].add(site.layer)
        try:
            self._install(by_kind)
        except BaseException:
            self._remove()
            raise

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._patterns:
            attention.PATTERN_HOOKS.pop(module, None)
        attention.route(self.model.hf, False)
        self._handles, self._patterns = [], []
        self._resid_pre.clear()

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
                self._on_output(model.module(module_path), partial(self.visit, Site(kind)))
        if "hook_pos_embed" in by_kind:
            self._on_output(model.module(adapter.embed), self._note_batch)
            self._on_output(model.module(adapter.pos_embed), self._pos_embed_hook)
        mids = by_kind.get("hook_resid_mid", set())
        for layer in by_kind.get("hook_resid_pre", set()) | mids:
            self._on_input(model.block(layer), partial(self._resid_pre_hook, layer))
        for layer in by_kind.get("hook_attn_out", set()) | mids:
            self._on_output(model.block_module(layer, adapter.attn_out), partial(self._attn_out_hook, layer))
        for kind, path, point in (
            ("ln2.hook_normalized", adapter.mlp_norm, self._on_output),
            ("hook_mlp_out", adapter.mlp_out, self._on_output),
            ("mlp.hook_post", adapter.neurons, self._on_input),
        ):
            for layer in by_kind.get(kind, set()):
                point(model.block_module(layer, path), partial(self.visit, Site(kind, layer)))
        for layer in by_kind.get("hook_resid_post", set()):
            self._on_output(model.block(layer), partial(self.visit, Site("hook_resid_post", layer)))
        for layer in by_kind.get("attn.hook_z", set()):
            module = model.block_module(layer, adapter.heads_out)
            self._on_input(module, partial(self._visit_heads, Site("attn.hook_z", layer)))
        for layer in by_kind.get("attn.hook_pattern", set()):
            module = model.block_module(layer, adapter.attn)
            site = Site("attn.hook_pattern", layer)
            writes = any(site in c.write for c in self.contexts)
            attention.PATTERN_HOOKS[module] = (partial(self.visit, site), writes)
            self._patterns.append(module)
        attention.route(model.hf, bool(self._patterns))

    # -- sites that are not one module's input or output ------------------------------------------

    def _visit_heads(self, site: Site, value: Tensor) -> Tensor:
        """Sites whose module input is [batch, pos, n_heads * d_head] but whose value is per head."""
        dims = self.model.dims
        heads = self.visit(site, value.view(*value.shape[:-1], dims.n_heads, dims.d_head))
        return heads.reshape(value.shape)

    def _note_batch(self, embed: Tensor) -> Tensor:
        self._batch = embed.shape[0]
        return embed

    def _pos_embed_hook(self, value: Tensor) -> Tensor:
        """The position embedding is computed once, [1, pos, d_model], and broadcast over the batch by
        the model; the site holds it per sequence, [batch, pos, d_model], like `hook_embed`."""
        if value.shape[0] == 1 and self._batch > 1:
            value = value.expand(self._batch, *value.shape[1:]).contiguous()
        return self.visit(Site("hook_pos_embed"), value)

    def _resid_pre_hook(self, layer: int, value: Tensor) -> Tensor:
        site = Site("hook_resid_pre", layer)
        if site in self.sites:
            value = self.visit(site, value)
        self._resid_pre[layer] = value
        return value

    def _attn_out_hook(self, layer: int, attn_out: Tensor) -> Tensor:
        site = Site("hook_attn_out", layer)
        if site in self.sites:
            attn_out = self.visit(site, attn_out)
        mid_site = Site("hook_resid_mid", layer)
        if mid_site in self.sites:
            mid = self._resid_pre[layer].to(attn_out.device) + attn_out  # the block's input may come from another device
            new_mid = self.visit(mid_site, mid)
            if new_mid is not mid:  # the block adds attn_out to resid_pre itself: write the difference
                attn_out = attn_out + (new_mid - mid)
        return attn_out
