"""Wrapping changes nothing: a model loaded by mechscope, with no hooks active, computes exactly what the
same HF model computes, bit for bit, for every family x dtype x attention implementation HF offers,
and for the config options that change a code path. Reading every site (patterns included) changes
nothing either, and a context that hooks a pattern gives the model its own attention setting back.

The independent side is an untouched copy of the same HF model.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers as tf
from conftest import FAMILIES, VOCAB, tiny_hf

import mechscope
from mechscope.toys.tiny_model import TinyConfig

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")
IDS = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


@functools.cache
def _pair(family: str, dtype: torch.dtype, implementation: str, **options):
    reference = tiny_hf(family, dtype=dtype)
    for key, value in options.items():
        setattr(reference.config, key, value)
    try:
        reference.set_attn_implementation(implementation)
    except ValueError as err:  # HF itself refuses this implementation for this family
        pytest.skip(str(err).splitlines()[0][:120])
    return reference, mechscope.load(copy.deepcopy(reference))


def assert_wrapping_changes_nothing(reference, model: mechscope.Model, ids=IDS):
    implementation = reference.config._attn_implementation
    with torch.no_grad():
        plain = reference(ids).logits
        assert torch.isfinite(plain).all()
        assert model.hf.config._attn_implementation == implementation
        assert torch.equal(model.hf(ids).logits, plain)
        assert torch.equal(model.run(ids).logits, plain)
        everything = model.run(ids, read=model.site_names(), logits=True)
        assert torch.equal(everything.logits, plain)  # reads, patterns included, perturb nothing
        assert model.hf.config._attn_implementation == implementation  # given back after the pattern reads
        assert torch.equal(model.hf(ids).logits, plain)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity(family, dtype, implementation):
    reference, model = _pair(family, dtype, implementation)
    assert model.hf.dtype == dtype  # an already-built model keeps its dtype
    assert_wrapping_changes_nothing(reference, model)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ("gelu", "solu", "topk"))
def test_parity_mechscope_tiny(act, dtype, implementation):
    """mechscope's own tiny models (`toys.tiny_model`), a family transformers does not ship."""
    config = TinyConfig(act=act, k=5, vocab_size=VOCAB, hidden_size=32, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    reference = tf.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    reference.set_attn_implementation(implementation)
    assert_wrapping_changes_nothing(reference, mechscope.load(copy.deepcopy(reference)))


@pytest.mark.parametrize("implementation", ("eager", "sdpa"))
@pytest.mark.parametrize(
    "family, options",
    [
        ("gpt2", {"reorder_and_upcast_attn": True}),  # a branch HF takes only under eager
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}),
        ("gpt2", {"scale_attn_weights": False}),
        ("gemma2", {"attn_logit_softcapping": None}),
        ("gemma2", {"final_logit_softcapping": None}),
        ("neox_parallel", {"rotary_pct": 0.5}),
    ],
)
def test_parity_config_options(family, options, implementation):
    reference, model = _pair(family, torch.float32, implementation, **options)
    assert_wrapping_changes_nothing(reference, model)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_load_in_another_dtype_is_what_hf_loads(dtype, tmp_path):
    """Asking for another dtype gives what HF's own loader gives in that dtype (float32 rotary
    frequencies stay float32), not a cast of every buffer."""
    folder = tmp_path / "llama"
    tiny_hf("llama", dtype=torch.float32).save_pretrained(folder)
    plain = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    from_folder = mechscope.load(str(folder), dtype=dtype)
    from_module = mechscope.load(tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), dtype=dtype)
    for model in (from_folder, from_module):
        assert {n: b.dtype for n, b in model.hf.named_buffers()} == {n: b.dtype for n, b in plain.named_buffers()}
        with torch.no_grad():
            assert torch.equal(model.run(IDS).logits, plain(IDS).logits)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_smollm2_parity_in_every_dtype(dtype):
    """The embedded SmolLM2 in each dtype against HF's own load of the same converted folder."""
    from mechscope.models.load import converted_gguf, default_gguf

    model = mechscope.load(dtype=dtype)
    reference = tf.AutoModelForCausalLM.from_pretrained(converted_gguf(default_gguf()), dtype=dtype).eval()
    ids = model.to_ids("The reliability of Wikipedia is very")
    assert_wrapping_changes_nothing(reference, model, ids)
