"""Parity of reads and writes with an independent computation, for every family and for SmolLM2.

The independent side is plain HF: `output_hidden_states=True`, `output_attentions=True` on an eager
copy, PyTorch hooks that the tests register themselves, and the HF submodules called by hand. The
module names it needs are in `MODULES` below, written out here on purpose: they are the check on
mechscope's adapters, so they must not be imported from them.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager

import pytest
import torch
from conftest import SLIDING, SLIDING_WINDOW, Case, smollm2_case

import mechscope

# -- the test-side table of HF module names -------------------------------------------------------

_LLAMA = dict(
    blocks="model.layers",
    embed="model.embed_tokens",
    pos_embed=None,
    final_norm="model.norm",
    attn="self_attn",
    attn_proj="self_attn.o_proj",  # its input is the heads' outputs (attn.hook_z)
    post_attn_norm=None,  # applied to the attention branch before it joins the residual stream
    mlp_norm="post_attention_layernorm",  # its input is hook_resid_mid
    mlp="mlp",
    mlp_proj="mlp.down_proj",  # its input is mlp.hook_post
    post_mlp_norm=None,
    values="v_proj",  # how to get the attention values, see `values` below
    parallel=False,
)
_GEMMA2 = {
    **_LLAMA,
    "post_attn_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}
_NEOX = dict(
    blocks="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    pos_embed=None,
    final_norm="gpt_neox.final_layer_norm",
    attn="attention",
    attn_proj="attention.dense",
    post_attn_norm=None,
    mlp_norm="post_attention_layernorm",
    mlp="mlp",
    mlp_proj="mlp.dense_4h_to_h",
    post_mlp_norm=None,
    values="neox_qkv",
)
MODULES = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA2,
    "phi3": {**_LLAMA, "values": "phi3_qkv"},
    "gpt2": dict(
        blocks="transformer.h",
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        final_norm="transformer.ln_f",
        attn="attn",
        attn_proj="attn.c_proj",
        post_attn_norm=None,
        mlp_norm="ln_2",
        mlp="mlp",
        mlp_proj="mlp.c_proj",
        post_mlp_norm=None,
        values="gpt2_qkv",
        parallel=False,
    ),
    "neox_parallel": {**_NEOX, "parallel": True},
    "neox_sequential": {**_NEOX, "parallel": False},
}


def get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


class HF:
    """Test-side access to one case's HF modules, by the table above."""

    def __init__(self, case: Case, hf=None):
        self.case = case
        self.hf = case.model.hf if hf is None else hf
        self.m = MODULES[case.family]
        self.config = self.hf.config

    def block(self, layer: int):
        return get(self.hf, self.m["blocks"])[layer]

    def sub(self, layer: int, key: str):
        return get(self.block(layer), self.m[key])

    def top(self, key: str):
        return get(self.hf, self.m[key])

    @property
    def n_layers(self) -> int:
        return len(get(self.hf, self.m["blocks"]))

    @property
    def parallel(self) -> bool:
        return self.m["parallel"]

    def attn_branch(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """What attention adds to the residual stream, from the heads' outputs [batch, pos, heads, d_head]."""
        out = self.sub(layer, "attn_proj")(z.flatten(-2))
        return self.sub(layer, "post_attn_norm")(out) if self.m["post_attn_norm"] else out

    def mlp_branch_from_post(self, layer: int, post: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the residual stream, from its neurons [batch, pos, d_mlp]."""
        out = self.sub(layer, "mlp_proj")(post)
        return self.sub(layer, "post_mlp_norm")(out) if self.m["post_mlp_norm"] else out

    def mlp_branch(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the residual stream, from its (un-normalised) input."""
        out = self.sub(layer, "mlp")(self.sub(layer, "mlp_norm")(resid))
        return self.sub(layer, "post_mlp_norm")(out) if self.m["post_mlp_norm"] else out

    def values(self, layer: int, qkv_out: torch.Tensor) -> torch.Tensor:
        """Attention values [batch, pos, n_heads, d_head] (key/value heads repeated for GQA), from the
        output of the module named by `values_module`."""
        n_heads = self.case.model.dims.n_heads
        d_head = self.case.model.dims.d_head
        kind = self.m["values"]
        batch, pos = qkv_out.shape[:2]
        if kind == "v_proj":
            v = qkv_out.view(batch, pos, -1, d_head)
        elif kind == "phi3_qkv":
            n_kv = self.config.num_key_value_heads
            v = qkv_out[..., -n_kv * d_head :].view(batch, pos, n_kv, d_head)
        elif kind == "gpt2_qkv":
            v = qkv_out.split(n_heads * d_head, dim=-1)[2].view(batch, pos, n_heads, d_head)
        else:  # GPT-NeoX interleaves q, k, v per head
            v = qkv_out.view(batch, pos, n_heads, 3 * d_head).chunk(3, dim=-1)[2]
        return v.repeat_interleave(n_heads // v.shape[2], dim=2)

    def values_module(self, layer: int):
        path = {
            "v_proj": "self_attn.v_proj",
            "phi3_qkv": "self_attn.qkv_proj",
            "gpt2_qkv": "attn.c_attn",
            "neox_qkv": "attention.query_key_value",
        }[self.m["values"]]
        return get(self.block(layer), path)


@contextmanager
def capture(module, *, inputs: bool):
    """Test-side PyTorch hook: record a module's first input (or output) on each call."""
    seen: list[torch.Tensor] = []

    def hook(m, args, kwargs, out):
        # A forward (not pre-) hook: it sees the input as the module ran on it, after any pre-hook's edit.
        value = (args[0] if args else kwargs["hidden_states"]) if inputs else out
        seen.append((value[0] if isinstance(value, tuple) else value).detach().clone())

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


# -- helpers ----------------------------------------------------------------------------------------


def rel(case: Case) -> float:
    """Relative tolerance for values computed two ways that agree in exact arithmetic: float64 for the
    tiny models; float32 for SmolLM2, whose residual stream reaches ~2e4 (observed errors there stay
    below 1e-7 of the scale of the values compared)."""
    return 1e-12 if case.dtype == torch.float64 else 1e-6


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = ""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{what}: max |diff| {err:.3g} > {atol:.3g}"


def assert_rel_close(case: Case, actual: torch.Tensor, expected: torch.Tensor, *scale: torch.Tensor, what: str = ""):
    """Close to within `rel(case)` of the largest magnitude among `expected` and `scale` (at least 1)."""
    magnitude = max([1.0] + [t.abs().max().item() for t in (expected, *scale)])
    assert_close(actual, expected, rel(case) * magnitude, what)


_CLEAN: dict[str, mechscope.RunOutput] = {}


def clean(case: Case) -> mechscope.RunOutput:
    """Every site read on the case's ids, with logits (computed once per case)."""
    if case.name not in _CLEAN:
        _CLEAN[case.name] = case.model.run(case.ids, read=case.model.site_names(), logits=True)
    return _CLEAN[case.name]


_EAGER: dict[str, mechscope.Model] = {}


def wrapped_eager(case: Case) -> mechscope.Model:
    """mechscope on a copy of the eager HF model (so its residual stream is HF eager's, bit for bit)."""
    if case.name not in _EAGER:
        _EAGER[case.name] = mechscope.load(copy.deepcopy(case.eager), dtype=case.dtype)
    return _EAGER[case.name]


def positions_delta(case: Case, shape, positions=(1, 3), seed: int = 0) -> torch.Tensor:
    """A random delta of `shape` [batch, pos, ...], non-zero only at `positions`."""
    gen = torch.Generator().manual_seed(seed)
    delta = torch.zeros(shape, dtype=torch.float64)
    for p in positions:
        delta[:, p] = torch.randn(delta[:, p].shape, generator=gen)
    return delta.to(case.dtype)


def mid_layer(case: Case) -> int:
    return case.model.dims.n_layers // 2


def block_sites(case: Case, layers) -> list[str]:
    names = case.model.site_names()
    return [s for s in names if not s.startswith("blocks.") or int(s.split(".")[1]) in layers]


# -- (a) reads equal an independent computation ----------------------------------------------------


def test_resid_reads_equal_hf_hidden_states(case):
    model, hf = case.model, HF(case, case.reference)
    n = hf.n_layers
    names = [f"blocks.{L}.hook_resid_pre" for L in range(n)] + [f"blocks.{L}.hook_resid_post" for L in range(n)]
    cache = model.run(case.ids, read=names + ["ln_final.hook_normalized"]).cache
    hidden = case.reference(case.ids, output_hidden_states=True).hidden_states
    assert len(hidden) == n + 1
    for L in range(n):
        assert torch.equal(cache[f"blocks.{L}.hook_resid_pre"], hidden[L]), L
    for L in range(n - 1):
        assert torch.equal(cache[f"blocks.{L}.hook_resid_post"], hidden[L + 1]), L
    # HF's last hidden state is taken after the final norm.
    assert torch.equal(hf.top("final_norm")(cache[f"blocks.{n - 1}.hook_resid_post"]), hidden[-1])
    assert torch.equal(cache["ln_final.hook_normalized"], hidden[-1])


def test_embed_reads(case):
    model, hf = case.model, HF(case, case.reference)
    read = ["hook_embed"] + (["hook_pos_embed"] if hf.m["pos_embed"] else [])
    cache = model.run(case.ids, read=read).cache
    with capture(hf.top("embed"), inputs=False) as embed:
        hidden = case.reference(case.ids, output_hidden_states=True).hidden_states
    # Gemma scales the embedding inside its embedding module: the module's output is what is compared.
    assert torch.equal(cache["hook_embed"], embed[0])
    if hf.m["pos_embed"]:
        assert cache["hook_pos_embed"].shape == cache["hook_embed"].shape  # one copy per sequence
        assert torch.equal(cache["hook_embed"] + cache["hook_pos_embed"], hidden[0])
    else:
        assert torch.equal(cache["hook_embed"], hidden[0])


def test_pos_embed_write_per_sequence(tiny_model):
    """GPT-2 computes its position embedding once for the batch; a write may still differ per sequence."""
    model = tiny_model("gpt2")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    new = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    read = ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"]
    out = model.run(ids, read=read, write={"hook_pos_embed": mechscope.replace(new)})
    assert torch.equal(out.cache["hook_pos_embed"], new)
    assert torch.equal(out.cache["blocks.0.hook_resid_pre"], out.cache["hook_embed"] + new)


def test_inner_reads_equal_module_inputs(case):
    """mlp.hook_post, attn.hook_z and hook_resid_mid equal what the HF modules receive."""
    model, hf = case.model, HF(case, case.reference)
    cache = clean(case).cache
    keys = ("mlp_proj", "attn_proj") + (() if hf.parallel else ("mlp_norm",))
    with ExitStack() as stack:
        seen = {(L, k): stack.enter_context(capture(hf.sub(L, k), inputs=True)) for L in range(hf.n_layers) for k in keys}
        case.reference(case.ids)
    for L in range(hf.n_layers):
        assert torch.equal(cache[f"blocks.{L}.mlp.hook_post"], seen[(L, "mlp_proj")][0]), L
        z = cache[f"blocks.{L}.attn.hook_z"]
        assert z.shape == (*case.ids.shape, model.dims.n_heads, model.dims.d_head)
        assert torch.equal(z.flatten(-2), seen[(L, "attn_proj")][0]), L
        if not hf.parallel:  # mechscope adds resid_pre + attn_out itself, as HF does: bit for bit
            assert torch.equal(cache[f"blocks.{L}.hook_resid_mid"], seen[(L, "mlp_norm")][0]), L


def test_mlp_input_reads_equal_the_norm_output_and_writes_reach_the_mlp(case):
    """ln2.hook_normalized is the output of the norm in front of the MLP, and what the MLP reads."""
    model, hf = case.model, HF(case, case.reference)
    L = mid_layer(case)
    site = f"blocks.{L}.ln2.hook_normalized"
    with capture(hf.sub(L, "mlp_norm"), inputs=False) as norm_out:
        case.reference(case.ids)
    assert torch.equal(clean(case).cache[site], norm_out[0])
    new = clean(case).cache[site] + positions_delta(case, norm_out[0].shape, seed=4)
    with capture(HF(case).sub(L, "mlp"), inputs=True) as mlp_in:
        out = model.run(case.ids, read=[site, f"blocks.{L}.hook_mlp_out"], write={site: mechscope.replace(new)})
    assert torch.equal(mlp_in[0], new)
    with torch.no_grad():
        expected = HF(case).sub(L, "mlp")(new)
        if HF(case).m["post_mlp_norm"]:
            expected = HF(case).sub(L, "post_mlp_norm")(expected)
    assert_rel_close(case, out.cache[f"blocks.{L}.hook_mlp_out"], expected, what="mlp_out")


def test_branch_outputs_are_residual_differences(case):
    cache = clean(case).cache
    for L in range(case.model.dims.n_layers):
        pre, post = cache[f"blocks.{L}.hook_resid_pre"], cache[f"blocks.{L}.hook_resid_post"]
        attn_out, mlp_out = cache[f"blocks.{L}.hook_attn_out"], cache[f"blocks.{L}.hook_mlp_out"]
        if case.model.dims.has_resid_mid:
            mid = cache[f"blocks.{L}.hook_resid_mid"]
            assert_rel_close(case, attn_out, mid - pre, pre, mid, what=f"attn_out {L}")
            assert_rel_close(case, mlp_out, post - mid, mid, post, what=f"mlp_out {L}")
        else:
            assert_rel_close(case, mlp_out, post - pre - attn_out, pre, post, what=f"mlp_out {L}")


def test_pattern_reads(case):
    """Rows sum to 1, causal, zero outside a sliding window, and equal to HF eager's own attentions."""
    model = case.model
    cache = clean(case).cache
    eager = case.eager(case.ids, output_attentions=True).attentions
    patterns = [f"blocks.{L}.attn.hook_pattern" for L in range(model.dims.n_layers)]
    eager_reads = wrapped_eager(case).run(case.ids, read=patterns).cache
    batch, pos = case.ids.shape
    q, k = torch.arange(pos)[:, None], torch.arange(pos)[None, :]
    for L in range(model.dims.n_layers):
        pattern = cache[f"blocks.{L}.attn.hook_pattern"]
        assert pattern.shape == (batch, model.dims.n_heads, pos, pos)
        # Probabilities are softmaxed in float32 (as HF's eager kernels do), even in float64 models.
        assert_close(pattern.sum(-1), torch.ones(batch, model.dims.n_heads, pos, dtype=case.dtype), 1e-6, f"row sums {L}")
        assert (pattern >= 0).all()
        assert (pattern[..., k > q] == 0).all(), f"layer {L} attends to the future"
        assert (pattern[..., k <= q] > 0).any()
        if L in SLIDING.get(case.name, ()):
            outside = q - k >= SLIDING_WINDOW
            assert (pattern[..., outside] == 0).all(), f"layer {L} attends outside its sliding window"
            assert (pattern[..., q - k == SLIDING_WINDOW - 1] > 0).all(), f"layer {L} cuts its window short"
        # Against HF eager run on its own: HF's eager kernels softmax in float32 even in float64 models,
        # so the eager model's residual stream drifts from the SDPA model's by ~1e-6..3e-5 (tiny models),
        # moving its probabilities by up to 3e-6 (tiny Gemma); SmolLM2 (float32): up to 1e-6.
        assert_close(pattern, eager[L], 1e-5, f"pattern {L} vs HF eager")
        # On the same residual stream (mechscope on the eager copy) they agree bit for bit, except
        # GPT-2, whose eager kernel softmaxes in the model's dtype (float64 here): 1.2e-7.
        if case.family == "gpt2":
            assert_close(eager_reads[f"blocks.{L}.attn.hook_pattern"], eager[L], 1e-6, f"pattern {L} vs HF eager")
        else:
            assert torch.equal(eager_reads[f"blocks.{L}.attn.hook_pattern"], eager[L]), L
    if case.name == "gemma2":  # the soft cap is on, and low enough to matter
        assert model.config.attn_logit_softcapping == 2.0 and model.config._attn_implementation == "eager"


def test_reads_change_nothing(case):
    model = case.model
    plain = case.reference(case.ids).logits
    assert torch.equal(model.run(case.ids, read=model.site_names(), logits=True).logits, plain)
    for kind in ("attn.hook_pattern", "hook_resid_mid", "hook_attn_out", "hook_pos_embed"):
        names = [s for s in model.site_names() if s.endswith(kind)]
        if names:
            assert torch.equal(model.run(case.ids, read=names, logits=True).logits, plain), kind
    # The wrapped model, unhooked, is plain HF.
    assert torch.equal(model.hf(case.ids).logits, plain)


@pytest.mark.slow
def test_smollm2_longer_prompt(prompts):
    """Reads on a longer real sentence: residual stream parity, causal patterns, unchanged logits."""
    case = smollm2_case()
    model = case.model
    ids = model.to_ids(prompts[1])
    assert ids.shape[1] >= 15
    out = model.run(ids, read=model.site_names(), logits=True)
    reference = case.reference(ids, output_hidden_states=True)
    assert torch.equal(out.logits, reference.logits)
    for L in range(model.dims.n_layers):
        assert torch.equal(out.cache[f"blocks.{L}.hook_resid_pre"], reference.hidden_states[L])
        pattern = out.cache[f"blocks.{L}.attn.hook_pattern"]
        assert (pattern.triu(1) == 0).all()
        assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)), 1e-5, f"row sums {L}")
    assert torch.equal(out.cache["ln_final.hook_normalized"], reference.hidden_states[-1])


