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
    "topk_skip": ("topk", {"k": 8}, True),
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
        ([sae], "a sae cannot be exported as a circuit-tracer transcoder"),
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
