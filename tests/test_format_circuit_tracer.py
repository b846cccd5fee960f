"""circuit-tracer's per-layer transcoder folders: what we write computes, by circuit-tracer's own formulas
read straight off the files, what our transcoders compute, and reads back to the same dictionaries.

circuit-tracer pins transformers 4.x and cannot be installed beside mechscope, so its formulas are
written out here from its layout (see `mechscope/dictionaries/formats/circuit_tracer.py`):
f = act(x W_encᵀ + b_enc), x̂ = f W_dec + b_dec (+ x W_skipᵀ).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_formats import D, F, inputs, max_diff, ours, randomize

from mechscope.dictionaries.dictionary import DictConfig, Dictionary
from mechscope.dictionaries.formats.circuit_tracer import export_transcoder_set, import_transcoder_set
from mechscope.errors import MechscopeError

D_OUT = 24
CASES = {
    "relu": ("relu", {}, False),
    "relu_skip": ("relu", {}, True),
    "jumprelu": ("jumprelu", {}, False),
    "jumprelu_skip": ("jumprelu", {}, True),
    "batchtopk": ("batchtopk", {"k": 8, "threshold": 0.6}, False),
}


def transcoder(layer: int, activation: str, options: dict, skip: bool, hook_in: str = "hook_resid_mid") -> Dictionary:
    """A random transcoder of one layer, its normalisation not folded yet (scales 2.0 and 0.5)."""
    cfg = DictConfig([f"blocks.{layer}.{hook_in}"], [f"blocks.{layer}.hook_mlp_out"], D, D_OUT, F, activation, options,
                     skip_connection=skip, input_scale=[2.0], output_scale=[0.5], model="tiny")  # fmt: skip
    d = Dictionary(cfg)
    randomize(d, seed=layer)
    if activation == "jumprelu":
        with torch.no_grad():
            d.activation.log_threshold.copy_(torch.rand(F, generator=torch.Generator().manual_seed(layer)).log())
    return d.eval()


def by_their_formulas(file, config: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(str(file))
    pre = x @ t["W_enc"].T + t["b_enc"]
    if config.get("activation") == "topk":
        top = pre.topk(config["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    elif "activation_function.threshold" in t:
        f = pre * (pre > t["activation_function.threshold"])
    else:
        f = pre.relu()
    recon = f @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        recon = recon + x @ t["W_skip"].T
    return f, recon


@pytest.mark.parametrize("case", list(CASES))
def test_a_transcoder_set_computes_the_same_in_their_layout_and_back(tmp_path, case):
    activation, options, skip = CASES[case]
    ours_set = [transcoder(layer, activation, options, skip) for layer in (1, 0)]  # any order
    export_transcoder_set(ours_set, tmp_path / "set")
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["feature_input_hook"] == "hook_resid_mid" and config["feature_output_hook"] == "hook_mlp_out"
    assert config["transcoders"] == ["layer_0.safetensors", "layer_1.safetensors"]
    back = import_transcoder_set(tmp_path / "set")
    x = inputs()
    for layer, d in ((1, ours_set[0]), (0, ours_set[1])):
        f, recon = ours(d, x)
        assert 0 < (f > 0).sum() < f.numel()
        assert max_diff((f, by_their_formulas(tmp_path / "set" / f"layer_{layer}.safetensors", config, x)[0])) < 1e-5
        assert max_diff((recon, by_their_formulas(tmp_path / "set" / f"layer_{layer}.safetensors", config, x)[1])) < 1e-4
        assert back[layer].cfg.read_sites == d.cfg.read_sites and back[layer].cfg.write_sites == d.cfg.write_sites
        assert max_diff((ours(back[layer], x)[0], f), (ours(back[layer], x)[1], recon)) < 1e-4


def test_what_a_transcoder_set_must_be(tmp_path):
    sae = Dictionary(DictConfig(["blocks.0.hook_resid_post"], ["blocks.0.hook_resid_post"], D, D, F, "topk", {"k": 4}))
    cases = [
        ([sae], "a sae cannot be exported as a circuit-tracer transcoder set"),
        ([transcoder(0, "topk", {"k": 4}, False)], "TopK transcoders cannot be exported for circuit-tracer"),
        ([transcoder(1, "relu", {}, False)], "needs a transcoder for every layer from 0: these cover layers [1]"),
        ([transcoder(0, "relu", {}, False), transcoder(0, "relu", {}, False)], "two transcoders of layer 0"),
        (
            [transcoder(0, "relu", {}, False), transcoder(1, "jumprelu", {}, False)],
            "differ in the sites they read or write, or in activation",
        ),
        ([transcoder(0, "relu", {}, False), transcoder(1, "relu", {}, False, "ln2.hook_normalized")], "differ in the sites"),
    ]
    for dictionaries, message in cases:
        with pytest.raises(MechscopeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            export_transcoder_set(dictionaries, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
    export_transcoder_set([transcoder(0, "relu", {}, False)], tmp_path / "one")
    (tmp_path / "one" / "layer_0.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(MechscopeError, match="damaged or truncated"):
        import_transcoder_set(tmp_path / "one")
    with pytest.raises(MechscopeError, match="has no config.yaml"):
        import_transcoder_set(tmp_path)


def clt(activation: str, layers: int = 3, first: int = 0) -> Dictionary:
    """A random cross-layer transcoder of 16 latents per layer, its normalisation not folded yet."""
    reads = [f"blocks.{i}.hook_resid_mid" for i in range(first, first + layers)]
    writes = [f"blocks.{i}.hook_mlp_out" for i in range(first, first + layers)]
    cfg = DictConfig(reads, writes, D, D, 16 * layers, activation, {"k": 4} if activation == "topk" else {}, layered=True,
                     input_scale=[2.0 + i for i in range(layers)], output_scale=[0.5] * layers, model="tiny")  # fmt: skip
    d = Dictionary(cfg)
    randomize(d, seed=layers)
    d.mask_decoder_(d.W_dec.data)
    if activation == "jumprelu":
        with torch.no_grad():
            d.activation.log_threshold.copy_(torch.rand(16 * layers, generator=torch.Generator().manual_seed(3)).log())
    return d.eval()


def clt_by_their_formulas(folder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer's CLT read off its files: f_i = act(x_i W_enc_iᵀ + b_enc_i); layer j's output is
    Σ_{i≤j} f_i W_dec_i[:, j − i] + b_dec_j. x [n, layers, d] -> (features [n, layers·d_tc], outputs [n, layers, d])."""
    n = len(list(folder.glob("W_enc_*.safetensors")))
    enc = [load_file(str(folder / f"W_enc_{i}.safetensors")) for i in range(n)]
    dec = [load_file(str(folder / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"] for i in range(n)]
    features = []
    for i, e in enumerate(enc):
        pre = x[:, i] @ e[f"W_enc_{i}"].T + e[f"b_enc_{i}"]
        features.append(pre * (pre > e[f"threshold_{i}"]) if f"threshold_{i}" in e else pre.relu())
    outputs = torch.stack(
        [sum(features[i] @ dec[i][:, j - i] for i in range(j + 1)) + enc[j][f"b_dec_{j}"] for j in range(n)], dim=1
    )
    return torch.cat(features, dim=1), outputs


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_a_clt_computes_the_same_in_their_layout_and_back(tmp_path, activation):
    from mechscope.dictionaries.formats import export_clt, import_clt, load_any

    d = clt(activation)
    export_clt(d, tmp_path / "clt")
    config = yaml.safe_load((tmp_path / "clt" / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder" and config["feature_input_hook"] == "hook_resid_mid"
    assert load_file(str(tmp_path / "clt" / "W_dec_1.safetensors"))["W_dec_1"].shape == (16, 2, D)
    x = torch.randn(40, 3, D, generator=torch.Generator().manual_seed(5))
    f, recon = d.encode_dense(x), d(x).recon
    assert 0 < (f > 0).sum() < f.numel()
    f_theirs, recon_theirs = clt_by_their_formulas(tmp_path / "clt", x)
    assert max_diff((f, f_theirs)) < 1e-4 and max_diff((recon, recon_theirs)) < 1e-3
    for back in (import_clt(tmp_path / "clt"), load_any(tmp_path / "clt")):
        assert back.cfg.kind == "clt" and back.cfg.read_sites == d.cfg.read_sites and back.cfg.write_sites == d.cfg.write_sites
        assert max_diff((back.encode_dense(x), f), (back(x).recon, recon)) < 1e-3


def test_what_cannot_be_written_or_read_as_which_kind(tmp_path):
    """A kind a format has no place for is refused in one line, and a folder of one kind is not read as another."""
    from mechscope.dictionaries.formats import export_clt, export_saelens, import_clt, load_any

    streams = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    crosscoder = Dictionary(DictConfig(streams, streams, D, D, F, "topk", {"k": 4}))
    cases = [
        (lambda: export_clt(clt("topk"), tmp_path / "x"), "a topk CLT cannot be exported for circuit-tracer"),
        (lambda: export_clt(clt("relu", first=2), tmp_path / "x"), "cover every layer from 0: this one covers layers [2, 3, 4]"),
        (lambda: export_clt(crosscoder, tmp_path / "x"), "a crosscoder cannot be exported as a circuit-tracer cross-layer"),
        (lambda: export_saelens(clt("relu"), tmp_path / "x"), "a clt cannot be exported for SAELens: it has no clt format"),
        (lambda: export_saelens(crosscoder, tmp_path / "x"), "it has no crosscoder format"),
        (
            lambda: export_transcoder_set([clt("relu")], tmp_path / "x"),
            "a clt cannot be exported as a circuit-tracer transcoder set",
        ),
    ]
    for call, message in cases:
        with pytest.raises(MechscopeError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
            call()
        assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
    export_clt(clt("relu"), tmp_path / "clt")
    export_transcoder_set([transcoder(i, "relu", {}, False) for i in range(2)], tmp_path / "set")
    with pytest.raises(MechscopeError, match="holds a circuit-tracer cross-layer transcoder, not per-layer transcoders"):
        import_transcoder_set(tmp_path / "clt")
    with pytest.raises(MechscopeError, match="holds circuit-tracer per-layer transcoders, not a cross-layer transcoder"):
        import_clt(tmp_path / "set")
    with pytest.raises(
        MechscopeError, match=r"transcoders of 2 layers: give the site one of them reads \(blocks.0.hook_resid_mid"
    ):
        load_any(tmp_path / "set")
    assert load_any(tmp_path / "set", site="blocks.1.hook_resid_mid").cfg.write_sites == ["blocks.1.hook_mlp_out"]
    (tmp_path / "clt" / "W_dec_1.safetensors").unlink()
    with pytest.raises(MechscopeError, match="has no W_dec_1.safetensors"):
        import_clt(tmp_path / "clt")
