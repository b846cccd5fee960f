"""Hook contexts compose: two contexts on the same site, nested or one after the other, each behave as
if it were alone. At one site the contexts apply in the order they were entered, so a reader sees the
writes of the contexts entered before it, and every later site sees every write.

The independent side is a single context doing the same work alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_case

import mechscope
from mechscope.attribution import attention_pattern


def uniform_pattern(pattern: torch.Tensor) -> torch.Tensor:
    """Equal weight on every key a query can see (causal, no window)."""
    q, k = pattern.shape[-2:]
    visible = torch.ones(q, k, dtype=pattern.dtype, device=pattern.device).tril()
    return (visible / visible.sum(-1, keepdim=True)).expand_as(pattern).clone()


def rewrite(site: str):
    """A write that changes a site's value in a way that shows downstream."""
    if site.endswith("hook_pattern"):
        return uniform_pattern
    return lambda v: 0.5 * v + 0.25


def sites_of_every_kind(model: mechscope.Model) -> list[str]:
    """One site of each kind the model has: the global ones and every per-block kind of layer 1."""
    return [s for s in model.site_names() if not s.startswith("blocks.") or s.startswith("blocks.1.")]


def test_outer_pattern_write_survives_inner_read():
    """The reported case: an outer uniform pattern, then `attention_pattern` inside it (tiny Llama, float64)."""
    case = tiny_case("llama")
    model, ids = case.model, case.ids[:1]
    site = "blocks.1.attn.hook_pattern"
    clean = model.run(ids).logits
    steered = model.run(ids, write={site: uniform_pattern}).logits
    assert (steered - clean).abs().max() > 0.5
    with model.hooks(write={site: uniform_pattern}):
        row = attention_pattern(model, ids[0], 1, 0).pattern
        assert torch.allclose(row[3], torch.tensor([0.25] * 4 + [0.0] * 4))
        assert torch.allclose(row, uniform_pattern(row))
        with torch.no_grad():
            assert torch.equal(model.hf(ids).logits, steered)  # the outer write is still in force
    assert torch.equal(model.run(ids).logits, clean)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox_parallel", "gemma2"])
def test_every_site_kind_composes(family):
    case = tiny_case(family)
    model, ids = case.model, case.ids
    for site in sites_of_every_kind(model):
        edit = rewrite(site)
        down = f"blocks.{model.dims.n_layers - 1}.hook_resid_post"
        alone = model.run(ids, read=[site, down], write={site: edit}, logits=True)
        clean = model.run(ids, read=[site], logits=True)

        # outer write, inner read: the inner reader sees the written value; the write stays in force
        with model.hooks(write={site: edit}):
            inner = model.run(ids, read=[site], logits=True)
            assert torch.equal(inner.cache[site], alone.cache[site]), site
            assert torch.equal(inner.logits, alone.logits), site
            with torch.no_grad():
                assert torch.equal(model.hf(ids).logits, alone.logits), site

        # outer read, inner write: the outer reader sees the value as it was before the inner write,
        # and later sites see the write
        with model.hooks(read=[site, down]) as outer:
            inner = model.run(ids, write={site: edit})
            assert torch.equal(inner.logits, alone.logits), site
            assert torch.equal(outer.cache[site], clean.cache[site]), site
            assert torch.equal(outer.cache[down], alone.cache[down]), site

        # two readers: both get the value
        with model.hooks(read=[site]) as outer:
            inner = model.run(ids, read=[site])
            assert torch.equal(inner.cache[site], clean.cache[site]), site
            assert torch.equal(outer.cache[site], clean.cache[site]), site

        # two writers: the inner write applies to the outer's result
        twice = model.run(ids, write={site: lambda v, e=edit: e(e(v))}).logits
        with model.hooks(write={site: edit}):
            assert torch.equal(model.run(ids, write={site: edit}).logits, twice), site

        # one after the other: nothing is left behind
        assert torch.equal(model.run(ids).logits, clean.logits), site


def test_contexts_left_out_of_order():
    """A context left before one entered after it removes only its own writes."""
    case = tiny_case("llama")
    model, ids = case.model, case.ids
    a, b = "blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"
    only_b = model.run(ids, write={b: uniform_pattern}).logits
    first = model.hooks(write={a: rewrite(a)})
    second = model.hooks(write={b: uniform_pattern})
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    with torch.no_grad():
        assert torch.equal(model.hf(ids).logits, only_b)
    second.__exit__(None, None, None)
    assert torch.equal(model.run(ids).logits, model.run(ids, read=[a], logits=True).logits)
    assert model.hf.config._attn_implementation == case.reference.config._attn_implementation


def test_inner_early_stop_leaves_outer_context_working():
    case = tiny_case("llama")
    model, ids = case.model, case.ids
    site = "blocks.0.hook_resid_post"
    steered = model.run(ids, write={site: rewrite(site)}).logits
    with model.hooks(write={site: rewrite(site)}):
        read = model.run(ids, read=["blocks.0.hook_resid_post"])  # stops after block 0
        assert read.logits is None
        with torch.no_grad():
            assert torch.equal(model.hf(ids).logits, steered)
