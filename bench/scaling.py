"""Scaling out with torchrun on this 2-core machine (issue 14): `.venv/bin/python bench/scaling.py`.

X1-X3. The three long jobs through the real `mechscope` command, each run three ways on the same input: one
    process with one thread (the reference), one process with two threads (`mechscope ...`, OMP_NUM_THREADS=2)
    and two processes with one thread each (`torchrun --standalone --nproc-per-node 2 --no-python mechscope ...`,
    OMP_NUM_THREADS=1). X1 `index build` of 12,288 tokens over every MLP neuron (46,080 units), with rank 0's
    own timings (its share, its wait, the merge), X2 `harvest` of blocks.15.hook_resid_post, X3 `train-dict`
    from the store X2's 1 x 1 run wrote (576 -> 4,608 latents,
    TopK k = 32, 120 steps of 4,096 tokens). Wall time of the whole command (start-up and model load included), the
    figure the command reports itself where it reports one, and a cheap check that the runs made the same thing.
X4. The communication share of a DDP training step: the trainer itself (`train_dictionary` from that store, no
    model) under torchrun, 2 processes x 1 thread on gloo, once as it is and once with DDP's gradient all-reduce
    switched off (`require_backward_grad_sync = False`, what `no_sync()` sets), alternated; the share is the
    difference of the median step times over the synced step time. The all-reduce of the same bytes alone, timed
    in the same processes, corroborates it.

Two processes x one thread against one process x two threads compares two ways of using the same two cores,
not more hardware. Before each timed run the script waits (at most 20 minutes) for a quiet machine: no pytest
or bench/serve.py running, other processes' CPU use under 0.15 cores, and a 1-minute load average under 0.7
unless the load is this script's own previous run (which then shows in the load, not in other processes' use).
Results go to bench/out/scaling.json (work files to bench/out/scaling/); the section of RESULTS.md between
MARK_BEGIN and MARK_END is rewritten. `--only index` (or harvest, train, ddp; repeatable) runs those parts
alone and keeps the others' last results; train and ddp read the store harvest leaves in bench/out/scaling/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log  # noqa: E402

MARK_BEGIN = "<!-- scaling section: begin (regenerated alone by `bench/scaling.py`) -->"
MARK_END = "<!-- scaling section: end -->"
WORK = common.BENCH_DIR / "out" / "scaling"
SAVED = common.BENCH_DIR / "out" / "scaling.json"
BIN = Path(sys.executable).parent  # the venv's mechscope and torchrun
SITE = "blocks.15.hook_resid_post"
CONFIGS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # name: (processes, threads per process)
VARIANTS = {"index": {"": {}}, "harvest": {"": {}}, "train": {"": {}}}
"""Per job, the environments each configuration runs in (suffix of the run's name: extra variables)."""
INDEX_TOKENS = 12_288  # 96 contexts of 128: 12 batches of 8, 6 per process
SHARD_CONTEXTS, SHARDS = 32, 8  # harvest: 8 shards of 32 contexts x 124 stored positions (4 per process)
TRAIN_STEPS, BATCH, EVAL_EVERY = 120, 4_096, 10
DDP_STEPS, DDP_ROUNDS = 60, 2
QUIET_MAX_S = 20 * 60
_last_run_end = [-1e9]


def _args(job: str, out: Path) -> list[str]:
    """The `mechscope` arguments of one job writing to `out`."""
    if job == "index":
        return ["index", "build", "--model", "default", "--tokens", str(INDEX_TOKENS), "--out", str(out)]
    if job == "harvest":
        tokens = SHARDS * SHARD_CONTEXTS * 124
        return ["harvest", SITE, "--out", str(out), "--tokens", str(tokens), "--shard-contexts", str(SHARD_CONTEXTS)]
    return ["train-dict", "--out", str(out), "--model", "default", "--sites", SITE, "--store", str(WORK / "store-1x1"),
            "--expansion", "8", "--k", "32", "--tokens", str(TRAIN_STEPS * BATCH), "--batch-size", str(BATCH),
            "--eval-every", str(EVAL_EVERY), "--eval-tokens", "4096", "--no-png"]  # fmt: skip


def _launch(procs: int, program: list[str]) -> list[str]:
    """`program` as one process, or under torchrun as `procs` processes on this node."""
    if procs == 1:
        return program
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(procs), *program]


