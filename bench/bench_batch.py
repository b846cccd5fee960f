"""Batch figure B1: prompts of different lengths in one call, against a loop over the same prompts.

B1. 32 prompts of 5-60 tokens (sentences of CPython's documentation, cut at a spread of lengths) on the
    embedded SmolLM2: `mechscope.predict(model, prompts)` (one padded batch) vs
    `[mechscope.predict(model, p) for p in prompts]`; and the same for `neuron_activations` (a heatmap's
    values, one read site). The results are checked equal (same top tokens, probabilities within 1e-4)
    before anything is timed.

`render` writes this part of RESULTS.md between MARK_BEGIN and MARK_END (`bench/run.py --only batch`).
"""

from __future__ import annotations

import random
import time

import common
from common import log

N_PROMPTS, MIN_TOKENS, MAX_TOKENS = 32, 5, 60
TARGET = " the"
MARK_BEGIN = "<!-- batch section: begin (regenerated alone by `bench/run.py --only batch`) -->"
MARK_END = "<!-- batch section: end -->"


def prompts(tokenizer) -> list[str]:
    """N_PROMPTS texts of MIN_TOKENS..MAX_TOKENS tokens, evenly spread, from the documentation (seeded)."""
    ids = tokenizer(common.docs_text(), add_special_tokens=False).input_ids
    rng = random.Random(0)
    lengths = [MIN_TOKENS + round(i * (MAX_TOKENS - MIN_TOKENS) / (N_PROMPTS - 1)) for i in range(N_PROMPTS)]
    rng.shuffle(lengths)
    starts = rng.sample(range(len(ids) - MAX_TOKENS), N_PROMPTS)
    return [tokenizer.decode(ids[s : s + n]) for s, n in zip(starts, lengths, strict=True)]


def _check_equal(model, texts) -> float:
    import mechscope
    from mechscope.attribution import neuron_activations

    worst = 0.0
    for text, p in zip(texts, mechscope.predict(model, texts, targets=TARGET), strict=True):
        alone = mechscope.predict(model, text, targets=TARGET)
        if [t.id for t in p.top] != [t.id for t in alone.top]:
            raise AssertionError(f"batched predict differs from predicting {text!r} alone")
        worst = max(worst, abs(p.targets[0].prob - alone.targets[0].prob))
    for text, tv in zip(texts, neuron_activations(model, texts, 29, 288), strict=True):
        worst = max(worst, float((tv.values - neuron_activations(model, text, 29, 288).values).abs().max()))
    if not worst <= 1e-4:
        raise AssertionError(f"batched results differ from one-at-a-time by {worst:.3g}")
    return worst


def run(model) -> dict:
    import mechscope
    from mechscope.attribution import neuron_activations

    texts = prompts(model.tokenizer)
    lengths = model.encode(texts).lengths
    log(f"B1: {len(texts)} prompts of {min(lengths)}-{max(lengths)} tokens; checking batch = loop")
    worst = _check_equal(model, texts)
    fns = {
        "predict batch": lambda: mechscope.predict(model, texts, targets=TARGET),
        "predict loop": lambda: [mechscope.predict(model, t, targets=TARGET) for t in texts],
        "neuron batch": lambda: neuron_activations(model, texts, 29, 288),
        "neuron loop": lambda: [neuron_activations(model, t, 29, 288) for t in texts],
    }
    timings = common.interleaved(fns, repeats=5, budget_s=240)
    return {"timings": timings, "lengths": lengths, "worst": worst, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def render(result: dict, stamp: str) -> str:
    t = result["timings"]

    def row(what: str, batch: str, loop: str) -> str:
        b, lp = t[batch], t[loop]
        noisy = " (noisy)" if b["noisy"] or lp["noisy"] else ""
        return (
            f"| {what} | {b['median'] * 1e3:,.0f} ms | {lp['median'] * 1e3:,.0f} ms | {lp['median'] / b['median']:.2f}×{noisy} |"
        )

    lengths = result["lengths"]
    return "\n".join(
        [
            MARK_BEGIN,
            "## Prompts of different lengths in one call",
            "",
            f"Measured {stamp}. {len(lengths)} prompts of {min(lengths)}–{max(lengths)} tokens "
            f"({sum(lengths):,} in all) from the documentation corpus, SmolLM2 float32 on the CPU. The batch is padded "
            "on the right; each text's result was checked equal to running it alone first (largest difference "
            f"{result['worst']:.2g}, in probabilities and activations). Medians of clean calls, interleaved.",
            "",
            "| call | one call (batch) | loop, one prompt at a time | speed-up |",
            "|---|---|---|---|",
            row(f"`predict(model, prompts, targets={TARGET!r})`", "predict batch", "predict loop"),
            row("`neuron_activations(model, prompts, 29, 288)` (stops after block 29)", "neuron batch", "neuron loop"),
            "",
            "The batch pads every prompt to the longest (60 tokens), so it computes about twice the tokens the loop "
            "does; it still wins because one forward over 32 rows keeps the matrix multiplies large.",
            MARK_END,
            "",
        ]
    )


def splice(text: str, section: str) -> str:
    """`text` with its batch section replaced by `section` (appended when there is none)."""
    return common.splice_section(text, section, MARK_BEGIN, MARK_END)