# -- (b) writing a site with its own value changes nothing ------------------------------------------


def self_write_tolerance(case: Case, site: str, logits: torch.Tensor) -> float:
    if case.tiny or not site.endswith("hook_pattern"):
        return 1e-5
    # A written pattern is multiplied with the values by mechscope instead of by the SDPA kernel. In
    # float32 through SmolLM2's 30 layers that rounding difference reaches 3.1e-5 in logits of size
    # up to 30 (1e-6 relative): absolute 1e-5 fails for the pattern sites only, so they are held to
    # 1e-5 of the logits' scale.
    return 1e-5 * logits.abs().max().item()


def test_write_own_value_changes_nothing(case):
    model = case.model
    out = clean(case)
    for site in model.site_names():
        written = model.run(case.ids, write={site: mechscope.replace(out.cache[site])}).logits
        assert_close(written, out.logits, self_write_tolerance(case, site, out.logits), site)


def test_identity_write_changes_nothing(case):
    model = case.model
    out = clean(case)
    # Every site of the tiny models; SmolLM2's sites of four layers (every site of it costs ~25 s, and
    # test_write_own_value_changes_nothing already writes every one of them).
    layers = range(model.dims.n_layers) if case.tiny else (0, 1, 15, 29)
    for site in block_sites(case, layers):
        written = model.run(case.ids, write={site: lambda v: v}).logits
        if site.endswith("hook_pattern"):  # a written pattern is applied by mechscope's probs @ values
            assert_close(written, out.logits, self_write_tolerance(case, site, out.logits), site)
        else:
            assert torch.equal(written, out.logits), site