# -- waiting for a quiet machine, timing ------------------------------------------------------------


def _others_running() -> bool:
    found = subprocess.run(["pgrep", "-f", "pytest|bench/serve.py"], capture_output=True, text=True)
    return bool(found.stdout.strip())


def wait_quiet(what: str) -> float:
    """Wait until the machine is quiet (see the module docstring), at most QUIET_MAX_S; the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < QUIET_MAX_S:
        before = common.cpu_snapshot()
        time.sleep(3)
        other = common.other_cores(before, common.cpu_snapshot())
        own_load = time.monotonic() - _last_run_end[0] < 150
        if not _others_running() and other < common.CLEAN_CORES and (os.getloadavg()[0] < 0.7 or own_load):
            return time.monotonic() - start
        if time.monotonic() - start < 4:
            log(f"waiting for a quiet machine before {what} (load {common.load_average()}, others {other:.2f} cores)")
        time.sleep(27)
    log(f"still busy after {QUIET_MAX_S / 60:.0f} minutes: running {what} anyway")
    return time.monotonic() - start


def timed_run(what: str, command: list[str], threads: int, extra_env: dict | None = None) -> dict:
    """Run `command` with OMP_NUM_THREADS=`threads` on a quiet machine: wall time, CPU time, others' cores."""
    waited = wait_quiet(what)
    load = common.load_average()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "COLUMNS": "200", **(extra_env or {})}
    log(f"{what}: {' '.join(Path(c).name if c.startswith('/') else c for c in command[:8])} ...")
    before, t = common.cpu_snapshot(), time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = common.cpu_snapshot()
    _last_run_end[0] = time.monotonic()
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    log(f"{what}: {wall:.1f} s")
    return {"wall_s": wall, "cpu_s": after[2] - before[2], "other_cores": common.other_cores(before, after),
            "load_at_start": load, "waited_s": waited, "stdout": done.stdout[-1500:]}  # fmt: skip


# -- X1-X3: the jobs ---------------------------------------------------------------------------------


def _fresh(path: Path) -> Path:
    """`path` with anything a previous run left there (or beside it, an index's shards) removed."""
    for old in path.parent.glob(path.name + "*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return path


def run_job(job: str) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    runs = {}
    for suffix, extra_env in VARIANTS[job].items():
        for config, (procs, threads) in CONFIGS.items():
            name = config + suffix.replace(" ", "-")
            out = _fresh(WORK / {"index": f"index-{name}.duckdb", "harvest": f"store-{name}", "train": f"sae-{name}"}[job])
            program = ["--no-python", str(BIN / "mechscope")] if procs > 1 else [str(BIN / "mechscope")]
            command = _launch(procs, [*program, *_args(job, out)])
            runs[name] = timed_run(f"{job} {name}", command, threads, extra_env)
            runs[name].update(_reported(job, runs[name]["stdout"], out))
            if job == "harvest":  # it reports no time of its own: its fixed cost is the same command with nothing to do
                runs[name]["again_s"] = timed_run(f"{job} {name} again (a finished store)", command, threads)["wall_s"]
    check = {"index": check_index, "harvest": check_harvest, "train": check_train}[job]
    return {"runs": runs, "check": check(list(runs))}


def _reported(job: str, stdout: str, out: Path) -> dict:
    """What the command reports itself: the index's build time, the store's tokens, the training loop's time."""
    if job == "index":
        reported = {"reported_s": float(re.findall(r"\(([\d.]+) s\)", stdout)[-1])}
        parts = re.findall(
            r"its share built in ([\d.]+) s, waited ([\d.]+) s for the other ranks, \d+ parts merged in ([\d.]+) s", stdout
        )
        if parts:  # rank 0's own timings under torchrun
            reported.update(zip(("share_s", "wait_s", "merge_s"), map(float, parts[-1]), strict=True))
        return reported
    if job == "harvest":
        return {"tokens": int(re.findall(r": ([\d,]+) tokens of", stdout)[-1].replace(",", ""))}
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    fvu = re.findall(r"held-out FVU ([\d.]+) · L0 ([\d.]+)", stdout)[-1]
    return {"loop_s": last["seconds"], "steps": last["step"], "eval_fvu": float(fvu[0]), "eval_l0": float(fvu[1])}


def check_index(names: list[str]) -> dict:
    """Each build's top examples against the 1 x 1 build's: rows whose example differs, largest value difference."""
    import duckdb

    con, out = duckdb.connect(), {}
    for i, name in enumerate(names):
        con.execute(f"ATTACH '{WORK / f'index-{name}.duckdb'}' AS i{i} (READ_ONLY)")
    for i, name in enumerate(names):
        rows, moved, diff = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE a.ctx <> b.ctx OR a.pos <> b.pos), max(abs(a.value - b.value)) "
            f"FROM i{i}.top AS a JOIN i{names.index('1x1')}.top AS b USING (unit, rank)"
        ).fetchone()
        units = con.execute(f"SELECT count(*) FROM i{i}.units").fetchone()[0]
        out[name] = {"top_rows": rows, "units": units, "examples_moved": moved, "max_value_diff": diff}
    con.close()
    for name in names:
        (WORK / f"index-{name}.duckdb").unlink()  # large; the figures are kept
    return out


