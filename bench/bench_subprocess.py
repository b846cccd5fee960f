"""Figures 4-5: load time and peak memory, each measured in a fresh Python process (see child.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import common
from common import log

LOAD_REPEATS = 5
LOAD_BUDGET_S = 120
RSS_OPERATIONS = ["hf_forward", "ms_resid30", "ms_all", "hf_all", "hf_lens", "ms_lens"]


def child(op: str, folder: str, ids_file: str) -> dict:
    """Run one measurement in a fresh interpreter; its result, plus the parent-side wall time."""
    before = common.cpu_snapshot()
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(common.BENCH_DIR / "child.py"), op, folder, ids_file],
        capture_output=True,
        text=True,
        cwd=common.REPO,
    )
    wall = time.perf_counter() - t
    background = common.other_cores(before, common.cpu_snapshot())
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"child {op!r} failed with exit status {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    result["background_cores"] = background
    return result


def run(folder: str, ids_file: str) -> dict:
    log(f"figure 4: load in a fresh process, mechscope vs plain transformers, {LOAD_REPEATS}+ each, interleaved")
    loads: dict[str, list[dict]] = {"load": [], "hf_load": []}
    start = time.perf_counter()
    for i in range(3 * LOAD_REPEATS):
        n_clean = min(sum(r["background_cores"] < common.CLEAN_CORES for r in runs) for runs in loads.values())
        if i >= LOAD_REPEATS and (n_clean >= LOAD_REPEATS or time.perf_counter() - start > LOAD_BUDGET_S):
            break
        common.wait_quiet(f"load round {i + 1}")
        for op in ("load", "hf_load") if i % 2 == 0 else ("hf_load", "load"):
            loads[op].append(child(op, folder, ids_file))
    rss = {}
    for what in RSS_OPERATIONS:
        log(f"figure 5: peak RSS of {what} in a fresh process")
        rss[what] = child(f"rss:{what}", folder, ids_file)
    return {"loads": {op: summarise_loads(runs) for op, runs in loads.items()}, "rss": rss, "load_repeats": LOAD_REPEATS}


def summarise_loads(runs: list[dict]) -> dict:
    """Medians over the runs no other process disturbed, when there are enough of them (else over all, noisy)."""
    clean = [r for r in runs if r["background_cores"] < common.CLEAN_CORES]
    noisy = len(clean) < LOAD_REPEATS
    use = runs if noisy else clean
    out = {key: common.median([r[key] for r in use]) for key in ("import_s", "load_s", "process_wall_s")}
    out["import_load_s"] = common.median([r["import_s"] + r["load_s"] for r in use])
    out["load_min"], out["load_max"] = min(r["load_s"] for r in use), max(r["load_s"] for r in use)
    out.update(n=len(runs), n_clean=len(clean), noisy=noisy, background_max=max(r["background_cores"] for r in runs))
    return out
