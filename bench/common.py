"""Shared pieces of the benchmark: inputs, the hand-written HF baselines, timing and memory helpers.

Importing this module must stay cheap (no torch, no transformers at import time): `child.py` uses it
in fresh subprocesses whose import time and memory are being measured.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

BATCH, SEQ = 8, 128
LENS_PROMPT = "The reliability of Wikipedia is very"
LENS_TARGET = " questionable"
LENS_K = 5
N_LAYERS = 30  # SmolLM2-135M


def splice_section(text: str, section: str, begin: str, end: str) -> str:
    """`text` (RESULTS.md) with the part between the markers `begin` and `end` replaced by `section`, which
    starts with `begin` and ends with `end` (appended when `text` has no such part)."""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + section.rstrip("\n") + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + section


def write_section(section: str, begin: str, end: str, name: str) -> None:
    """Splice `section` (from `begin` to `end`) into bench/RESULTS.md, creating it if need be, and say so."""
    results = BENCH_DIR / "RESULTS.md"
    text = results.read_text() if results.exists() else ""
    results.write_text(splice_section(text, section, begin, end))
    log(f"updated the {name} section of {results.relative_to(REPO)}")


def log(msg: str) -> None:
    """Progress, to stderr, with the time since the benchmark started."""
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


_T0 = time.perf_counter()


# -- inputs -----------------------------------------------------------------------------------------


def docs_text() -> str:
    """CPython's own documentation topics, joined in a fixed order (real, deterministic English text)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def batch_ids(tokenizer, batch: int = BATCH, seq: int = SEQ):
    """[batch, seq] token ids: `batch` evenly spaced slices of the tokenised docs."""
    import torch

    ids = tokenizer(docs_text(), add_special_tokens=False).input_ids
    stride = (len(ids) - seq) // batch
    assert stride >= seq, f"only {len(ids)} tokens of docs text"
    return torch.tensor([ids[i * stride : i * stride + seq] for i in range(batch)], dtype=torch.long)


def resid_post_sites(n_layers: int = N_LAYERS) -> list[str]:
    return [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]


# -- the hand-written HF logit lens (baseline of figure 3) ------------------------------------------


def hand_lens(hf, tokenizer, text: str = LENS_PROMPT, target: str = LENS_TARGET, k: int = LENS_K) -> dict:
    """The logit lens written directly against HF: the same outputs `mechscope.logit_lens` returns.

    hidden_states[0..n-1] go through the final norm and the unembedding; HF's last hidden state is
    already normed, so it goes through the unembedding only.
    """
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    tid = tokenizer(target, add_special_tokens=False).input_ids[0]
    hidden = hf(ids, output_hidden_states=True, use_cache=False).hidden_states
    norm, lm_head = hf.model.norm, hf.lm_head
    resid = torch.stack([norm(h[0]) for h in hidden[:-1]] + [hidden[-1][0]])  # [row, pos, d_model]
    logprobs = lm_head(resid).float().log_softmax(-1)  # [row, pos, d_vocab]
    target_lp = logprobs[..., tid]
    ranks = (logprobs > target_lp[..., None]).sum(-1) + 1
    top = logprobs.topk(k, dim=-1)
    n_rows, n_pos = top.indices.shape[:2]
    flat = tokenizer.batch_decode(top.indices.reshape(-1, 1))
    top_tokens = [[flat[(r * n_pos + p) * k : (r * n_pos + p + 1) * k] for p in range(n_pos)] for r in range(n_rows)]
    return {
        "tokens": tokenizer.batch_decode(ids[0].reshape(-1, 1)),
        "probs": target_lp.exp(),
        "ranks": ranks,
        "top_ids": top.indices,
        "top_probs": top.values.exp(),
        "top_tokens": top_tokens,
    }


# -- timing and background load -------------------------------------------------------------------
#
# This machine has 2 cores and other processes (test runs) come and go on it. A second busy process makes
# torch's 2 OpenMP threads wait on each other and a forward pass 3-6x slower, so a median over a run
# where half the samples were contended is meaningless. Each timed call therefore also measures how many
# cores *other* processes used meanwhile (from /proc/stat minus this process's own CPU time); a call is
# "clean" when that stays under CLEAN_CORES. Rounds continue (within a budget) until every variant has
# enough clean calls, and the headline median is over clean calls only; where there are too few, it is
# over all calls and flagged as noisy. The same rule applies to baseline and candidate alike.

_HZ = os.sysconf("SC_CLK_TCK")
CLEAN_CORES = 0.15  # other processes' CPU use (in cores) under which a timed call counts as clean
_quiet_budget = {"left_s": 120.0, "waited_s": 0.0}


