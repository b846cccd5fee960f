"""Peers measured side by side with mechscope: `make bench-peers` (or `.venv/bin/python bench/peers/run.py`).

Runs from mechscope's venv and drives a second venv, `bench/peers/.venv`, which it makes and fills first
(install.py; or set PEERS_PYTHON to a ready one), holding TransformerLens, nnsight, SAELens and sparsify with
their own torch and transformers.
Every figure is a ratio to plain HF on the same tokens, measured in the same run and in the same venv as the
tool (each venv has its own baseline), and the peers' values are checked against mechscope's first.

Phases, each in fresh processes, one at a time (the machine has 2 cores):
  1. ours.py (mechscope's venv): shared inputs, mechscope's reference values, mechscope's timings
  2. bench/child.py (mechscope's venv): load time and peak RSS, mechscope and plain HF
  3. inprocess.py (peers' venv): agreement with mechscope, then the peers' timings
  4. peer_child.py and bench/child.py (peers' venv): load time and peak RSS, peers and plain HF
  5. sae.py (peers' venv): SAE training throughput of SAELens and sparsify

A phase that fails is recorded with its error, and the others still run. The results replace the peers
section of bench/RESULTS.md (between its two HTML-comment markers); the raw figures go to bench/out/peers.json.
`--only inprocess` reruns phases 1 and 3 (figures 1-3, the agreement checks) and keeps the rest from that
file; `--only render` only rewrites the section from it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import install  # noqa: E402
import render  # noqa: E402
import tools  # noqa: E402
from common import log  # noqa: E402

RESULTS = common.BENCH_DIR / "RESULTS.md"
RAW = common.BENCH_DIR / "out" / "peers.json"
LOAD_REPEATS = 1 if tools.QUICK else 3  # fresh processes per load variant
OURS_RSS = ["hf_forward", "ms_resid30", "ms_all", "hf_all", "hf_lens", "ms_lens"]
PEER_RSS = {"hooked": ["resid30", "sites", "everything", "lens"], "bridge": ["resid30", "sites", "everything", "lens"]}
PEER_RSS["nnsight"] = ["resid30", "sites", "lens"]
SAE_MODES = ["saelens_train", "saelens_e2e", "sparsify_e2e"]
OURS_PACKAGES = ["torch", "transformers", "mechscope"]
PEER_PACKAGES = ["torch", "transformers", "transformer-lens", "nnsight", "sae-lens", "eai-sparsify"]
# Offline: nothing may reach a model hub, and no experiment tracker may start.
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class PhaseError(RuntimeError):
    """A measurement process that failed; its message ends with the process's last stderr lines."""


