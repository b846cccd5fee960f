"""Direct logit attribution: the parts add up to the logit they explain, on every family and SmolLM2."""

import pytest
import torch

import mechscope as ms
from mechscope.attribution import direct_logit_attribution


def _logit_diff(case, target, vs, pos=-1):
    with torch.no_grad():  # the model's own logits before any final soft cap
        hidden = case.reference(case.ids[:1], output_hidden_states=True).hidden_states[-1]
        logits = case.model.module(case.model.adapter.unembed)(hidden)[0, pos]
    return float(logits[target] - logits[vs])


def test_parts_sum_to_the_logit(case):
    target, vs = (26351, 904) if not case.tiny else (7, 11)
    ids = case.ids[:1]
    a = direct_logit_attribution(case.model, ids, target, vs=vs)
    assert a.heads.shape == (case.model.dims.n_layers, case.model.dims.n_heads)
    assert a.neurons.shape == (case.model.dims.n_layers, case.model.dims.d_mlp)
    assert a.total == pytest.approx(a.logit, rel=1e-4, abs=1e-6)
    assert a.logit == pytest.approx(_logit_diff(case, target, vs), rel=1e-5, abs=1e-6)
    single = direct_logit_attribution(case.model, ids, target, position=2)
    assert single.total == pytest.approx(single.logit, rel=1e-4, abs=1e-6)


def test_each_layers_heads_sum_to_its_attention_output_along_the_readout(smollm2):
    """Per layer, the heads' parts equal attn_out read along the same direction (an independent split)."""
    text = "The reliability of Wikipedia is very"
    a = direct_logit_attribution(smollm2, text, " questionable")
    cache = smollm2.run(text, read=["blocks.29.hook_resid_post", "blocks.12.hook_attn_out", "blocks.12.hook_mlp_out"]).cache
    resid = cache["blocks.29.hook_resid_post"][0, -1]
    u = smollm2.hf.lm_head.weight[smollm2.token_ids(" questionable")[0]]
    with torch.no_grad():
        scale = smollm2.hf.model.norm(resid) / (smollm2.hf.model.norm.weight * resid)  # the frozen RMS scale
        g = scale * smollm2.hf.model.norm.weight * u
    assert float(a.heads[12].sum()) == pytest.approx(float(cache["blocks.12.hook_attn_out"][0, -1] @ g), rel=1e-4, abs=1e-5)
    assert float(a.neurons[12].sum()) == pytest.approx(float(cache["blocks.12.hook_mlp_out"][0, -1] @ g), rel=1e-4, abs=1e-5)
    units = a.top(10)
    assert len(units) == 10 and abs(units[0][1]) >= abs(units[-1][1])
    assert all(":" in name or "." in name for name, _ in units)


def test_bad_input(smollm2):
    text = "The reliability of Wikipedia is very"
    with pytest.raises(ms.MechscopeError, match="same token as the target"):
        direct_logit_attribution(smollm2, text, " questionable", vs=" questionable")
    with pytest.raises(ms.MechscopeError, match="position 9 out of range"):
        direct_logit_attribution(smollm2, text, " questionable", position=9)
    with pytest.raises(ms.MechscopeError, match="target '' is empty"):
        direct_logit_attribution(smollm2, text, "")
    with pytest.raises(ms.MechscopeError, match="vs '' is empty"):
        direct_logit_attribution(smollm2, text, " questionable", vs="")