def check_harvest(names: list[str]) -> dict:
    """Each store's manifest and shards against the 1 x 1 store's: same manifest, bit-equal or largest difference."""
    from safetensors.torch import load_file

    def manifest(name):
        return {**json.loads((WORK / f"store-{name}" / "manifest.json").read_text()), "created": ""}

    out, want = {}, manifest("1x1")
    for name in names:
        diffs = [
            float((load_file(WORK / f"store-{name}" / s["file"])["acts"] - load_file(WORK / "store-1x1" / s["file"])["acts"])
                  .abs().max())
            for s in want["shards"]
        ]  # fmt: skip
        out[name] = {"same_manifest": manifest(name) == want, "max_abs_diff": max(diffs), "bit_equal": max(diffs) == 0}
    return out


def check_train(names: list[str]) -> dict:
    """Each run's held-out FVU against the 1 x 1 run's, at the first evaluation (step EVAL_EVERY) and at the end.

    The weights themselves part ways over 120 steps (a float summed in another order moves a latent across the
    TopK threshold, and Adam carries the difference on), so the held-out FVU is the figure to compare; that the
    runs train the same dictionary step for step is what tests/test_distributed_jobs.py checks."""

    def evals(name):
        lines = (WORK / f"sae-{name}" / "metrics.jsonl").read_text().splitlines()
        return [r["eval_fvu"] for r in map(json.loads, lines) if "eval_fvu" in r]

    want = evals("1x1")
    out = {}
    for name in names:
        got = evals(name)
        out[name] = {"first_fvu": got[0], "first_rel_diff": abs(got[0] - want[0]) / want[0],
                     "last_fvu": got[-1], "last_rel_diff": abs(got[-1] - want[-1]) / want[-1]}  # fmt: skip
    return out


# -- X4: the communication share of a DDP step ---------------------------------------------------------

DDP_SCRIPT = '''
"""Under torchrun: train from a store (no model) with DDP as it is ("sync") or with its gradient all-reduce off
("nosync"), then time the all-reduce of the dictionary's parameter bytes alone; rank 0 writes JSON."""
import json, statistics, sys, time
import torch, torch.distributed as dist
from torch import nn
from mechscope.activations import StoreSource
from mechscope.dictionaries import TrainConfig, train_dictionary

mode, store, out, steps, result = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]


class NoSync(nn.parallel.DistributedDataParallel):
    """DDP that never all-reduces gradients: what `no_sync()` switches off, for every step."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.require_backward_grad_sync = False


if mode == "nosync":
    nn.parallel.DistributedDataParallel = NoSync  # the trainer looks it up at run time
cfg = TrainConfig(sites=[SITE], expansion=8, k=32, tokens=steps * BATCH, batch_size=BATCH, checkpoint_seconds=1e9)
d = train_dictionary(None, cfg, out, show_progress=False, source=StoreSource(store, sites=[SITE]))
seconds = [json.loads(line)["seconds"] for line in open(out + "/metrics.jsonl")] if dist.get_rank() == 0 else []
flat = torch.zeros(sum(p.numel() for p in d.parameters()))
times = []
for _ in range(12):
    dist.barrier()
    t = time.perf_counter()
    dist.all_reduce(flat)
    times.append(time.perf_counter() - t)
if dist.get_rank() == 0:
    steps_s = [b - a for a, b in zip(seconds[2:], seconds[3:])]  # the first steps warm up
    json.dump({"step_s": statistics.median(steps_s), "steps_s": steps_s, "loop_s": seconds[-1],
               "allreduce_s": statistics.median(times[2:]), "param_bytes": flat.numel() * 4,
               "threads": torch.get_num_threads()}, open(result, "w"))
'''


