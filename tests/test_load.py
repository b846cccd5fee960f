"""Loading: the embedded default (converted once from GGUF), local folders, GGUF files, bad specs and bad files."""

import hashlib
import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import mechscope as ms
from mechscope import cli
from mechscope.index.build import default_index_path
from mechscope.models.load import DEFAULT_NAME, converted_gguf, default_gguf, file_digest, gguf_name

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
    assert model.name == ms.load().name == DEFAULT_NAME  # so both find the same default index
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
    before = hf.config._attn_implementation
    model = ms.load(hf, dtype="float32")
    assert model.hf is hf and model.config._attn_implementation == before  # wrapping changes nothing


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


# -- GGUF files: one converted copy per content ---------------------------------------------------


def write_tiny_gguf(path, seed=0):
    """A tiny Llama GGUF (2 layers, d_model 32, 64 single-character tokens) that transformers can read."""
    import gguf

    rng = np.random.default_rng(seed)
    d, ff, layers, heads, kv, vocab = 32, 48, 2, 4, 2, 64
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(ord("a") + i) if i < 26 else f"<{i}>" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def weight(*shape):
        return (0.3 * rng.standard_normal(shape)).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(vocab, d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.add_tensor("output.weight", weight(vocab, d))
    kv_dim = kv * d // heads
    shapes = dict(attn_q=(d, d), attn_k=(kv_dim, d), attn_v=(kv_dim, d), attn_output=(d, d))
    shapes |= dict(ffn_gate=(ff, d), ffn_up=(ff, d), ffn_down=(d, ff))
    for i in range(layers):
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty mechscope cache for this test only."""
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_copies_of_one_gguf_share_one_conversion(tmp_path, cache, capsys):
    """The cache is keyed on the file's bytes: a copy under another name, or a link, finds the same conversion."""
    original = write_tiny_gguf(tmp_path / "checkout-a" / "tiny.gguf")
    copy = tmp_path / "checkout-b" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(original, copy)
    link = tmp_path / "link.gguf"
    link.symlink_to(original)
    folders = {converted_gguf(path) for path in (original, copy, link)}
    assert len(folders) == 1 and capsys.readouterr().err.count("converting") == 1
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["digests.json", folders.pop().name]
    model = ms.load(copy)
    assert model.name == "renamed" and model.dims.n_layers == 2 and ms.predict(model, "abc", k=1).top


def test_digest_is_remembered_until_the_file_changes(tmp_path, cache, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    first = file_digest(gguf)
    memo = json.loads((cache / "models" / "digests.json").read_text())
    assert memo[str(gguf.resolve())]["sha256"] == first
    with monkeypatch.context() as m:  # a warm load does not read the file again
        m.setattr(hashlib, "file_digest", lambda *a: pytest.fail("re-hashed an unchanged file"))
        assert file_digest(gguf) == first
    write_tiny_gguf(gguf, seed=1)  # new bytes at the same path
    assert file_digest(gguf) != first


@pytest.mark.slow
def test_a_copy_of_the_default_gguf_is_the_default_model(tmp_path):
    """Same bytes, same model: the same converted copy and the same name, hence the same default index."""
    copy = tmp_path / "copy-of-smollm2.gguf"
    shutil.copy(default_gguf(), copy)
    assert converted_gguf(copy) == converted_gguf(default_gguf())
    assert gguf_name(copy) == gguf_name(default_gguf()) == DEFAULT_NAME
    assert default_index_path(gguf_name(copy)) == default_index_path(ms.load().name)


# -- files that are not what they claim: one line naming the file ---------------------------------


def _llama_folder(folder):
    tiny_llama().save_pretrained(folder)
    return folder


def _set_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


def _truncate(keep):
    def edit(folder):
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[:keep])  # negative: all but the last -keep bytes

    return edit


BAD_FOLDERS = {
    "empty folder": (lambda f: [p.unlink() for p in f.iterdir()], "{f}' is not an HF model folder: it has no config.json"),
    "only a GGUF file": (
        lambda f: [p.unlink() for p in f.iterdir()] + [write_tiny_gguf(f / "tiny.gguf")],
        r"{f}' is not an HF model folder: it has no config.json \(it has tiny.gguf: pass the .gguf file itself\)",
    ),
    "config but no weights": (lambda f: (f / "model.safetensors").unlink(), "{f}' has a config.json but no .safetensors weights"),
    "only a pickle": (
        lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
        r"no .safetensors weights \(it has pytorch_model.bin; only safetensors and GGUF weights are read\)",
    ),
    "config not JSON": (lambda f: (f / "config.json").write_text("{oops"), "{f}/config.json' is not a JSON file"),
    "weights cut to 5 bytes": (
        _truncate(5),
        "{f}/model.safetensors' is truncated: 5 bytes, too short for its safetensors header",
    ),
    "weights cut partway": (
        _truncate(-1000),
        "{f}/model.safetensors' is truncated: its tensors need [0-9,]+ bytes, the file has",
    ),
    "weights not safetensors": (
        lambda f: (f / "model.safetensors").write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00oops"),
        "{f}/model.safetensors' is not a safetensors file",
    ),
    "hidden_size changed": (
        _set_config(hidden_size=64),
        r"weights in '{f}' do not fit its config.json: .* is \[64, 32\] in the file but the config makes it \[64, 64\]",
    ),
    "more layers than weights": (
        _set_config(num_hidden_layers=3),
        "weights in '{f}' do not fit its config.json: it has no weights for model.layers.2.input_layernorm.weight",
    ),
    "fewer layers than weights": (
        _set_config(num_hidden_layers=1),
        "weights in '{f}' do not fit its config.json: the config has no place for model.layers.1.input_layernorm.weight",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_model_folder_is_refused_in_one_line(case, tmp_path):
    folder = _llama_folder(tmp_path / "model")
    edit, message = BAD_FOLDERS[case]
    edit(folder)
    with pytest.raises(ms.MechscopeError) as err:
        ms.load(folder)
    assert "\n" not in str(err.value)
    assert re.search(message.format(f=re.escape(str(folder))), str(err.value)), str(err.value)


BAD_GGUFS = {
    "text": (lambda p: p.write_text("llama weights, honest\nsecond line\n"), "is not a GGUF file: it starts with b'llama we'"),
    "empty": (lambda p: p.write_bytes(b""), "is not a GGUF file: it starts with b''"),
    "magic only": (lambda p: p.write_bytes(b"GGUF\x03\x00"), r"GGUF file '{p}' is truncated or damaged \(6 bytes\)"),
    "cut partway": (
        lambda p: p.write_bytes(write_tiny_gguf(p.with_name("whole.gguf")).read_bytes()[:-4000]),
        r"GGUF file '{p}' is truncated or damaged \([0-9,]+ bytes\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_GGUFS))
def test_bad_gguf_is_refused_in_one_line(case, tmp_path, cache, capsys):
    path = tmp_path / "model.gguf"
    write, message = BAD_GGUFS[case]
    write(path)
    with pytest.raises(ms.MechscopeError) as err:
        ms.load(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert re.search(message.format(p=re.escape(str(path))), str(err.value)), str(err.value)
    assert "converting" not in capsys.readouterr().err  # refused before any conversion starts
    assert [p.name for p in (cache / "models").iterdir()] == ["digests.json"]


@pytest.mark.parametrize("case", ["config but no weights", "weights cut partway", "hidden_size changed"])
def test_cli_refuses_a_bad_model_in_one_line(case, tmp_path, monkeypatch, capsys):
    folder = _llama_folder(tmp_path / "model")
    BAD_FOLDERS[case][0](folder)
    monkeypatch.setattr(sys, "argv", ["mechscope", "sites", "--model", str(folder)])
    with pytest.raises(SystemExit) as done:
        cli.main()
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and str(folder) in err
