"""Attribution figures A1-A3: direct logit attribution and (attribution) patching against plain HF, in this process.

A1. `direct_logit_attribution` of every head and neuron for one prompt   vs one plain HF forward + backward
A2. `activation_patching` of a 30 x 8 `hook_resid_pre` grid (batched)     vs `patch_naive` (one forward per patch)
A3. `attribution_patching` of all four grids (context)                    vs one plain HF forward + backward

Correctness is asserted before timing (the attribution parts sum to the logit, which equals HF's; the
batched and naive grids agree). `render` writes this part of RESULTS.md as its own section, between
MARK_BEGIN and MARK_END, so `bench/run.py --only attribution` can regenerate it alone (`splice`).
"""

from __future__ import annotations

import time

import common
from common import log

DLA_PROMPT, DLA_TARGET = common.LENS_PROMPT, common.LENS_TARGET  # "The reliability of Wikipedia is very", " questionable"
# 8 tokens each ("The capital city of France is called" is 7 with this tokenizer: " known as" makes it 8).
CLEAN = "The capital city of France is known as"
CORRUPT = "The capital city of Italy is known as"
TARGET, VS = " Paris", " Rome"
N_POS = 8
BATCH_SIZES = (32, 64, 240)  # 32 is activation_patching's default
DEFAULT_BS = 32
TARGETS = {"dla": 1.5, "patching": 1 / 3}

DLA_REPEATS = 15  # ~0.2-0.4 s each
PATCH_REPEATS = 3  # the naive grid is ~240 forwards, ~20 s
APPROX_REPEATS = 10

MARK_BEGIN = "<!-- attribution section: begin (regenerated alone by `bench/run.py --only attribution`) -->"
MARK_END = "<!-- attribution section: end -->"


def hf_forward_backward(hf, ids, metric):
    """Plain HF: one forward from embeddings that need grad, `metric(last logits)`, one backward through the model."""

    def fn():
        embeds = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
        value = metric(hf(inputs_embeds=embeds, use_cache=False).logits[:, -1])[0]
        value.backward()
        return embeds.grad, value.detach()

    return fn