def cpu_snapshot() -> tuple[int, int, float]:
    """(all CPUs' jiffies, busy jiffies, CPU seconds used by this process and its finished children)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    t = os.times()
    return sum(vals), sum(vals) - vals[3] - vals[4], t.user + t.system + t.children_user + t.children_system


def other_cores(before: tuple[int, int, float], after: tuple[int, int, float]) -> float:
    """Cores kept busy by other processes between two snapshots (0 .. os.cpu_count())."""
    d_total = after[0] - before[0]
    if d_total <= 0:
        return 0.0
    d_other = (after[1] - before[1]) - (after[2] - before[2]) * _HZ
    return max(0.0, d_other / d_total * (os.cpu_count() or 1))


def wait_quiet(what: str, max_s: float = 20.0) -> float:
    """Wait (within a global budget) until other processes leave the CPUs alone; the seconds waited."""
    waited = 0.0
    while _quiet_budget["left_s"] - waited > 0:
        before = cpu_snapshot()
        time.sleep(0.5)
        busy = other_cores(before, cpu_snapshot())
        if busy < CLEAN_CORES:
            break
        if waited == 0:
            log(f"other processes use {busy:.1f} cores: waiting for a quieter machine before {what}")
        waited += 0.5
        if waited >= max_s:
            log(f"still busy ({busy:.1f} cores) after {waited:.0f} s: measuring anyway")
            break
    _quiet_budget["left_s"] -= waited
    _quiet_budget["waited_s"] += waited
    return waited


def quiet_waited_s() -> float:
    return _quiet_budget["waited_s"]


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds fn took, cores other processes used meanwhile)."""
    before = cpu_snapshot()
    t = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t
    return elapsed, other_cores(before, cpu_snapshot())


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    max_rounds: int | None = None,
    budget_s: float = float("inf"),
    settle: bool = False,
) -> dict[str, dict]:
    """Time each function, alternating A,B,C then C,B,A, ... to spread drift evenly.

    At least `repeats` rounds; then more (up to `max_rounds`, while within `budget_s`) until every
    function has `repeats` clean calls. With `settle`, each round first waits briefly for a quiet machine.
    Returns, per function, `summarise`'s dict.
    """
    names = list(fns)
    max_rounds = max_rounds or 2 * repeats
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    start = time.perf_counter()
    for i in range(max_rounds):
        n_clean = min(sum(bg < CLEAN_CORES for _, bg in samples[name]) for name in names)
        if i >= repeats and (n_clean >= repeats or time.perf_counter() - start > budget_s):
            break
        if i == repeats:
            log(f"only {n_clean} clean calls of {i} (other processes were busy): timing more rounds")
        if settle:
            wait_quiet(f"round {i + 1}")
        for name in names if i % 2 == 0 else names[::-1]:
            samples[name].append(timed(fns[name]))
    return {name: summarise(samples[name], repeats) for name in names}


def summarise(samples: list[tuple[float, float]], want: int) -> dict:
    """Median over clean calls when there are `want` of them, else over all calls (flagged noisy)."""
    times = [t for t, _ in samples]
    clean = [t for t, bg in samples if bg < CLEAN_CORES]
    noisy = len(clean) < want
    use = times if noisy else clean
    return {
        "median": statistics.median(use),
        "min": min(times),
        "max": max(use),
        "median_all": statistics.median(times),
        "n": len(times),
        "n_clean": len(clean),
        "noisy": noisy,
        "background_max": max(bg for _, bg in samples),
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# -- memory -----------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux).

    Careful in a child process: Linux carries the parent's peak across fork + exec into ru_maxrss, so a
    child of a big parent reports at least the parent's size. `hwm_bytes` (VmHWM) belongs to the new
    process image only.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def hwm_bytes() -> int:
    """VmHWM: the resident high-water mark since the last `reset_hwm`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> bool:
    """Reset the resident high-water mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tensor_bytes(tensors) -> int:
    """Bytes held by the storages behind `tensors`, each shared storage counted once."""
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


# -- machine ----------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return f"{kib / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mechscope"], cwd=REPO, capture_output=True, text=True)
        return head.stdout.strip() + (" (mechscope/ has uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict[str, str]:
    import torch
    import transformers

    return {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "CPU": _cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "memory": _mem_total(),
        "OS": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch threads (intra / inter-op)": f"{torch.get_num_threads()} / {torch.get_num_interop_threads()}",
        "mechscope commit": _git(),
    }


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"