def fresh(python: str, script: Path, *args: str, timeout: float = 900) -> dict:
    """Run one script in a fresh interpreter; its JSON line, plus the wall time and other processes' load.

    The child's progress lines (its stderr) pass through as they come; the last few explain a failure.
    """
    before = common.cpu_snapshot()
    t = time.perf_counter()
    what = f"{script.name} {args[0]}" if args else script.name
    try:
        proc = subprocess.Popen(
            [python, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=common.REPO, env=ENV
        )
    except OSError as err:
        raise PhaseError(f"{what}: {err}") from err
    tail: collections.deque[str] = collections.deque(maxlen=4)
    reader = threading.Thread(target=_relay, args=(proc.stderr, tail), daemon=True)
    reader.start()
    try:
        stdout = proc.stdout.read()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        proc.kill()
        raise PhaseError(f"{what}: no result after {timeout:.0f} s") from err
    reader.join()
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not stdout.strip():
        raise PhaseError(f"{what} exited {proc.returncode}: {' | '.join(tail)}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    result["background_cores"] = common.other_cores(before, common.cpu_snapshot())
    return result


def _relay(stream, tail) -> None:
    """Copy a child's progress lines to our stderr (only ours, `[bench ...]`), keeping the last lines of all."""
    for line in stream:
        tail.append(line.strip())
        if line.startswith("[bench"):
            sys.stderr.write("    " + line)


def versions(python: str, packages: list[str]) -> dict:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(p):\n"
        "    try: return m.version(p)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({'python': sys.version.split()[0], **{p: v(p) for p in sys.argv[1:]}}))"
    )
    proc = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        raise PhaseError(f"{python}: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout)


def summarise_loads(runs: list[dict]) -> dict:
    """Medians over the runs no other process disturbed, when there are enough of them (else over all, noisy)."""
    clean = [r for r in runs if r["background_cores"] < common.CLEAN_CORES]
    noisy = len(clean) < LOAD_REPEATS
    use = runs if noisy else clean
    out = {key: common.median([r[key] for r in use]) for key in ("import_s", "load_s", "process_wall_s")}
    out["import_load_s"] = common.median([r["import_s"] + r["load_s"] for r in use])
    out.update(n=len(runs), n_clean=len(clean), noisy=noisy, background_max=max(r["background_cores"] for r in runs))
    return out


def loads(variants: dict[str, tuple[str, Path, str]], folder: str, ids_file: str) -> dict:
    """LOAD_REPEATS+ fresh processes per variant (name -> (python, script, op)), interleaved A,B,C then C,B,A."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    start = time.perf_counter()
    for i in range(3 * LOAD_REPEATS):
        n_clean = min(sum(r["background_cores"] < common.CLEAN_CORES for r in rs) for rs in runs.values())
        if i >= LOAD_REPEATS and (n_clean >= LOAD_REPEATS or time.perf_counter() - start > 60 * len(names)):
            break
        common.wait_quiet(f"load round {i + 1}")
        for name in names if i % 2 == 0 else names[::-1]:
            python, script, op = variants[name]
            runs[name].append(fresh(python, script, op, folder, ids_file))
    return {name: summarise_loads(rs) for name, rs in runs.items()}


def phase(results: dict, name: str, fn) -> None:
    """Run one phase into results[name]; a failure is kept as its message."""
    log(f"phase: {name}")
    try:
        results[name] = fn()
    except PhaseError as err:
        log(f"phase {name} failed: {err}")
        results["errors"][name] = str(err)


def run_all(res: dict, peers_py: str, tmp: Path) -> dict:
    child, ids_file = common.BENCH_DIR / "child.py", str(tmp / "ids.pt")
    res.update(errors={}, load_avg_start=common.load_average(), machine=common.machine_info())
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    phase(res, "versions_ours", lambda: versions(sys.executable, OURS_PACKAGES))
    phase(res, "versions_peers", lambda: versions(peers_py, PEER_PACKAGES))
    phase(res, "ours", lambda: fresh(sys.executable, HERE / "ours.py", str(tmp)))
    if "ours" not in res:
        return res  # without the inputs and reference values nothing else can run
    folder = res["ours"]["folder"]
    ours_py = sys.executable
    variants = {"load": (ours_py, child, "load"), "hf_load": (ours_py, child, "hf_load")}
    phase(res, "ours_loads", lambda: loads(variants, folder, ids_file))
    phase(res, "ours_rss", lambda: {op: fresh(ours_py, child, f"rss:{op}", folder, ids_file) for op in OURS_RSS})
    phase(res, "peers", lambda: fresh(peers_py, HERE / "inprocess.py", folder, str(tmp), timeout=1200))
    failed = set(res.get("peers", {}).get("errors", {}))
    live = [p for p in PEER_RSS if p not in failed]
    variants = {"hf_load": (peers_py, child, "hf_load")}
    variants.update({p: (peers_py, HERE / "peer_child.py", f"load:{p}") for p in live})
    phase(res, "peer_loads", lambda: loads(variants, folder, ids_file))

    def peer_rss() -> dict:
        out = {op: fresh(peers_py, child, f"rss:{op}", folder, ids_file) for op in ("hf_forward", "hf_all", "hf_lens")}
        for peer in live:
            for what in PEER_RSS[peer]:
                log(f"peak RSS: {peer} {what}")
                out[f"{peer}:{what}"] = fresh(peers_py, HERE / "peer_child.py", f"rss:{peer}:{what}", folder, ids_file)
        return out

    phase(res, "peer_rss", peer_rss)
    res["sae"] = {}
    for mode in SAE_MODES:
        try:
            res["sae"][mode] = fresh(peers_py, HERE / "sae.py", mode, folder, str(tmp))
        except PhaseError as err:
            log(f"SAE {mode} failed: {err}")
            res["sae"][mode] = {"error": str(err)}
    res["load_avg_end"] = common.load_average()
    return res


def rerun_inprocess(res: dict, peers_py: str, tmp: Path) -> None:
    """Only the in-process phases again (ours.py, inprocess.py), keeping load, RSS and SAE figures from `res`."""
    res.update(errors={}, load_avg_start=common.load_average(), machine=common.machine_info())
    res["date"] += f"; in-process figures (1–3) rerun {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    for key in ("ours", "peers"):
        res.pop(key, None)
    phase(res, "ours", lambda: fresh(sys.executable, HERE / "ours.py", str(tmp)))
    if "ours" in res:
        phase(res, "peers", lambda: fresh(peers_py, HERE / "inprocess.py", res["ours"]["folder"], str(tmp), timeout=1200))
    res["load_avg_end"] = common.load_average()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--only",
        choices=["inprocess", "render"],
        help="inprocess: rerun figures 1-3 only, keeping the others from bench/out/peers.json; "
        "render: rewrite the section from bench/out/peers.json",
    )
    only = parser.parse_args().only
    t0 = time.perf_counter()
    res: dict = json.loads(RAW.read_text()) if only else {}
    if only != "render":
        if os.environ.get("PEERS_PYTHON"):
            peers_py, res["install_errors"] = os.environ["PEERS_PYTHON"], {}
        else:
            peers_py, res["install_errors"] = install.ensure(log)
        for req, why in res["install_errors"].items():
            log(f"could not install {req}: {why}")
        with tempfile.TemporaryDirectory() as tmp:
            (rerun_inprocess if only else run_all)(res, peers_py, Path(tmp))
        res["rerun_wall_s" if only else "wall_s"] = time.perf_counter() - t0
        res["quiet_waited_s"] = common.quiet_waited_s()
    RAW.parent.mkdir(exist_ok=True)
    RAW.write_text(json.dumps(res, indent=1, default=str))
    section = render.render(res)
    if tools.QUICK:
        log(f"smoke run (PEERS_QUICK): RESULTS.md left alone; raw figures in {RAW}")
        print(section)
        return
    RESULTS.write_text(render.splice(RESULTS.read_text() if RESULTS.exists() else "", section))
    log(f"updated the peers section of {RESULTS.relative_to(common.REPO)} in {res['wall_s']:.0f} s; raw figures in {RAW}")
    print(section.split("\n### ", 1)[0].strip())


if __name__ == "__main__":
    main()