def run(model) -> dict:
    from mechscope.attribution import (
        activation_patching,
        attribution_patching,
        compare,
        direct_logit_attribution,
        patch_naive,
    )
    from mechscope.attribution.patching import KINDS

    hf = model.hf
    res: dict = {"repeats": {"dla": DLA_REPEATS, "patch": PATCH_REPEATS, "approx": APPROX_REPEATS}}

    # -- A1: direct logit attribution -----------------------------------------------------------------
    dla_ids = model.to_ids(DLA_PROMPT)
    t = model.token_ids(DLA_TARGET)[0]
    log("correctness: direct logit attribution parts sum to the logit, which equals HF's")
    a = direct_logit_attribution(model, DLA_PROMPT, DLA_TARGET)
    fb = hf_forward_backward(hf, dla_ids, lambda logits: logits[:, t])
    grad, hf_logit = fb()
    assert grad is not None and grad.abs().sum() > 0, "the baseline's backward did not reach the embeddings"
    rel_sum = abs(a.total - a.logit) / abs(a.logit)
    rel_hf = abs(a.logit - float(hf_logit)) / abs(float(hf_logit))
    assert rel_sum < 1e-4, f"attribution parts sum to {a.total}, the logit is {a.logit} (rel {rel_sum:.1e})"
    assert rel_hf < 1e-4, f"attributed logit {a.logit} differs from HF's {float(hf_logit)} (rel {rel_hf:.1e})"
    res["check_dla"] = {
        "tokens": dla_ids.shape[1],
        "logit": a.logit,
        "total": a.total,
        "rel_sum": rel_sum,
        "rel_hf": rel_hf,
        "units": a.heads.numel() + a.neurons.numel(),
        "top": a.top(3),
    }
    log(f"figure A1: direct logit attribution vs HF forward + backward, {DLA_REPEATS}+ each, interleaved")
    common.wait_quiet("figure A1")
    res["dla"] = common.interleaved(
        {"dla": lambda: direct_logit_attribution(model, DLA_PROMPT, DLA_TARGET), "hf_fb": fb},
        DLA_REPEATS,
        warmup=2,
        budget_s=60,
    )

    # -- A2: activation patching, batched vs naive -----------------------------------------------------
    clean_ids, corrupt_ids = model.to_ids(CLEAN), model.to_ids(CORRUPT)
    assert clean_ids.shape[1] == corrupt_ids.shape[1] == N_POS, (clean_ids.shape, corrupt_ids.shape)
    args = (model, CLEAN, CORRUPT, TARGET, VS)
    log("correctness: batched activation patching vs the naive loop")
    naive = patch_naive(*args, kinds="hook_resid_pre")["hook_resid_pre"]
    diffs = {}
    for bs in BATCH_SIZES:
        batched = activation_patching(*args, kinds="hook_resid_pre", batch_size=bs)["hook_resid_pre"]
        assert batched.grid.shape == (common.N_LAYERS, N_POS), batched.grid.shape
        diffs[bs] = float((batched.raw - naive.raw).abs().max())
        assert diffs[bs] < 1e-4, f"batch_size={bs}: batched and naive grids differ by {diffs[bs]}"
    res["check_patch"] = {"max_abs_diff": diffs, "clean": naive.clean, "corrupt": naive.corrupt, "cells": naive.grid.numel()}

    fns = {
        f"batched_{bs}": (lambda bs=bs: activation_patching(*args, kinds="hook_resid_pre", batch_size=bs)) for bs in BATCH_SIZES
    }
    fns["naive"] = lambda: patch_naive(*args, kinds="hook_resid_pre")
    log(f"figure A2: {len(fns)} patching variants x (1 warm-up + {PATCH_REPEATS}+), interleaved (~{PATCH_REPEATS * 35} s+)")
    res["patch"] = common.interleaved(fns, PATCH_REPEATS, max_rounds=2 * PATCH_REPEATS, budget_s=150, settle=True)

    # -- A3: attribution patching (context) ------------------------------------------------------------
    log("attribution patching vs real patching: correlation per grid")
    approx = attribution_patching(*args)
    real = activation_patching(*args, kinds=KINDS, batch_size=64)
    res["correlation"] = {kind: compare(approx[kind], real[kind]) for kind in KINDS}
    v = model.token_ids(VS)[0]
    tp = model.token_ids(TARGET)[0]
    fb_corrupt = hf_forward_backward(hf, corrupt_ids, lambda logits: logits[:, tp] - logits[:, v])
    rel = abs(float(fb_corrupt()[1]) - approx["hook_resid_pre"].corrupt) / abs(approx["hook_resid_pre"].corrupt)
    assert rel < 1e-4, f"HF's corrupted logit difference differs from attribution patching's ({rel:.1e})"
    log(f"figure A3: attribution patching (4 grids) vs HF forward + backward, {APPROX_REPEATS}+ each, interleaved")
    common.wait_quiet("figure A3")
    res["approx"] = common.interleaved(
        {"attr_patch": lambda: attribution_patching(*args), "hf_fb": fb_corrupt}, APPROX_REPEATS, warmup=2, budget_s=60
    )
    return res


# -- RESULTS.md section ----------------------------------------------------------------------------------


def _s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _row(label: str, ours: dict, base: dict, base_label: str, target: float | None, target_text: str = "") -> str:
    ratio = ours["median"] / base["median"]
    noisy = " (noisy)" if ours["noisy"] or base["noisy"] else ""
    met = ("**yes**" if ratio <= target else "**NO**") if target is not None else "—"
    tgt = target_text or (f"≤ {target:g}×" if target is not None else "— (context)")
    return f"| {label} | {_s(ours['median'])} | {_s(base['median'])} {base_label} | {ratio:.3f}× | {tgt} | {met}{noisy} |"


