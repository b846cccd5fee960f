"""Loading: the embedded default (converted once from GGUF), local folders, GGUF files, bad specs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import mechscope as ms
from mechscope.models.load import converted_gguf, default_gguf

PROMPT = "The reliability of Wikipedia is very"


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_default_model_dims():
    model = ms.load()
    d = model.dims
    assert (d.n_layers, d.d_model, d.d_mlp, d.n_heads, d.d_head) == (30, 576, 1536, 9, 64)
    assert model.adapter.name == "llama" and model.tokenizer is not None
    assert "SmolLM2" in repr(model)


@pytest.mark.slow
def test_conversion_matches_the_gguf_model():
    """The cached float copy computes exactly what transformers' own GGUF loading gives."""
    gguf = default_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model = ms.load(gguf)  # a .gguf path goes through the same cache as the default
    assert converted_gguf(gguf) == converted_gguf(default_gguf())
    ids = model.to_ids(PROMPT)
    with torch.inference_mode():
        torch.testing.assert_close(model.hf(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_local_folder_round_trip(tmp_path):
    hf = tiny_llama()
    hf.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    model = ms.load(tmp_path)
    ids = torch.randint(0, 64, (1, 5))
    with torch.inference_mode():
        torch.testing.assert_close(model.run(ids).logits, hf(ids).logits)
    assert model.tokenizer is None and model.to_str_tokens([3]) == ["<3>"]


def test_wrapping_a_built_model_keeps_it():
    hf = tiny_llama()
    model = ms.load(hf, dtype="float32")
    assert model.hf is hf and model.config._attn_implementation.startswith("mechscope_")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/no/such/folder", "no such model file or folder '/no/such/folder'"),
        ("missing.gguf", "no such model file or folder 'missing.gguf'"),
        ("not a hub id!", "no such model file or folder"),
    ],
)
def test_bad_spec(spec, message):
    with pytest.raises(ms.MechscopeError, match=message):
        ms.load(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(ms.MechscopeError, match="has no config.json"):
        ms.load(tmp_path)


def test_unknown_family(tmp_path):
    config = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4)
    OPTForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ms.MechscopeError, match="unknown model family 'opt': supported families are llama"):
        ms.load(tmp_path)


def test_bad_dtype():
    with pytest.raises(ms.MechscopeError, match="unknown dtype 'float8': valid dtypes are float32, bfloat16, float16"):
        ms.load(tiny_llama(), dtype="float8")


def test_bfloat16_load():
    model = ms.load(dtype="bfloat16")
    assert model.hf.dtype == torch.bfloat16
    assert ms.predict(model, PROMPT, k=3).top[0].token in (" high", " low")


def test_hub_id_without_hub_says_how_to_pass_a_folder():
    with pytest.raises(ms.MechscopeError, match="pass its local folder") as err:
        ms.load("someone-who-does-not-exist/no-such-model-xyz")
    assert "someone-who-does-not-exist/no-such-model-xyz" in str(err.value)