# -- (c) writing a changed value changes downstream as a manual recomputation predicts -------------


def test_write_mlp_post(case):
    model, hf = case.model, HF(case)
    L = mid_layer(case)
    base = clean(case).cache
    post = f"blocks.{L}.mlp.hook_post"
    delta = positions_delta(case, base[post].shape)
    read = [post, f"blocks.{L}.hook_attn_out", f"blocks.{L}.hook_mlp_out", f"blocks.{L}.hook_resid_post"]
    out = model.run(case.ids, read=read, write={post: mechscope.add(delta)})
    cache = out.cache
    assert torch.equal(cache[post], base[post] + delta)  # a read of a written site sees the written value
    assert torch.equal(cache[f"blocks.{L}.hook_attn_out"], base[f"blocks.{L}.hook_attn_out"])  # upstream untouched
    with torch.no_grad():
        mlp_out = hf.mlp_branch_from_post(L, base[post] + delta)
    pre, attn_out = base[f"blocks.{L}.hook_resid_pre"], base[f"blocks.{L}.hook_attn_out"]
    mid = pre + attn_out if hf.parallel else base[f"blocks.{L}.hook_resid_mid"]
    assert_rel_close(case, cache[f"blocks.{L}.hook_mlp_out"], mlp_out, what="mlp_out")
    assert_rel_close(case, cache[f"blocks.{L}.hook_resid_post"], mid + mlp_out, pre, what="resid_post")
    untouched = (delta == 0).all(-1)  # positions without a delta are unchanged
    assert torch.equal(cache[f"blocks.{L}.hook_resid_post"][untouched], base[f"blocks.{L}.hook_resid_post"][untouched])
    # Downstream: the same as writing the recomputed residual stream directly.
    again = model.run(case.ids, write={f"blocks.{L}.hook_resid_post": mechscope.replace(mid + mlp_out)}).logits
    assert_close(out.logits, again, 1e-9 if case.tiny else 1e-4, "logits")
    assert (out.logits - clean(case).logits).abs().max() > 1e-3


