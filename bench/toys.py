"""Toy models of superposition, the full variants of the four results and batched speed: `.venv/bin/python bench/toys.py`.

Ta. n = 5, m = 2, importance 0.9^i, 10,000 steps, 8 seeds at p = 1, 0.02 and 0.01: what each seed learned
    (pentagon, two antipodal pairs, ...) and the best seed's geometry.
Tb. n = 20, m = 5, importance 0.7^i, S = 0 ... 0.999, 10,000 steps, best of 4 seeds: features represented and D*.
Tc. The n = 2, m = 1 phase diagram over 12 densities x 11 relative importances, 5 seeds of 10,000 steps per
    cell, against the theory's lowest-expected-loss solution.
Td. n = 200, m = 20, importance 1, 20 sparsity levels, 10,000 steps: D* and the lines of the D_i scatter.
T1. Training I instances as one batched model (`mechscope.toys.train_toy`) against the same I instances
    trained one after another, each as a model of one instance, for the same steps and batch, at the sizes
    of Ta, Tb and Tc (the target is at least 5x): the cost per step and the fixed cost, from runs of 1 step
    and of several, and the whole 10,000-step run.

Figures go to bench/figures/toys-*.png; the section of RESULTS.md between MARK_BEGIN and MARK_END is
rewritten at the end. `--only d` (or a, b, c, speed; repeatable) runs those parts alone and keeps the other
parts' last results (bench/out/toys.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import dict_quality  # noqa: E402
from common import log  # noqa: E402

MARK_BEGIN = "<!-- toys section: begin (regenerated alone by `bench/toys.py`) -->"
MARK_END = "<!-- toys section: end -->"
FIGURES = common.BENCH_DIR / "figures"
STEPS = 10_000
B_LEVELS = (0.0, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999)
SPEED = {  # name: (n, m, instances, steps timed)
    "Ta (5 -> 2)": (5, 2, 24, 500),
    "Tb (20 -> 5)": (20, 5, 28, 300),
    "Tc (2 -> 1)": (2, 1, 660, 200),
}


def result_a() -> dict:
    from mechscope.toys import ToyConfig, planar_geometry, represented, train_toy
    from mechscope.viz import toy_plots

    log("Ta: 5 features in 2 dimensions, 8 seeds")
    cfg = ToyConfig(n_features=5, n_hidden=2, probabilities=(1.0, 0.02, 0.01), seeds=8, steps=STEPS)
    result = train_toy(cfg, show_progress=False)
    shapes = {
        p: [planar_geometry(W) for W, q in zip(result.W, result.probabilities, strict=True) if q == p] for p in cfg.probabilities
    }
    best = result.best()
    toy_plots.geometry_png(best, FIGURES / "toys-a-geometry.png")
    toy_plots.features_png(best, FIGURES / "toys-a-features.png")
    return {"shapes": shapes, "best": [planar_geometry(W) for W in best.W], "represented": represented(best.W).tolist()}


def result_b() -> dict:
    from mechscope.toys import ToyConfig, dimensions_per_feature, represented, train_toy
    from mechscope.viz import toy_plots

    log("Tb: 20 features in 5 dimensions, 7 levels x 4 seeds")
    cfg = ToyConfig(n_features=20, n_hidden=5, importance=0.7, probabilities=tuple(1 - s for s in B_LEVELS), seeds=4, steps=STEPS)
    result = train_toy(cfg, show_progress=False)
    every = represented(result.W).view(len(B_LEVELS), 4).tolist()
    best = result.best()
    toy_plots.features_png(best, FIGURES / "toys-b-features.png")
    return {"every": every, "best": represented(best.W).tolist(), "d_star": dimensions_per_feature(best.W).tolist()}


def result_c() -> dict:
    import torch

    from mechscope.toys.phase import phase_diagram
    from mechscope.viz import toy_plots

    log("Tc: the phase diagram, 12 x 11 cells x 5 seeds")
    p = [float(x) for x in 10 ** torch.linspace(-2, 0, 12, dtype=torch.float64)]
    r = [float(x) for x in 10 ** torch.linspace(-1, 1, 11, dtype=torch.float64)]
    diagram = phase_diagram(p, r, seeds=5, steps=STEPS, show_progress=False)
    toy_plots.phase_png(diagram, FIGURES / "toys-c-phase.png")
    inside = ~diagram.boundary
    from mechscope.toys.phase import geometry

    every = geometry(diagram.trained_W.reshape(-1, 2)).view(len(r), len(p), 5)
    single = float((every == diagram.predicted[..., None])[inside].float().mean())
    return {"cells": len(p) * len(r), "inside": int(inside.sum()), "agreement": diagram.agreement,
            "single": single, "same_sign": diagram.single_run_same_sign}  # fmt: skip


def result_d() -> dict:
    from mechscope.toys import ToyConfig, dimensions_per_feature, train_toy
    from mechscope.toys.superposition import feature_dimensionality, fraction_lines, sparsity_levels
    from mechscope.viz import toy_plots

    log("Td: 200 features in 20 dimensions, 20 levels")
    cfg = ToyConfig(n_features=200, n_hidden=20, importance=1.0, probabilities=tuple(sparsity_levels(20)), steps=STEPS)
    result = train_toy(cfg, show_progress=False)
    toy_plots.dimensionality_png(result, FIGURES / "toys-d-dimensionality.png")
    keep = result.W.norm(dim=-1) > 0.5
    D = feature_dimensionality(result.W)[keep]
    lines = [(line.fraction, line.count, line.background, line.ratio) for line in fraction_lines(D)]
    on_any = sum(line[1] for line in lines) / max(int(keep.sum()), 1)
    d_star = dimensions_per_feature(result.W).tolist()
    return {"d_star": d_star, "lines": lines, "represented": int(keep.sum()), "on_fractions": on_any}


def _seconds(cfg) -> float:
    from mechscope.toys import train_toy

    start = time.perf_counter()
    train_toy(cfg, show_progress=False)
    return time.perf_counter() - start


def speed() -> dict:
    """Each toy's whole run timed at 1 step and at `steps` steps, batched and as a loop: the difference gives
    the cost per step, the rest the fixed cost (building the model and the final loss on 131k samples)."""
    from mechscope.toys import ToyConfig

    rows = {}
    for name, (n, m, instances, steps) in SPEED.items():
        levels = tuple(1 / (1 + i) for i in range(instances))
        log(f"T1 {name}: {instances} instances batched, then one after another, 1 and {steps} steps")
        _seconds(ToyConfig(n_features=n, n_hidden=m, probabilities=levels, steps=20))  # warm-up
        row = {"instances": instances, "steps": steps}
        for mode, groups in (("batched", [levels]), ("loop", [(p,) for p in levels])):
            one, full = (sum(_seconds(ToyConfig(n_features=n, n_hidden=m, probabilities=g, steps=k)) for g in groups)
                         for k in (1, steps))  # fmt: skip
            row[f"{mode}_step_s"] = (full - one) / (steps - 1)
            row[f"{mode}_fixed_s"] = one - row[f"{mode}_step_s"]
        rows[name] = row
    return rows


def render(r: dict, stamp: str) -> str:
    lines = [MARK_BEGIN, "## Toy models of superposition (issue 12)", "", stamp, ""]
    if "a" in r:
        a = r["a"]
        lines += ["### Ta. 5 features in 2 dimensions (importance 0.9^i, 10,000 steps, 8 seeds)", "",
                  "| p | what each seed learned | best seed by loss |", "|---|---|---|"]  # fmt: skip
        for (p, shapes), best in zip(a["shapes"].items(), a["best"], strict=True):
            counted = ", ".join(f"{shapes.count(s)} x {s}" for s in sorted(set(shapes)))
            lines.append(f"| {float(p):g} | {counted} | {best} |")
        lines += ["", "![geometry](figures/toys-a-geometry.png)", ""]
    if "b" in r:
        b = r["b"]
        lines += ["### Tb. 20 features in 5 dimensions (importance 0.7^i, 10,000 steps, best of 4 seeds)", "",
                  "| S | represented, best seed | every seed | D* |", "|---|---|---|---|"]  # fmt: skip
        for s, best, every, d in zip(B_LEVELS, b["best"], b["every"], b["d_star"], strict=True):
            lines.append(f"| {s:g} | {best} | {every} | {d:.3f} |")
        rising = b["best"] == sorted(b["best"])
        lines += ["", f"Never decreasing: {'yes' if rising else 'NO'}; from {b['best'][0]} to {b['best'][-1]} "
                  f"(at least 12 wanted); D* from {b['d_star'][0]:.2f} to {b['d_star'][-1]:.2f}.", "",
                  "![features](figures/toys-b-features.png)", ""]  # fmt: skip
    if "c" in r:
        c = r["c"]
        lines += ["### Tc. Phase diagram of 2 features in 1 dimension (5 seeds of 10,000 steps per cell)", "",
                  f"- The best trained seed agrees with theory in **{c['agreement']:.1%}** of the {c['inside']} cells "
                  f"away from the boundaries (of {c['cells']}); the target is at least 90 %.",
                  f"- A single seed agrees in {c['single']:.1%} of those cells; {c['same_sign']:.1%} of all single runs "
                  "ended in the same-sign geometry.", "", "![phase diagram](figures/toys-c-phase.png)", ""]  # fmt: skip
    if "d" in r:
        d = r["d"]
        half = sum(abs(x - 0.5) <= 0.03 for x in d["d_star"])
        lines += ["### Td. Dimensionality: 200 features in 20 dimensions (importance 1, 20 levels, 10,000 steps)", "",
                  f"- D* from {d['d_star'][0]:.3f} to {d['d_star'][-1]:.3f}; within 0.03 of 1/2 at **{half}** levels (3 wanted).",
                  f"- {d['represented']} represented features (‖W_i‖ > 0.5) over all levels; {d['on_fractions']:.0%} "
                  "of them sit within ±0.01 of a named fraction.", "",
                  "| D_i | features within ±0.01 | smooth background | ratio |", "|---|---|---|---|"]  # fmt: skip
        for f, count, background, ratio in d["lines"]:
            lines.append(f"| {f:.3f} | {count} | {background:.1f} | {ratio:.1f} |")
        lines += ["", "![dimensionality](figures/toys-d-dimensionality.png)", ""]
    if "speed" in r:
        lines += ["### T1. Batched training against a loop over instances (batch 1,024)", "",
                  "Each run timed at 1 step and at the steps shown: the difference gives the cost of a step, the rest the "
                  "fixed cost "
                  "(building the model, and the final loss on 131k samples per instance). A whole run is the "
                  f"recipe's {STEPS:,} steps.", "",
                  "| toy | instances | steps | ms per step, batched | ms per step, loop | fixed s, batched | fixed s, loop "
                  f"| {STEPS:,}-step run, batched | loop | batched vs loop |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, s in r["speed"].items():
            whole = {mode: s[f"{mode}_fixed_s"] + STEPS * s[f"{mode}_step_s"] for mode in ("batched", "loop")}
            lines.append(
                f"| {name} | {s['instances']} | {s['steps']} | {1000 * s['batched_step_s']:.2f} | {1000 * s['loop_step_s']:.2f} "
                f"| {s['batched_fixed_s']:.2f} | {s['loop_fixed_s']:.2f} | {whole['batched']:.0f} s | {whole['loop']:.0f} s "
                f"| **{whole['loop'] / whole['batched']:.1f}x** |"
            )  # fmt: skip
        lines += ["", "Target: batched at least 5x faster than the loop."]
    return "\n".join([*lines, "", MARK_END]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", choices=["a", "b", "c", "d", "speed"], action="append", help="run only these parts")
    parts = parser.parse_args().only or ["a", "b", "c", "d", "speed"]
    load_start = common.load_average()
    run = {"a": result_a, "b": result_b, "c": result_c, "d": result_d, "speed": speed}
    saved = common.BENCH_DIR / "out" / "toys.json"  # a partial run keeps the other parts' last results
    results = json.loads(saved.read_text()) if saved.exists() else {}
    results.update({name: run[name]() for name in parts})
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results))
    results = {name: results[name] for name in run if name in results}
    section = render(results, dict_quality._stamp(load_start) + ".")
    common.write_section(section, MARK_BEGIN, MARK_END, "toys")
    print(section)


if __name__ == "__main__":
    main()
