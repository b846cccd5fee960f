"""Activation patching (batched and naive) and attribution patching, on SmolLM2 and on tiny GPT-2 and Llama models."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import smollm2_model, tiny_case

import mechscope as ms
from mechscope.attribution.patching import (
    KINDS,
    activation_patching,
    attribution_patching,
    compare,
    patch_naive,
    patched_metric,
)
from mechscope.viz import patching_figure

CLEAN, CORRUPT, TARGET, VS = "The capital of France is", "The capital of Italy is", " Paris", " Rome"
LAYERS = range(0, 30, 5)
NAIVE_LAYERS = range(0, 30, 10)  # rows 0, 2 and 4 of the LAYERS grid: one forward each per position, so kept few
DIFFERS = 3  # the only position where the prompts differ (" France" / " Italy")


@functools.cache
def resid_grids():
    """The resid_pre grid on SmolLM2, every 5th layer: batched, naive and attribution patching (computed once)."""
    model = smollm2_model()
    args = (model, CLEAN, CORRUPT, TARGET, VS)
    batched = activation_patching(*args, kinds="hook_resid_pre", layers=LAYERS, batch_size=16)["hook_resid_pre"]
    naive = patch_naive(*args, kinds="hook_resid_pre", layers=NAIVE_LAYERS)["hook_resid_pre"]
    attribution = attribution_patching(*args, layers=LAYERS)
    return batched, naive, attribution


def test_prompts_tokenise_to_equal_lengths(smollm2):
    assert smollm2.to_ids(CLEAN).shape == smollm2.to_ids(CORRUPT).shape == (1, 5)
    assert smollm2.token_ids(TARGET) != smollm2.token_ids(VS)


def test_patching_all_of_layer_0_restores_the_clean_metric(smollm2):
    raw, normalised = patched_metric(smollm2, CLEAN, CORRUPT, TARGET, VS, sites=["blocks.0.hook_resid_pre"])
    batched, _, _ = resid_grids()
    assert raw == pytest.approx(batched.clean, abs=1e-6)
    assert normalised == pytest.approx(1.0, abs=1e-6)
    assert batched.clean > 0 > batched.corrupt  # the model prefers Paris after France and Rome after Italy


def test_resid_pre_grid(smollm2):
    batched, naive, _ = resid_grids()
    assert batched.grid.shape == (len(LAYERS), 5) and naive.grid.shape == (len(NAIVE_LAYERS), 5)
    assert batched.layers == list(LAYERS) and batched.cols == [0, 1, 2, 3, 4]
    assert batched.col_labels[DIFFERS] == " France/ Italy" and batched.col_labels[0] == "The"
    same = [p for p in range(5) if p != DIFFERS]
    # Layer 0: where the prompts agree, patching changes nothing; where they differ, it restores everything.
    assert naive.grid[0, same].abs().max() == 0
    assert batched.grid[0, same].abs().max() < 1e-5
    assert batched.grid[0, DIFFERS] == pytest.approx(1.0, abs=1e-5)
    # Before the position that differs nothing can carry the difference, at any layer.
    assert naive.grid[:, :DIFFERS].abs().max() == 0
    rows = [LAYERS.index(layer) for layer in NAIVE_LAYERS]
    torch.testing.assert_close(batched.grid[rows], naive.grid, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.raw[rows], naive.raw, rtol=0, atol=1e-4)
    assert (batched.clean, batched.corrupt) == (naive.clean, naive.corrupt)


def test_attribution_patching_correlates_with_activation_patching(smollm2):
    batched, _, attribution = resid_grids()
    resid = attribution["hook_resid_pre"]
    assert resid.method == "attribution" and resid.grid.shape == batched.grid.shape
    assert resid.clean == batched.clean and resid.corrupt == pytest.approx(batched.corrupt, abs=1e-5)
    r = compare(resid, batched)
    print(f"attribution vs activation patching, resid_pre: r = {r:.3f}")
    assert r > 0.8
    # Layer 0 differs only at DIFFERS, so the estimate is exactly 0 elsewhere.
    assert resid.grid[0, [0, 1, 2, 4]].abs().max() == 0
    assert attribution["attn.hook_z"].grid.shape == (len(LAYERS), smollm2.dims.n_heads)
    assert attribution["hook_attn_out"].grid.shape == attribution["hook_mlp_out"].grid.shape == (len(LAYERS), 5)


def test_every_kind_on_smollm2(smollm2):
    results = activation_patching(smollm2, CLEAN, CORRUPT, TARGET, VS, kinds=KINDS[1:], layers=[0, 29], batch_size=32)
    assert results["hook_attn_out"].grid.shape == results["hook_mlp_out"].grid.shape == (2, 5)
    heads = results["attn.hook_z"]
    assert heads.grid.shape == (2, 9) and heads.col_labels[0] == "H0" and heads.cols == list(range(9))
    # The MLP of layer 0 at the position that differs matters; at the first position nothing differs.
    assert results["hook_mlp_out"].grid[0, 0] == pytest.approx(0, abs=1e-5)
    fig = patching_figure(heads)
    assert fig.data[0].z.shape == (2, 9)


def test_probability_metric_and_positions(smollm2):
    result = activation_patching(smollm2, CLEAN, CORRUPT, TARGET, kinds="hook_resid_pre", layers=[0], positions=[-2, -1])
    grid = result["hook_resid_pre"]
    assert grid.metric == "prob" and 0 <= grid.corrupt < grid.clean <= 1
    assert grid.cols == [3, 4] and grid.grid[0, 0] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tiny_models_batched_equals_naive(family):
    model = tiny_case(family).model  # float64, no tokenizer: ids and integer targets
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(3, 100, (1, 8), generator=gen)
    corrupt = clean.clone()
    corrupt[0, [2, 5]] = torch.tensor([7, 11])
    args = (model, clean, corrupt, 5, 9)
    batched = activation_patching(*args, batch_size=7)  # chunks that straddle layers
    naive = patch_naive(*args)
    attribution = attribution_patching(*args)
    n_layers, n_heads = model.dims.n_layers, model.dims.n_heads
    for kind in KINDS:
        assert batched[kind].grid.shape == (n_layers, n_heads if kind == "attn.hook_z" else 8)
        torch.testing.assert_close(batched[kind].raw, naive[kind].raw, rtol=0, atol=1e-10)
        assert attribution[kind].grid.shape == batched[kind].grid.shape
    assert batched["hook_resid_pre"].col_labels[2] == f"<{int(clean[0, 2])}>/<7>"
    assert naive["hook_resid_pre"].grid[:, :2].abs().max() == 0  # nothing differs before position 2
    assert patched_metric(*args, sites=["blocks.0.hook_resid_pre"])[1] == pytest.approx(1.0, abs=1e-9)
    assert compare(attribution["hook_resid_pre"], batched["hook_resid_pre"]) > 0


def test_errors(smollm2):
    with pytest.raises(ms.MechscopeError, match="clean prompt has 5 tokens and the corrupted prompt 7"):
        activation_patching(smollm2, CLEAN, "The capital of the United States is", TARGET, VS)
    with pytest.raises(ms.MechscopeError, match="same token as the target"):
        activation_patching(smollm2, CLEAN, CORRUPT, TARGET, TARGET)
    with pytest.raises(ms.MechscopeError, match="cannot patch site kind 'hook_resid_mid': valid kinds are hook_resid_pre"):
        attribution_patching(smollm2, CLEAN, CORRUPT, TARGET, VS, kinds="hook_resid_mid")
    with pytest.raises(ms.MechscopeError, match="unknown metric"):
        activation_patching(smollm2, CLEAN, CORRUPT, TARGET, VS, metric="kl")
    with pytest.raises(ms.MechscopeError, match="batch_size=0"):
        activation_patching(smollm2, CLEAN, CORRUPT, TARGET, VS, batch_size=0)
    with pytest.raises(ms.MechscopeError, match="layer 30 out of range"):
        activation_patching(smollm2, CLEAN, CORRUPT, TARGET, VS, layers=[30])
    with pytest.raises(ms.MechscopeError, match="cannot compare grids of 2 and 3 cells"):
        compare(torch.zeros(2), torch.zeros(3))