def test_write_resid_mid(case):
    model, hf = case.model, HF(case)
    if hf.parallel:
        pytest.skip("parallel attention and MLP: there is no hook_resid_mid")
    L = mid_layer(case)
    base = clean(case).cache
    site = f"blocks.{L}.hook_resid_mid"
    new_mid = base[site] + positions_delta(case, base[site].shape, seed=1)
    read = [site, f"blocks.{L}.hook_attn_out", f"blocks.{L}.hook_mlp_out", f"blocks.{L}.hook_resid_post"]
    with capture(hf.sub(L, "mlp_norm"), inputs=True) as mlp_in:
        out = model.run(case.ids, read=read, write={site: mechscope.replace(new_mid)})
    cache = out.cache
    assert torch.equal(cache[site], new_mid)
    # The MLP's norm receives the written value (mechscope writes it as a difference on attn_out).
    assert_rel_close(case, mlp_in[0], new_mid, what="what the MLP's norm receives")
    with torch.no_grad():
        mlp_out = hf.mlp_branch(L, new_mid)
    assert_rel_close(case, cache[f"blocks.{L}.hook_mlp_out"], mlp_out, what="mlp_out")
    assert_rel_close(case, cache[f"blocks.{L}.hook_resid_post"], new_mid + mlp_out, what="resid_post")
    again = model.run(case.ids, write={f"blocks.{L}.hook_resid_post": mechscope.replace(new_mid + mlp_out)}).logits
    assert_close(out.logits, again, 1e-9 if case.tiny else 1e-4, "logits")


