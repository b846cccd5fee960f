"""Figures 1-3: mechscope's reads and logit lens against plain HF, timed in this one process."""

from __future__ import annotations

import common
import torch
from common import log

FORWARD_REPEATS = 5  # clean 8 x 128 forwards per variant: ~2 s each on 2 cores
LENS_REPEATS = 40  # clean calls of the 6-token lens: ~0.2 s each


def check_reads(model, ids) -> dict:
    """resid_post read by mechscope equals HF's own hidden states; the all-sites read agrees with it."""
    hf = model.hf
    hidden = hf(ids, output_hidden_states=True, use_cache=False).hidden_states
    resid = model.run(ids, read=common.resid_post_sites()).cache
    every = model.run(ids, read=model.site_names())
    diffs = []
    for layer in range(common.N_LAYERS):
        ours = resid[f"blocks.{layer}.hook_resid_post"]
        # HF's last hidden state comes after the final norm: compare like with like.
        theirs = hidden[layer + 1] if layer + 1 < common.N_LAYERS else None
        ours_cmp = ours if theirs is not None else hf.model.norm(ours)
        theirs = theirs if theirs is not None else hidden[-1]
        diffs.append((ours_cmp - theirs).abs().max().item())
        assert torch.equal(every.cache[f"blocks.{layer}.hook_resid_post"], ours), f"all-sites read differs at layer {layer}"
    max_diff = max(diffs)
    assert max_diff < 1e-4, f"resid_post differs from HF hidden states by {max_diff}"
    assert every.logits is None and len(every.cache) == len(model.site_names())
    pattern = every.cache["blocks.0.attn.hook_pattern"]
    row_sum_err = (pattern.sum(-1) - 1).abs().max().item()
    assert row_sum_err < 1e-4, f"attention pattern rows do not sum to 1 ({row_sum_err})"
    return {"resid_max_abs_diff": max_diff, "n_sites": len(every.cache), "pattern_row_sum_err": row_sum_err}


def check_lens(model) -> dict:
    import mechscope

    lens = mechscope.logit_lens(model, common.LENS_PROMPT, [common.LENS_TARGET], k=common.LENS_K)
    hand = common.hand_lens(model.hf, model.tokenizer)
    probs = hand["probs"]
    assert lens.probs.shape[:2] == probs.shape == (common.N_LAYERS + 1, 6), (lens.probs.shape, probs.shape)
    last_diff = (lens.probs[-1, :, 0] - probs[-1]).abs().max().item()
    torch.testing.assert_close(lens.probs[-1, :, 0], probs[-1], rtol=1e-4, atol=1e-6)
    all_diff = (lens.probs[..., 0] - probs).abs().max().item()
    assert all_diff < 1e-4, f"lens probabilities differ from the hand-written lens by {all_diff}"
    assert torch.equal(lens.top_ids[-1], hand["top_ids"][-1]), "last-row top-k differs"
    assert lens.top_tokens[-1] == hand["top_tokens"][-1] and lens.tokens == hand["tokens"]
    rank_mismatch = int((lens.ranks[..., 0] != hand["ranks"]).sum())
    return {
        "last_row_max_abs_diff": last_diff,
        "all_rows_max_abs_diff": all_diff,
        "rank_mismatches": rank_mismatch,
        "last_prob": float(probs[-1, -1]),
        "last_rank": int(hand["ranks"][-1, -1]),
    }


def run(model) -> dict:
    """All in-process results (times in seconds)."""
    from transformers import AutoModelForCausalLM

    import mechscope
    from mechscope.lens.logit_lens import _unembed_rows, lens_sites
    from mechscope.models.precision import wide_unembed

    hf = model.hf
    ids = common.batch_ids(model.tokenizer)
    resid_sites = common.resid_post_sites()
    all_sites = model.site_names()
    res: dict = {"ids_shape": tuple(ids.shape), "forward_repeats": FORWARD_REPEATS, "lens_repeats": LENS_REPEATS}

    with torch.inference_mode():
        log("correctness: mechscope reads vs HF hidden states")
        res["check_reads"] = check_reads(model, ids)
        log("correctness: logit lens vs hand-written HF lens")
        res["check_lens"] = check_lens(model)

        cache = model.run(ids, read=all_sites).cache
        res["all_cache_bytes"] = common.tensor_bytes(cache.values())
        res["all_cache_bytes_naive"] = sum(t.numel() * t.element_size() for t in cache.values())
        res["resid_cache_bytes"] = common.tensor_bytes(model.run(ids, read=resid_sites).cache.values())
        del cache

        # A pristine HF model (the attention implementation HF picks itself): shows whether mechscope's
        # attention dispatcher, installed on model.hf, slows the baseline itself.
        pristine = AutoModelForCausalLM.from_pretrained(model.hf.name_or_path, dtype=torch.float32).eval()
        res["pristine_attn"] = pristine.config._attn_implementation
        res["ms_attn"] = hf.config._attn_implementation

        fns = {
            "hf": lambda: hf(ids, use_cache=False),
            "resid30": lambda: model.run(ids, read=resid_sites),
            "all": lambda: model.run(ids, read=all_sites),
            "resid30_logits": lambda: model.run(ids, read=resid_sites, logits=True),
            "all_logits": lambda: model.run(ids, read=all_sites, logits=True),
            "pristine_hf": lambda: pristine(ids, use_cache=False),
        }
        log(f"figures 1-2: {len(fns)} variants x (1 warm-up + {FORWARD_REPEATS}+) forwards of {tuple(ids.shape)}, interleaved")
        res["forward"] = common.interleaved(fns, FORWARD_REPEATS, max_rounds=3 * FORWARD_REPEATS, budget_s=200, settle=True)
        fns.clear()
        pristine = None  # free its weights

        lens_fn = lambda: mechscope.logit_lens(model, common.LENS_PROMPT, [common.LENS_TARGET], k=common.LENS_K)
        hand_fn = lambda: common.hand_lens(hf, model.tokenizer)
        log(f"figure 3: logit lens vs hand-written, 3 warm-ups + {LENS_REPEATS}+ each, interleaved")
        common.wait_quiet("figure 3")
        res["lens"] = common.interleaved({"ms_lens": lens_fn, "hand_lens": hand_fn}, LENS_REPEATS, warmup=3, budget_s=60)

        # Where the lens's time goes (same steps as mechscope.logit_lens; informative only).
        lens_ids = model.to_ids(common.LENS_PROMPT)
        _, sites = lens_sites(model)
        tids = torch.tensor([model.token_ids(common.LENS_TARGET)[0]])
        lens_cache = model.run(lens_ids, read=sites).cache
        resid = torch.stack([lens_cache[s][0] for s in sites])
        unembed = wide_unembed(model, final_norm=True)
        top_ids = _unembed_rows(unembed, resid, tids, common.LENS_K)[2]
        hidden = lambda: hf(lens_ids, output_hidden_states=True, use_cache=False)
        parts = {
            "ms: run(read=31 sites)": lambda: model.run(lens_ids, read=sites),
            "ms: unembed + log_softmax + rank + top-k": lambda: _unembed_rows(unembed, resid, tids, common.LENS_K),
            "ms: top-k token strings": lambda: [[model.to_str_tokens(cell) for cell in row] for row in top_ids],
            "hf: forward(output_hidden_states)": hidden,
            "hf: lens total": hand_fn,
        }
        log("figure 3 breakdown")
        res["lens_parts"] = common.interleaved(parts, LENS_REPEATS // 4, warmup=2, budget_s=30)
    return res