def render(res: dict, meta: dict) -> str:
    d, p, ap = res["dla"], res["patch"], res["approx"]
    batched = {bs: p[f"batched_{bs}"] for bs in BATCH_SIZES}
    best = min(BATCH_SIZES, key=lambda bs: batched[bs]["median"])
    cd, cp = res["check_dla"], res["check_patch"]
    speed = f"≤ {TARGETS['patching']:.3f}× (≥ 3× faster)"
    lines = [
        MARK_BEGIN,
        "## Attribution",
        "",
        f"Measured {meta['date']}, mechscope commit {meta['commit']}, load average at start / end "
        f"{meta['load'][0]} — {meta['load'][1]}, {meta['wall_s']:.0f} s "
        f"({meta['waited_s']:.0f} s of it waiting for a quiet CPU); same machine, model, float32 CPU and clean-call "
        "rule as above. This section is regenerated on its own by `bench/run.py --only attribution` (the sections "
        "above then keep the figures of the last full run, with their own date).",
        "",
        "| figure | mechscope | baseline | ratio | target | met? |",
        "|---|---|---|---|---|---|",
        _row(
            f"A1. direct logit attribution of all {cd['units']:,} heads + neurons ({cd['tokens']} tokens)",
            d["dla"],
            d["hf_fb"],
            "(plain HF forward + backward)",
            TARGETS["dla"],
        ),
        _row(
            f"A2. activation patching, {common.N_LAYERS} × {N_POS} `hook_resid_pre`, default `batch_size={DEFAULT_BS}`",
            batched[DEFAULT_BS],
            p["naive"],
            f"(`patch_naive`, {cp['cells']} forwards)",
            TARGETS["patching"],
            speed,
        ),
        _row(
            f"A2′. same, best `batch_size` ({best})",
            batched[best],
            p["naive"],
            "(`patch_naive`)",
            TARGETS["patching"],
            speed,
        ),
        _row(
            "A3. attribution patching, all 4 grids (2 forwards + 1 backward)",
            ap["attr_patch"],
            ap["hf_fb"],
            "(plain HF forward + backward)",
            None,
        ),
        "",
        "### Attribution timings, seconds",
        "",
        "| variant | min | median | max | ratio of medians to baseline | clean calls / calls | other processes' cores (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [
        ("A1: `direct_logit_attribution`", d["dla"], d["hf_fb"]),
        ("A1 baseline: HF forward + backward (target logit)", d["hf_fb"], d["hf_fb"]),
        *[(f"A2: `activation_patching`, `batch_size={bs}`", batched[bs], p["naive"]) for bs in BATCH_SIZES],
        ("A2 baseline: `patch_naive`", p["naive"], p["naive"]),
        ("A3: `attribution_patching`, 4 grids", ap["attr_patch"], ap["hf_fb"]),
        ("A3 baseline: HF forward + backward (logit difference)", ap["hf_fb"], ap["hf_fb"]),
    ]
    for label, t, base in rows:
        lines.append(
            f"| {label} | {t['min']:.3f} | {t['median']:.3f} | {t['max']:.3f} | {t['median'] / base['median']:.3f}× | "
            f"{t['n_clean']} / {t['n']} | {t['background_max']:.2f} |"
        )
    corr = ", ".join(f"`{k}` {v:.3f}" for k, v in res["correlation"].items())
    diffs = ", ".join(f"{bs}: {v:.1e}" for bs, v in cp["max_abs_diff"].items())
    top = ", ".join(f"{u} {v:+.3f}" for u, v in cd["top"])
    lines += [
        "",
        "### Attribution: inputs and correctness checks (asserted before timing)",
        "",
        f"- A1: {DLA_PROMPT!r} → {DLA_TARGET!r}, last position. The parts sum to the logit: total {cd['total']:.6f} vs "
        f"logit {cd['logit']:.6f} (rel {cd['rel_sum']:.1e}); the logit equals HF's within rel {cd['rel_hf']:.1e}. "
        f"Largest units: {top}. The baseline runs the forward from `inputs_embeds` that require grad, so its backward "
        "goes through the whole model (checked: non-zero gradient at the embeddings).",
        f"- A2: clean {CLEAN!r}, corrupted {CORRUPT!r} ({N_POS} tokens each), metric logit({TARGET!r}) − logit({VS!r}): "
        f"clean {cp['clean']:.3f}, corrupted {cp['corrupt']:.3f}. Batched vs naive raw grids, max |diff| by batch size: "
        f"{diffs}.",
        f"- A3: Pearson correlation of attribution patching with real (batched) activation patching: {corr}. "
        "Its corrupted metric equals the baseline's forward within rel 1e-4.",
        "- A1's baseline does the full forward (logits at every position) and backward; "
        "`direct_logit_attribution` does one forward that stops before the unembedding plus small per-layer "
        "read-backs, so it can be below 1×. A2's naive loop is timed "
        f"{PATCH_REPEATS}+ times (≈ {cp['cells']} forwards each); the variants are interleaved, so its median and the "
        "batched ones saw the same conditions.",
        MARK_END,
        "",
    ]
    return "\n".join(lines)


def splice(text: str, section: str) -> str:
    """`text` with its attribution section replaced by `section` (appended when there is none)."""
    return common.splice_section(text, section, MARK_BEGIN, MARK_END)


def run_and_render(model) -> tuple[dict, str]:
    """Run the figures and render the section, with its own date, commit, load and wall time."""
    t0 = time.perf_counter()
    waited0 = common.quiet_waited_s()
    load0 = common.load_average()
    res = run(model)
    info = common.machine_info()
    meta = {
        "date": info["date"],
        "commit": info["mechscope commit"],
        "load": (load0, common.load_average()),
        "wall_s": time.perf_counter() - t0,
        "waited_s": common.quiet_waited_s() - waited0,
    }
    return res, render(res, meta)