def test_write_z(case):
    model, hf = case.model, HF(case)
    L = mid_layer(case)
    base = clean(case).cache
    site = f"blocks.{L}.attn.hook_z"
    delta = positions_delta(case, base[site].shape, seed=2)
    delta[:, :, 1:] = 0  # head 0 only
    new_z = base[site] + delta
    read = [site, f"blocks.{L}.hook_attn_out", f"blocks.{L}.hook_resid_post"]
    read += [] if hf.parallel else [f"blocks.{L}.hook_resid_mid"]
    with capture(hf.sub(L, "attn_proj"), inputs=True) as proj_in:
        cache = model.run(case.ids, read=read, write={site: mechscope.replace(new_z)}).cache
    assert torch.equal(cache[site], new_z)
    assert torch.equal(proj_in[0], new_z.flatten(-2))
    with torch.no_grad():
        attn_out = hf.attn_branch(L, new_z)
    pre = base[f"blocks.{L}.hook_resid_pre"]
    assert_rel_close(case, cache[f"blocks.{L}.hook_attn_out"], attn_out, what="attn_out")
    if hf.parallel:  # the MLP read the block input, which the write did not touch
        expected = pre + attn_out + base[f"blocks.{L}.hook_mlp_out"]
        assert_rel_close(case, cache[f"blocks.{L}.hook_resid_post"], expected, what="resid_post")
    else:
        assert_rel_close(case, cache[f"blocks.{L}.hook_resid_mid"], pre + attn_out, what="resid_mid")