def run_ddp() -> dict:
    script = WORK / "ddp_step.py"
    script.write_text(DDP_SCRIPT.replace("SITE", repr(SITE)).replace("BATCH", str(BATCH)))
    rounds: dict[str, list[dict]] = {"sync": [], "nosync": []}
    for i in range(DDP_ROUNDS):
        for mode in ("sync", "nosync") if i % 2 == 0 else ("nosync", "sync"):
            out, result = _fresh(WORK / f"ddp-{mode}"), WORK / f"ddp-{mode}.json"
            command = _launch(2, [str(script), mode, str(WORK / "store-1x1"), str(out), str(DDP_STEPS), str(result)])
            run = timed_run(f"ddp {mode} round {i + 1}", command, threads=1)
            rounds[mode].append({**json.loads(result.read_text()), **{k: run[k] for k in ("wall_s", "other_cores")}})
    sync = statistics.median(s for r in rounds["sync"] for s in r["steps_s"])
    nosync = statistics.median(s for r in rounds["nosync"] for s in r["steps_s"])
    alone = statistics.median(r["allreduce_s"] for r in rounds["sync"] + rounds["nosync"])
    return {"rounds": rounds, "sync_step_s": sync, "nosync_step_s": nosync, "share": (sync - nosync) / sync,
            "allreduce_s": alone, "allreduce_share": alone / sync, "param_bytes": rounds["sync"][0]["param_bytes"],
            "threads": rounds["sync"][0]["threads"]}  # fmt: skip


# -- RESULTS.md ----------------------------------------------------------------------------------------

JOBS = {
    "index": f"X1. `index build`, {INDEX_TOKENS:,} tokens, every MLP neuron (46,080 units)",
    "harvest": f"X2. `harvest {SITE}`, {SHARDS * SHARD_CONTEXTS * 124:,} tokens ({SHARDS} shards)",
    "train": f"X3. `train-dict` from the store, 576 -> 4,608 latents, k = 32, {TRAIN_STEPS} steps of {BATCH:,} tokens",
}


