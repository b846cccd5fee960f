"""Toy models of superposition, batched against a loop: `.venv/bin/python bench/toys.py`.

T1. Training I instances of the n = 5, m = 2 toy as one batched model (`mechscope.toys.train_toy`) against
    the same I instances trained one after another, each as a model of one instance, for the same steps
    and batch: seconds per step of each, and the ratio (the target is at least 5x).

The section of RESULTS.md between MARK_BEGIN and MARK_END is rewritten at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import dict_quality  # noqa: E402
from common import log  # noqa: E402

MARK_BEGIN = "<!-- toys section: begin (regenerated alone by `bench/toys.py`) -->"
MARK_END = "<!-- toys section: end -->"
STEPS = 500
PROBABILITIES = (1.0, 0.3, 0.1, 0.03, 0.02, 0.01)
SEEDS = 4


def _seconds(cfg) -> float:
    from mechscope.toys import train_toy

    start = time.perf_counter()
    train_toy(cfg, show_progress=False)
    return time.perf_counter() - start


def measure() -> dict:
    import torch

    from mechscope.toys import ToyConfig

    torch.set_num_threads(torch.get_num_threads())
    batched = ToyConfig(probabilities=PROBABILITIES, seeds=SEEDS, steps=STEPS)
    _seconds(ToyConfig(probabilities=PROBABILITIES, seeds=SEEDS, steps=20))  # warm-up
    log(f"T1: {batched.instances} instances batched")
    together = _seconds(batched)
    log(f"T1: {batched.instances} instances one after another")
    alone = sum(
        _seconds(ToyConfig(probabilities=(p,), seeds=1, steps=STEPS, seed=s)) for p in PROBABILITIES for s in range(SEEDS)
    )
    return {"instances": batched.instances, "steps": STEPS, "batched_s": together, "loop_s": alone}


def render(r: dict, stamp: str) -> str:
    per = lambda s: 1000 * s / r["steps"]  # noqa: E731
    ratio = r["loop_s"] / r["batched_s"]
    lines = [
        MARK_BEGIN,
        "## Toy models of superposition (issue 12)",
        "",
        stamp,
        "",
        f"T1. The n = 5, m = 2 toy, {r['instances']} instances ({len(PROBABILITIES)} sparsity levels x {SEEDS} seeds), "
        f"{r['steps']} steps of batch 1,024 each:",
        "",
        "| how | ms per step of all instances | vs the loop |",
        "|---|---|---|",
        f"| one batched model (`train_toy`) | {per(r['batched_s']):.1f} | {ratio:.1f}x |",
        f"| one model per instance, one after another | {per(r['loop_s']):.1f} | 1.0x |",
        "",
        f"Target: batched at least 5x faster than the loop: {'met' if ratio >= 5 else 'NOT met'} ({ratio:.1f}x).",
        "",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    load_start = common.load_average()
    result = measure()
    section = render(result, dict_quality._stamp(load_start) + ".")
    common.write_section(section, MARK_BEGIN, MARK_END, "toys")


if __name__ == "__main__":
    main()