def test_resid_pre_write_equals_previous_resid_post_write(case):
    model = case.model
    base = clean(case).cache
    n = model.dims.n_layers
    for L in sorted({1, n // 2, n - 1}):
        delta = positions_delta(case, base[f"blocks.{L}.hook_resid_pre"].shape, seed=L)
        edit = mechscope.add(delta)
        read = [f"blocks.{L}.hook_resid_pre", f"blocks.{L}.hook_resid_post"]
        a = model.run(case.ids, read=read, write={f"blocks.{L}.hook_resid_pre": edit})
        b = model.run(case.ids, read=read, write={f"blocks.{L - 1}.hook_resid_post": edit})
        assert torch.equal(a.logits, b.logits), L
        for name in read:
            assert torch.equal(a.cache[name], b.cache[name]), name
        assert torch.equal(a.cache[f"blocks.{L}.hook_resid_pre"], base[f"blocks.{L}.hook_resid_pre"] + delta)


def drop_first_key(pattern: torch.Tensor) -> torch.Tensor:
    """Zero attention to position 0 (for every query but the first, which has nothing else) and renormalise."""
    new = pattern.clone()
    new[..., 1:, 0] = 0
    return new / new.sum(-1, keepdim=True)


def test_write_pattern(case):
    """z of a layer whose pattern is written is that pattern times the layer's values, per head."""
    model, hf = case.model, HF(case)
    n = model.dims.n_layers
    base = clean(case).cache
    for L in range(n) if case.tiny else (0, n // 2, n - 1):
        site, z_site = f"blocks.{L}.attn.hook_pattern", f"blocks.{L}.attn.hook_z"
        with capture(hf.values_module(L), inputs=False) as qkv:
            out = model.run(case.ids, read=[site, z_site], write={site: drop_first_key})
        new_pattern = drop_first_key(base[site])
        assert torch.equal(out.cache[site], new_pattern)
        values = hf.values(L, qkv[0])  # [batch, pos, heads, d_head]: the write does not change this layer's values
        expected_z = torch.einsum("bhqk,bkhd->bqhd", new_pattern, values)
        assert_rel_close(case, out.cache[z_site], expected_z, values, what=f"z {L}")
        assert (out.cache[z_site] - base[z_site]).abs().max() > 1e-4  # the write did something
        # Query 0 attends only to key 0 in both patterns: its output is unchanged.
        assert_rel_close(case, out.cache[z_site][:, 0], base[z_site][:, 0], values, what=f"z {L} at position 0")


# -- stopping early, and hooks across forward passes ------------------------------------------------


def test_read_only_run_stops_early(case):
    model, hf = case.model, HF(case)
    n = model.dims.n_layers
    read = ["blocks.0.hook_resid_post", f"blocks.{n // 2}.attn.hook_z"]
    with capture(hf.top("final_norm"), inputs=False) as final, capture(hf.block(n - 1), inputs=True) as last:
        out = model.run(case.ids, read=read)
    assert out.logits is None
    assert set(out.cache) == set(read)
    assert final == [] and last == []  # the forward pass stopped before the last block
    base = clean(case).cache
    for name in read:
        assert torch.equal(out.cache[name], base[name])
    full = model.run(case.ids, read=read, logits=True)  # asking for logits runs to the end
    assert torch.equal(full.logits, clean(case).logits)
    assert set(full.cache) == set(read)


def test_hooks_context_applies_on_every_forward(case):
    model = case.model
    site = "blocks.0.hook_resid_post"
    delta = positions_delta(case, clean(case).cache[site].shape, seed=3)
    expected = model.run(case.ids, write={site: mechscope.add(delta)}).logits
    flipped = case.ids.flip(-1)
    expected_flipped = model.run(flipped, write={site: mechscope.add(delta)}).logits
    with torch.no_grad(), model.hooks(read=[site], write={site: mechscope.add(delta)}) as hooks:
        first = model.hf(case.ids).logits
        assert torch.equal(hooks.cache[site], clean(case).cache[site] + delta)
        second = model.hf(flipped).logits
        assert not torch.equal(hooks.cache[site], clean(case).cache[site] + delta)  # the latest pass
        third = model.hf(case.ids).logits
    assert torch.equal(first, expected)
    assert torch.equal(second, expected_flipped)
    assert torch.equal(third, expected)
    assert torch.equal(hooks.cache[site], clean(case).cache[site] + delta)
    assert torch.equal(model.hf(case.ids).logits, clean(case).logits)  # leaving the context removed every hook