def _job_rows(r: dict) -> list[str]:
    lines = ["| job | 1×1 s | 1×2 s | 2×1 s | speed-up of 2×1 over 1×2 | efficiency 1×2 | efficiency 2×1 |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for job, label in JOBS.items():
        for suffix, extra_env in VARIANTS[job].items() if job in r else ():
            t = {config: r[job]["runs"][config + suffix.replace(" ", "-")]["wall_s"] for config in CONFIGS}
            eff = {config: t["1x1"] / (2 * t[config]) for config in ("1x2", "2x1")}
            name = label if not extra_env else f"{label.split('.')[0]}′. the same, {_env(extra_env)}"
            lines.append(f"| {name} | {t['1x1']:.1f} | {t['1x2']:.1f} | {t['2x1']:.1f} | {t['1x2'] / t['2x1']:.2f}× | "
                         f"{eff['1x2']:.0%} | {eff['2x1']:.0%} |")  # fmt: skip
    return lines


def _env(extra_env: dict) -> str:
    return " ".join(f"`{k}={v}`" for k, v in extra_env.items())


def _inner(job: str, run: dict) -> str:
    if job == "index":
        rest = run["wall_s"] - run["reported_s"]
        build = f"build {run['reported_s']:.1f} s ({INDEX_TOKENS / run['reported_s']:,.0f} tokens/s)"
        ranks = (
            f"; rank 0: its share {run['share_s']:.1f} s, waiting {run['wait_s']:.1f} s, merge {run['merge_s']:.1f} s"
            if "merge_s" in run
            else ""
        )
        return f"{build}; the rest (start-up, load) {rest:.1f} s{ranks}"
    if job == "harvest":
        per_s = f"{run['tokens']:,} tokens, {run['tokens'] / run['wall_s']:,.0f} tokens/s of wall time"
        return f"{per_s}; the same command on the finished store {run['again_s']:.1f} s"
    loop = f"loop {run['loop_s']:.1f} s ({run['steps'] / run['loop_s']:.2f} steps/s)"
    return f"{loop}; held-out FVU {run['eval_fvu']:.4f}, L0 {run['eval_l0']:.1f}"


def _check(job: str, c: dict) -> str:
    if job == "index":
        moved = f"{c['examples_moved']} examples differ, max |Δvalue| {c['max_value_diff']:.1e}"
        return f"{c['units']:,} units, {c['top_rows']:,} top rows; {moved}"
    if job == "harvest":
        return ("manifest equal" if c["same_manifest"] else "manifest DIFFERS") + (
            ", shards bit-equal" if c["bit_equal"] else f", max |Δ| {c['max_abs_diff']:.1e}")  # fmt: skip
    return (f"held-out FVU at step {EVAL_EVERY} {c['first_fvu']:.5f} (rel. Δ {c['first_rel_diff']:.0e}), at the end "
            f"{c['last_fvu']:.4f} (rel. Δ {c['last_rel_diff']:.1%})")  # fmt: skip


def _detail_rows(r: dict) -> list[str]:
    lines = ["| job | run | wall s | what the command reports | cores busy (CPU s / wall s) | others' cores | "
             "load at start | against 1×1 |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for job in JOBS:
        for name, run in r.get(job, {}).get("runs", {}).items():
            lines.append(f"| {job} | {name.replace('x', '×')} | {run['wall_s']:.1f} | {_inner(job, run)} | "
                         f"{run['cpu_s'] / run['wall_s']:.2f} | {run['other_cores']:.2f} | {run['load_at_start']} | "
                         f"{_check(job, r[job]['check'][name])} |")  # fmt: skip
    return lines


def _ddp_lines(d: dict) -> list[str]:
    mb = d["param_bytes"] / 1e6
    return [
        f"### X4. Communication share of a DDP training step (2 processes × 1 thread, gloo, {BATCH:,} tokens a step)", "",
        "| | seconds |", "|---|---|",
        f"| step, as trained (DDP all-reduces the gradients) | {d['sync_step_s']:.3f} |",
        f"| the same step with the gradient all-reduce off (`require_backward_grad_sync = False`) | {d['nosync_step_s']:.3f} |",
        f"| **communication share of the step** (difference / step) | **{d['share']:.0%}** |",
        f"| all-reduce of the {mb:.1f} MB of parameters alone, same processes | {d['allreduce_s']:.3f} "
        f"({d['allreduce_share']:.0%} of a step; {mb / d['allreduce_s']:,.0f} MB/s: bytes / time) |",
        "",
        f"Method: the trainer itself (`train_dictionary` from the store, no model: X3's dictionary, {DDP_STEPS} steps per "
        f"run, {DDP_ROUNDS} runs of each kind, alternated) under `torchrun --nproc-per-node 2`, "
        f"{d['threads']} thread per process. Step times are the differences of the trainer's own per-step clock "
        "(`seconds` in metrics.jsonl), the first three steps left out; medians over every step of the runs. "
        "With the all-reduce off, everything else in the step stays: forward, backward, Adam, the decoder "
        "renormalisation, the all-reduce of which latents fired (4,608 integers) and DDP's broadcast of its "
        "two small buffers. The difference is the all-reduce's *exposed* cost, what overlapping it with the "
        "backward did not hide.",
    ]  # fmt: skip


def render(r: dict, stamp: str) -> str:
    parts = "; ".join(f"{part} {r[part]['measured']}" for part in ("index", "harvest", "train", "ddp") if part in r)
    lines = [MARK_BEGIN, "## Scaling out with torchrun (issue 14)", "", f"Written {stamp}; {_machine()}. Parts measured: "
             f"{parts}.", ""]  # fmt: skip
    lines += _job_rows(r)
    lines += ["", "Wall time of the whole command, start-up and model loading included, one run each. Efficiency: "
              "the 1×1 time over 2 × the time (2 cores); speed-up: the 1×2 time over the 2×1 time. Threads are set by "
              "OMP_NUM_THREADS (torch follows it); the 1-process runs are plain `mechscope ...`, the 2-process runs "
              "`torchrun --standalone --nproc-per-node 2 --no-python mechscope ...`. Below, *cores busy* is the CPU "
              "time of the command and all its processes over its wall time; *others' cores* what the rest of the "
              "machine used meanwhile (the check that a run was not disturbed); the load average at a run's start "
              "includes this script's previous run.", ""]  # fmt: skip
    lines += _detail_rows(r) + [""]
    if "ddp" in r:
        lines += _ddp_lines(r["ddp"]) + [""]
    lines += ["### What it means", "", _meaning(r), "", MARK_END]
    return "\n".join(lines) + "\n"


def _meaning(r: dict) -> str:
    """The paragraph under the tables, its figures from `r`."""
    if not all(part in r for part in ("index", "harvest", "train", "ddp")):
        return "(Run every part, `bench/scaling.py` without `--only`, for this paragraph.)"
    t = {job: {name: run["wall_s"] for name, run in r[job]["runs"].items()} for job in JOBS}
    ix = r["index"]["runs"]["2x1"]
    h, x, d = r["harvest"]["runs"], t["index"], r["ddp"]
    return (
        "This machine has two cores, so no run here gets more hardware than another: 1×2 and 2×1 are two ways of "
        f"spending the same two cores. For the harvest they come out even (1×2 {t['harvest']['1x2']:.1f} s, 2×1 "
        f"{t['harvest']['2x1']:.1f} s, both about {t['harvest']['1x1'] / t['harvest']['2x1']:.1f}× one thread): "
        "its forward passes split well between two threads, and a second process adds only its own start-up "
        f"(the command on a finished store: {h['2x1']['again_s']:.1f} s against {h['1x2']['again_s']:.1f} s). For "
        f"training, 1×2 wins ({t['train']['1x2']:.1f} s against {t['train']['2x1']:.1f} s): every 2-process step "
        f"all-reduces {d['param_bytes'] / 1e6:.0f} MB of gradients, {d['share']:.0%} of the step. The bare all-reduce "
        f"of those bytes takes {d['allreduce_share']:.0%} of a step; the rest is DDP's own work around it (copies into "
        "buckets, the search for unused parameters) and its threads competing with the compute for two cores, not "
        "told apart here. The index build splits its forward passes between processes as well as between threads "
        f"(2×1 {x['2x1']:.0f} s, 1×2 {x['1x2']:.0f} s, 1×1 {x['1x1']:.0f} s), but rank 0 then merges the shards' top "
        f"examples and samples of 46,080 units ({ix['merge_s']:.0f} s after its own share's {ix['share_s']:.0f} s): "
        f"serial work one process never does, and at {INDEX_TOKENS:,} tokens it takes back most of what the second "
        "process saved; it grows with the units, not the tokens, so longer builds gain more. Before numba's thread "
        "pool was sized to torch's threads (commit c8b44ec and earlier), each torchrun process kept a second, "
        "spinning thread, and 2×1 took 5.8× as long as one process (230 s against 40 s). "
        "On a machine with more cores, or several machines, torchrun's processes do add hardware; what carries over "
        "from here is the 2×1 efficiency (how close two processes come to twice one process's speed, "
        f"{t['harvest']['1x1'] / (2 * t['harvest']['2x1']):.0%} for the harvest, "
        f"{t['train']['1x1'] / (2 * t['train']['2x1']):.0%} for training) and the all-reduce's share of a step, "
        "which falls as each process's share of the batch grows."
    )


def _machine() -> str:
    info = common.machine_info()
    return f"{info['CPU']}, {info['cores (os.cpu_count)']} cores, {info['memory']}, torch {info['torch']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parts = ["index", "harvest", "train", "ddp"]
    parser.add_argument("--only", choices=parts, action="append", help="run only these parts")
    only = parser.parse_args().only or parts
    load_start, t0 = common.load_average(), time.perf_counter()
    results = json.loads(SAVED.read_text()) if SAVED.exists() else {}
    for part in [p for p in parts if p in only]:  # harvest before train and ddp: they read its store
        measured = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (load {common.load_average()})"
        results[part] = {**(run_ddp() if part == "ddp" else run_job(part)), "measured": measured}
        SAVED.write_text(json.dumps(results, indent=1))
    import dict_quality

    stamp = dict_quality._stamp(load_start) + f", {time.perf_counter() - t0:.0f} s"
    section = render(results, stamp)
    common.write_section(section, MARK_BEGIN, MARK_END, "scaling")
    print(section)


if __name__ == "__main__":
    main()
