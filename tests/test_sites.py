"""Site names: listing, forward order, shapes, and one-line errors for bad names."""

from __future__ import annotations

import pytest
from conftest import FAMILIES

import mechscope

BLOCK_KINDS = (
    "hook_resid_pre",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
IDS = [3, 4, 5, 6]


def expected_names(n_layers: int, pos_embed: bool, resid_mid: bool) -> list[str]:
    kinds = [k for k in BLOCK_KINDS if resid_mid or k != "hook_resid_mid"]
    names = ["hook_embed"] + (["hook_pos_embed"] if pos_embed else [])
    names += [f"blocks.{layer}.{kind}" for layer in range(n_layers) for kind in kinds]
    return names + ["ln_final.hook_normalized"]


@pytest.mark.parametrize("family", FAMILIES)
def test_site_names_per_family(tiny_model, family):
    model = tiny_model(family)
    names = model.site_names()
    pos_embed, resid_mid = family == "gpt2", family != "neox_parallel"
    assert names == expected_names(3, pos_embed, resid_mid)
    assert len(names) == {"gpt2": 30, "neox_parallel": 26}.get(family, 29)
    assert len(set(names)) == len(names)
    for name in names:
        assert model.site(name).name == name


def test_site_names_are_in_forward_order(tiny):
    """Reading every site records them in the order the forward pass reaches them: site_names' order."""
    model = tiny.model
    out = model.run(tiny.ids, read=model.site_names(), logits=True)
    assert list(out.cache) == model.site_names()


@pytest.mark.slow
def test_smollm2_sites(smollm2):
    names = smollm2.site_names()
    assert len(names) == 30 * 9 + 2
    assert names == expected_names(30, pos_embed=False, resid_mid=True)
    assert smollm2.shape("blocks.29.attn.hook_pattern") == ("batch", 9, "q_pos", "k_pos")
    assert smollm2.shape("blocks.0.attn.hook_z") == ("batch", "pos", 9, 64)
    assert smollm2.shape("blocks.3.mlp.hook_post") == ("batch", "pos", 1536)
    assert smollm2.shape("blocks.3.hook_resid_post") == ("batch", "pos", 576)


def test_parallel_neox_has_no_resid_mid(tiny_model):
    model = tiny_model("neox_parallel")
    assert not any("hook_resid_mid" in name for name in model.site_names())
    for bad in ("blocks.0.hook_resid_mid", "blocks.2.hook_resid_mid"):
        with pytest.raises(mechscope.MechscopeError) as err:
            model.site(bad)
        message = str(err.value)
        assert "\n" not in message
        assert bad in message
        assert "parallel" in message  # says why: attention and the MLP both read the block input
        with pytest.raises(mechscope.MechscopeError):
            model.run(IDS, read=[bad])
    # The sequential NeoX has it.
    assert "blocks.0.hook_resid_mid" in tiny_model("neox_sequential").site_names()


@pytest.mark.parametrize("family", FAMILIES)
def test_pos_embed_only_for_gpt2(tiny_model, family):
    model = tiny_model(family)
    if family == "gpt2":
        assert model.site_names()[:2] == ["hook_embed", "hook_pos_embed"]
        return
    assert "hook_pos_embed" not in model.site_names()
    with pytest.raises(mechscope.MechscopeError) as err:
        model.site("hook_pos_embed")
    assert "\n" not in str(err.value)
    assert "hook_pos_embed" in str(err.value)
    assert "position" in str(err.value)


def test_shapes_match_values(tiny):
    """`model.shape` names every dimension of what a read returns."""
    model, ids = tiny.model, tiny.ids
    batch, pos = ids.shape
    out = model.run(ids, read=model.site_names())
    sizes = {"batch": batch, "pos": pos, "q_pos": pos, "k_pos": pos}
    for name, value in out.cache.items():
        shape = model.shape(name)
        assert tuple(sizes.get(d, d) for d in shape) == tuple(value.shape), name
    d = model.dims
    assert model.shape("blocks.1.hook_resid_pre") == ("batch", "pos", 32)
    assert model.shape("blocks.1.attn.hook_pattern") == ("batch", 4, "q_pos", "k_pos")
    assert model.shape("blocks.1.attn.hook_z") == ("batch", "pos", 4, 8)
    assert model.shape("blocks.1.mlp.hook_post") == ("batch", "pos", 48)
    assert model.shape("ln_final.hook_normalized") == ("batch", "pos", 32)
    assert (d.n_layers, d.d_model, d.d_mlp, d.n_heads, d.d_head) == (3, 32, 48, 4, 8)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("blocks.0.hook_resid_banana", "hook_resid_banana"),
        ("blocks.1.attn.hook_q", "attn.hook_q"),
        ("hook_nonsense", "hook_nonsense"),
        ("blocks.x.hook_resid_pre", "blocks.x.hook_resid_pre"),
        ("blocks.3.hook_resid_pre", "3"),  # the tiny models have layers 0..2
        ("blocks.99.mlp.hook_post", "99"),
        ("blocks.-1.hook_resid_post", "-1"),
        ("", "''"),
    ],
)
def test_bad_site_names(tiny_model, name, bad):
    model = tiny_model("llama")
    with pytest.raises(mechscope.MechscopeError) as err:
        model.site(name)
    message = str(err.value)
    assert "\n" not in message
    assert bad in message
    if bad.lstrip("-").isdigit():
        assert "out of range" in message and "0..2" in message
    # The same error reaches the user from run(), for reads and for writes.
    with pytest.raises(mechscope.MechscopeError):
        model.run(IDS, read=[name])
    with pytest.raises(mechscope.MechscopeError):
        model.run(IDS, write={name: mechscope.add(0.0)})
