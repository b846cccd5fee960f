"""The Dictionary interface: sparse gradients equal dense autograd, folding keeps activations, files round-trip.

The independent side is a dense re-computation of the same formulas with plain autograd.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechscope.dictionaries import DictConfig, Dictionary, load_dictionary, save_dictionary
from mechscope.dictionaries.activations import ACTIVATIONS
from mechscope.errors import MechscopeError

OPTIONS = {"topk": {"k": 8}, "batchtopk": {"k": 8}, "relu": {}, "jumprelu": {"bandwidth": 0.5}}


def make(activation: str, reads=("s",), writes=("s",), skip=False, seed=0) -> Dictionary:
    out_scale = 2.0 if reads == writes else 0.5  # an SAE reads and writes one site, in one scale
    cfg = DictConfig(list(reads), list(writes), 16, 16, 64, activation, OPTIONS[activation], skip_connection=skip,
                     input_scale=[2.0] * len(reads), output_scale=[out_scale] * len(writes))  # fmt: skip
    return make_from(cfg, seed)


def dense_reference(d: Dictionary, x_read: torch.Tensor, active_mask: torch.Tensor):
    """The same forward written densely: parameters copied, plain autograd."""
    p = {n: v.detach().clone().requires_grad_(True) for n, v in d.named_parameters()}
    x_in = x_read - p["b_dec"] if d.cfg.apply_b_dec_to_input else x_read
    z = x_in @ p["W_enc"] + p["b_enc"]
    name = d.cfg.activation
    if name in ("topk", "batchtopk"):
        f = torch.relu(z) * active_mask
    elif name == "relu":
        f = torch.relu(z)
    else:
        f = z * (z > p["activation.log_threshold"].exp())
    recon = f @ p["W_dec"] + p["b_dec"]
    if d.W_skip is not None:
        recon = recon + x_read @ p["W_skip"]
    return recon, p


@pytest.mark.parametrize("activation", list(OPTIONS))
@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip_transcoder", "crosscoder"])
def test_sparse_gradients_equal_dense_autograd(activation, kind):
    reads, writes = {"sae": (("s",), ("s",)), "transcoder": (("a",), ("b",)), "skip_transcoder": (("a",), ("b",)),
                     "crosscoder": (("l1", "l2"), ("l1", "l2"))}[kind]  # fmt: skip
    d = make(activation, reads, writes, skip=kind == "skip_transcoder")
    assert d.cfg.kind == kind
    x = torch.randn(32, len(reads) * 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.randn(32, len(writes) * 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = d.forward_normalised(x)
    mask = torch.zeros(32, 64, dtype=torch.float64)
    mask[out.active.rows, out.active.cols] = 1
    recon, params = dense_reference(d, x, mask)
    torch.testing.assert_close(out.recon, recon, rtol=1e-12, atol=1e-12)
    ((out.recon - target) ** 2).sum().backward()
    ((recon - target) ** 2).sum().backward()
    for name, param in d.named_parameters():
        if name == "activation.log_threshold":
            continue  # straight-through: no dense counterpart
        torch.testing.assert_close(param.grad, params[name].grad, rtol=1e-10, atol=1e-10, msg=name)


def test_topk_keeps_k_per_token_and_batchtopk_k_per_token_on_average():
    x = torch.randn(50, 16, dtype=torch.float64)
    assert (make("topk").forward_normalised(x).active.l0() <= 8).all()
    bt = make("batchtopk").forward_normalised(x).active
    assert len(bt.rows) <= 8 * 50 and bool((bt.rows[1:] >= bt.rows[:-1]).all())


@pytest.mark.parametrize("activation", list(OPTIONS))
@pytest.mark.parametrize("kind", ["sae", "skip_transcoder"])
def test_folding_the_normalisation_keeps_every_activation(activation, kind):
    d = make(activation, *((("s",), ("s",)) if kind == "sae" else (("a",), ("b",))), skip=kind == "skip_transcoder")
    x = torch.randn(40, 16, dtype=torch.float64)
    if activation == "batchtopk":
        d.activation.observe(d.forward_normalised(x * 2).active)
    d.eval()
    folded = d.folded()
    assert folded.cfg.input_scale == [1.0] and folded.cfg.output_scale == [1.0]
    torch.testing.assert_close(folded.encode_dense(x), d.encode_dense(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(folded.forward(x).recon, d.forward(x).recon, rtol=1e-12, atol=1e-12)


def test_save_and_load_round_trip(tmp_path):
    d = make("topk").float().eval()
    save_dictionary(d, tmp_path / "sae", extra={"note": "test"})
    back = load_dictionary(tmp_path / "sae")
    x = torch.randn(10, 16)
    torch.testing.assert_close(back.encode_dense(x), d.encode_dense(x))
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["training"] == {"note": "test"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:10]), "damaged or truncated"),
        (lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]), "damaged or truncated"),
        (lambda f: save_file({k: torch.zeros(3) for k in load_file(str(f))}, str(f)), "but the config makes it"),
        (lambda f: f.unlink(), "has no dictionary.safetensors"),
        (lambda f: (f.parent / "cfg.json").write_text("{oops"), "is not valid JSON"),
    ],
)
def test_bad_files_get_one_line(tmp_path, damage, message):
    save_dictionary(make("topk").float(), tmp_path / "sae")
    damage(tmp_path / "sae" / "dictionary.safetensors")
    with pytest.raises(MechscopeError, match=message) as err:
        load_dictionary(tmp_path / "sae")
    assert "\n" not in str(err.value)


def test_bad_configs_get_one_line():
    with pytest.raises(MechscopeError, match="k=0 is invalid for 64 latents"):
        Dictionary(DictConfig(["s"], ["s"], 16, 16, 64, "topk", {"k": 0}))
    with pytest.raises(MechscopeError, match="k=65 is invalid"):
        Dictionary(DictConfig(["s"], ["s"], 16, 16, 64, "topk", {"k": 65}))
    with pytest.raises(MechscopeError, match="unknown activation 'gelu'"):
        Dictionary(DictConfig(["s"], ["s"], 16, 16, 64, "gelu"))
    with pytest.raises(MechscopeError, match="matryoshka prefixes"):
        DictConfig(["s"], ["s"], 16, 16, 64, matryoshka=[8, 4, 64])
    assert set(ACTIVATIONS) == {"relu", "topk", "batchtopk", "jumprelu"}


def make_clt(activation: str, layers: int = 3, seed: int = 0) -> Dictionary:
    """A cross-layer transcoder over `layers` layers, 16 latents per layer, random weights (decoder masked)."""
    options = {"topk": {"k": 4}, "relu": {}, "jumprelu": {"bandwidth": 0.5}}[activation]
    reads, writes = [f"blocks.{i}.hook_resid_mid" for i in range(layers)], [f"blocks.{i}.hook_mlp_out" for i in range(layers)]
    scales = {"input_scale": [0.5 + i for i in range(layers)], "output_scale": [2.0 - 0.5 * i for i in range(layers)]}
    cfg = DictConfig(reads, writes, 16, 16, 16 * layers, activation, options, layered=True, **scales)
    d = make_from(cfg, seed)
    d.mask_decoder_(d.W_dec.data)
    return d


def make_from(cfg: DictConfig, seed: int) -> Dictionary:
    d = Dictionary(cfg).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return d


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_a_clt_equals_its_dense_block_formula_and_is_causal(activation):
    """Block r reads site r only and writes sites r.. only: checked against a dense block-diagonal encoder
    and a lower-triangular decoder, values and gradients; the output at site w ignores inputs after w."""
    R, d = 3, make_clt(activation)
    assert d.cfg.kind == "clt" and d.W_enc.shape == (16, 48)
    x = torch.randn(32, R * 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.randn(32, R * 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = d.forward_normalised(x)
    if activation == "topk":  # k of each layer's block, per token
        per_block = torch.zeros(32, R, dtype=torch.long).index_put_(
            (out.active.rows, out.active.cols // 16), torch.tensor(1), accumulate=True
        )
        assert bool((per_block == 4).all())
    p = {n: v.detach().clone().requires_grad_(True) for n, v in d.named_parameters()}
    W_big = torch.cat([torch.cat([p["W_enc"][:, r * 16 : (r + 1) * 16] if q == r else torch.zeros(16, 16, dtype=torch.float64)
                                  for r in range(R)], 1) for q in range(R)], 0)  # fmt: skip
    z = x @ W_big + p["b_enc"]
    mask = torch.zeros(32, 48, dtype=torch.float64)
    mask[out.active.rows, out.active.cols] = 1
    f = {"topk": torch.relu(z) * mask, "relu": torch.relu(z)}.get(activation)
    if f is None:
        f = z * (z > p["activation.log_threshold"].exp())
    recon = f @ p["W_dec"] + p["b_dec"]
    torch.testing.assert_close(out.recon, recon, rtol=1e-12, atol=1e-12)
    ((out.recon - target) ** 2).sum().backward()
    ((recon - target) ** 2).sum().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        ours = getattr(d, name).grad
        theirs = p[name].grad
        if name == "W_dec":
            ours, theirs = d.mask_decoder_(ours.clone()), d.mask_decoder_(theirs.clone())
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=name)
    later = x.clone()
    later[:, 32:] += 3.0  # only the last layer's input changes
    moved = d.forward_normalised(later).recon
    torch.testing.assert_close(moved[:, :32], out.recon[:, :32], rtol=0, atol=0)
    assert not torch.allclose(moved[:, 32:], out.recon[:, 32:])
    profile = d.decoder_profile()
    assert bool((profile[16:32, 0] == 0).all()) and bool((profile[32:, :2] == 0).all()) and d.written_sites(40) == [2]


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_folding_a_clt_keeps_every_activation_and_its_files_round_trip(activation, tmp_path):
    d = make_clt(activation).eval()
    x = torch.randn(20, 3, 16, dtype=torch.float64)
    folded = d.folded()
    torch.testing.assert_close(folded.encode_dense(x), d.encode_dense(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(folded.forward(x).recon, d.forward(x).recon, rtol=1e-12, atol=1e-12)
    save_dictionary(d.float(), tmp_path / "clt")
    back = load_dictionary(tmp_path / "clt")
    assert back.cfg.layered and back.cfg.kind == "clt"
    torch.testing.assert_close(back.encode_dense(x.float()), d.encode_dense(x.float()))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"write_sites": ["blocks.0.hook_mlp_out"]}, "it got 3 read and 1 write sites"),
        ({"d_sae": 50}, "d_sae=50 does not split into 3 equal blocks"),
        ({"skip_connection": True}, "cannot have a skip connection"),
        ({"activation": "batchtopk"}, "cannot have batchtopk"),
        ({"activation_options": {"k": 17}}, "k=17 is invalid for 16 latents per layer"),
    ],
)
def test_bad_clt_configs_get_one_line(overrides, message):
    sites = dict(
        read_sites=[f"blocks.{i}.hook_resid_mid" for i in range(3)], write_sites=[f"blocks.{i}.hook_mlp_out" for i in range(3)]
    )
    cfg = {**sites, "d_in": 16, "d_out": 16, "d_sae": 48, "activation": "topk", "activation_options": {"k": 4}, "layered": True}
    with pytest.raises(MechscopeError, match=message) as err:
        Dictionary(DictConfig(**{**cfg, **overrides}))
    assert "\n" not in str(err.value)


def test_a_crosscoders_penalty_weights_each_feature_by_its_summed_layer_norms():
    """ReLU's L1 penalty for a crosscoder is λ Σ_i f_i Σ_l ‖W_dec,i,l‖ per token (Lindsey et al. 2024); an SAE's and
    a CLT's weight by the norm of the whole decoder row."""
    d = make("relu", ("l1", "l2"), ("l1", "l2"))
    x = torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = d.forward_normalised(x)
    per_layer = d.W_dec.detach().view(64, 2, 16).norm(dim=-1).sum(-1)
    want = d.activation.l1 * (out.active.dense() * per_layer).sum() / 32
    got = d.activation.penalty(out.active, out.z_pairs, d.decoder_norms())
    torch.testing.assert_close(got, want)
    assert not torch.allclose(per_layer, d.W_dec.detach().norm(dim=-1))
    clt = make_clt("relu")
    torch.testing.assert_close(clt.decoder_norms(), clt.W_dec.norm(dim=-1))
