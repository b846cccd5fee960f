"""Dictionary figures: harvest throughput (H1) and SAE training speed side by side with the peers (S1-S3).

H1. `mechscope harvest` of `blocks.15.hook_resid_post` over contexts of the built-in corpus, against plain
    HF forwards of the same contexts in the same batches stopped after decoder layer 15 (the first 16
    layers run, no final norm, no unembedding). Both in float32 and in bfloat16 (the model's dtype).
S1. Training tokens/s of a TopK SAE 576 -> 9,216 latents, k = 64, batch 4,096 tokens, on the same in-memory
    activations and the same batches in the same order (`sae_speed.py`), one fresh process per tool:
    mechscope in its venv, SAELens and sparsify in the peers' venv (`make bench-peers` makes it). Each
    tool's held-out FVU after the same tokens comes with it.
S2. Achieved FLOP/s as a fraction of this machine's matmul peak, measured in the same run.
S3. Peak RSS of each trainer's process.

The activations are harvested once into bench/out/sae-store (the bfloat16 model; resumed on a rerun):
the first STEPS x 4,096 rows train, the next EVAL_ROWS (later contexts, never trained on) measure FVU.
`render` writes this part of RESULTS.md between MARK_BEGIN and MARK_END (`bench/run.py --only sae`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import log

SITE = "blocks.15.hook_resid_post"
LAYER = 15
STEPS, BATCH, EVAL_ROWS = 100, 4096, 16_384
D_IN, D_SAE, K = 576, 9216, 64
HARVEST_CONTEXTS = 256  # H1: 8 batches of 32 contexts of 128 tokens
TOOLS = ("mechscope", "saelens", "sparsify")
TARGETS = {"saelens": 4.0, "sparsify": 1.5}
MARK_BEGIN = "<!-- sae section: begin (regenerated alone by `bench/run.py --only sae`) -->"
MARK_END = "<!-- sae section: end -->"
PEERS_PY = common.BENCH_DIR / "peers" / ".venv" / "bin" / "python"


def step_flops(batch: int = BATCH) -> float:
    """Useful FLOPs of one TopK training step, the same count for every tool: the dense encoder product
    (2·B·d·F) plus the k-sparse products (decoder forward, decoder weight and input gradients, the
    encoder's weight gradient: 4 x 2·B·k·d)."""
    return 2 * batch * D_IN * D_SAE + 8 * batch * K * D_IN


# -- H1 ----------------------------------------------------------------------------------------------


def _plain_prefix(model, contexts) -> None:
    """A plain HF forward of `contexts` through decoder layers 0..LAYER only, in the harvest's batches."""
    import torch

    inner = model.hf.model
    layers = inner.layers
    inner.layers = layers[: LAYER + 1]
    try:
        with torch.inference_mode():
            for batch in contexts.split(32):
                inner(input_ids=batch, use_cache=False)
    finally:
        inner.layers = layers


def harvest_throughput(dtype: str) -> dict:
    """H1 for one model dtype: median seconds of 3 interleaved rounds of harvest vs plain prefix forwards."""
    import mechscope
    from mechscope.activations import HarvestSettings, ModelSource, StreamSpec, harvest
    from mechscope.data import corpus, held_out

    model = mechscope.load(dtype=dtype)
    spec = StreamSpec((SITE,), "builtin", chunk_contexts=HARVEST_CONTEXTS)
    source = ModelSource(model, spec, held_out(corpus("builtin"))[0])
    _, contexts = next(source.contexts(0))
    ours, plain = [], []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            settings = HarvestSettings(tokens=1, dtype="float32", shard_contexts=HARVEST_CONTEXTS)
            common.wait_quiet("harvest")
            start = time.perf_counter()
            manifest = harvest(model, spec, Path(tmp) / "store", settings, progress=False)
            ours.append(time.perf_counter() - start)
        common.wait_quiet("plain forward")
        start = time.perf_counter()
        _plain_prefix(model, contexts)
        plain.append(time.perf_counter() - start)
    tokens = manifest["tokens"]
    return {"dtype": dtype, "contexts": len(contexts), "tokens_stored": tokens, "ours": ours, "plain": plain,
            "ratio": common.median(plain) / common.median(ours)}  # fmt: skip


# -- S1-S3 -------------------------------------------------------------------------------------------


def activations(folder: Path) -> Path:
    """bench/out/sae-acts.safetensors: "train" [STEPS·BATCH, 576] and "eval" [EVAL_ROWS, 576] float32 rows of
    the store in `folder` (harvested here with the bfloat16 model if missing or short)."""
    import torch
    from safetensors.torch import save_file

    import mechscope
    from mechscope.activations import HarvestSettings, StoreSource, StreamSpec, harvest

    out = common.BENCH_DIR / "out" / "sae-acts.safetensors"
    need = STEPS * BATCH + EVAL_ROWS
    if out.exists():
        return out
    log(f"harvesting {need:,} rows of {SITE} into {folder} (bfloat16 model; resumed if there)")
    model = mechscope.load(dtype="bfloat16")
    harvest(model, StreamSpec((SITE,), "builtin:all"), folder, HarvestSettings(tokens=need, dtype="float32"))
    del model
    store, rows = StoreSource(folder), []
    for path in store.shards:  # in corpus order: the held-out rows come from contexts after the training ones
        rows.append(store._read(path)[:, 0])
        if sum(len(r) for r in rows) >= need:
            break
    rows = torch.cat(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"train": rows[: STEPS * BATCH].contiguous(), "eval": rows[STEPS * BATCH : need].contiguous()}, str(out))
    return out


def _child(python: Path, tool: str, acts: Path, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "out.json"
        common.wait_quiet(tool)
        cmd = [str(python), str(common.BENCH_DIR / "sae_speed.py"), tool, str(acts), str(steps), str(result)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return {"tool": tool, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        return json.loads(result.read_text())


def run(steps: int = STEPS) -> dict:
    store = common.BENCH_DIR / "out" / "sae-store"
    res: dict = {"harvest": [], "train": {}, "steps": steps}
    for dtype in ("float32", "bfloat16"):
        log(f"H1: harvest vs plain prefix forwards, {dtype} model")
        res["harvest"].append(harvest_throughput(dtype))
    acts = activations(store)
    res["peak"] = _child(Path(sys.executable), "peak", acts, 0)
    for tool in TOOLS:
        python = Path(sys.executable) if tool == "mechscope" else PEERS_PY
        if not python.exists():
            res["train"][tool] = {"tool": tool, "error": "the peers' venv is missing: run `make bench-peers` once"}
            continue
        log(f"S1: {tool}, {steps} steps of {BATCH} tokens")
        res["train"][tool] = _child(python, tool, acts, steps)
    return res


def render(res: dict, stamp: str) -> str:
    lines = [MARK_BEGIN, "", "## Sparse dictionaries: harvest and training speed", "", f"Measured {stamp}.", ""]
    lines += ["| figure | mechscope | baseline | ratio | target | met? |", "|---|---|---|---|---|---|"]
    for h in res["harvest"]:
        ours, plain = common.median(h["ours"]), common.median(h["plain"])
        n = h["contexts"] * 128
        lines.append(
            f"| H1. harvest {SITE}, {h['contexts']} contexts ({n:,} tokens run, {h['tokens_stored']:,} stored), "
            f"{h['dtype']} model | {n / ours:,.0f} tokens/s ({ours:.2f} s) | {n / plain:,.0f} tokens/s ({plain:.2f} s, "
            f"plain HF forward through layer {LAYER}) | {h['ratio']:.3f}× | ≥ 0.9× | {_yes(h['ratio'] >= 0.9)} |"
        )
    train, peak = res["train"], res["peak"]
    ours = train.get("mechscope", {})
    for tool in ("saelens", "sparsify"):
        peer = train.get(tool, {})
        if "error" in ours or "error" in peer:
            why = peer.get("error") or ours.get("error")
            lines.append(f"| S1. training vs {tool} | — | — | — | ≥ {TARGETS[tool]}× | not measured: {why} |")
            continue
        ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
        fvu_ok = ours["eval_fvu"] <= peer["eval_fvu"] * 1.001
        lines.append(
            f"| S1. TopK 576→9,216, k=64, batch 4,096: tokens/s vs {tool} (held-out FVU after {res['steps'] * BATCH:,} tokens) "
            f"| {ours['tokens_per_s']:,.0f} (FVU {ours['eval_fvu']:.3f}) "
            f"| {peer['tokens_per_s']:,.0f} (FVU {peer['eval_fvu']:.3f}) "
            f"| {ratio:.2f}× | ≥ {TARGETS[tool]}× at equal or better FVU | {_yes(ratio >= TARGETS[tool] and fvu_ok)} |"
        )
    if "error" not in ours and "error" not in peak:
        achieved = step_flops() / ours["step_s"]
        for name in ("float32", "bfloat16"):
            lines.append(
                f"| S2. achieved FLOP/s vs the {name} matmul peak | {achieved / 1e9:,.0f} GFLOP/s | "
                f"{peak[f'{name}_flops'] / 1e9:,.0f} GFLOP/s | {achieved / peak[f'{name}_flops']:.2f} | — | — |"
            )
    rss = {t: r["peak_rss"] for t, r in train.items() if "peak_rss" in r}
    if rss:
        cells = ", ".join(f"{t} {v / 2**20:,.0f} MiB" for t, v in rss.items())
        lines.append(f"| S3. peak RSS of the training process | {cells} | — | — | — | — |")
    lines += [
        "",
        f"- H1 runs the same {HARVEST_CONTEXTS} contexts of the built-in documentation both ways, in batches of 32; "
        "the harvest also skips the first 4 positions of each context, converts and writes the shard and the manifest. "
        "Medians of 3 interleaved rounds each.",
        f"- S1 activations: {SITE} of the bfloat16 model over `builtin:all`, stored float32; {res['steps'] * BATCH:,} training "
        f"rows and {EVAL_ROWS:,} held-out rows from later contexts. Every tool sees the same batches in the same order "
        "and keeps its own defaults (initialisation, optimiser, learning rate, auxiliary loss); tokens/s is the median "
        "step after 3 warm-up steps. FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over the held-out rows, each SAE run by its own code.",
        f"- S2 counts {step_flops() / 1e9:.1f} GFLOP per step for every tool: the dense encoder product and four "
        "k-sparse products. mechscope selects the active latents in bfloat16 and recomputes their values exactly in "
        "float32, so both peaks are shown.",
        "",
        "```json",
        json.dumps({t: {k: v for k, v in r.items() if k not in ("torch",)} for t, r in train.items()}, indent=1),
        "```",
        MARK_END,
        "",
    ]
    return "\n".join(lines)


def _yes(ok: bool) -> str:
    return "**yes**" if ok else "**NO**"


def splice(text: str, section: str) -> str:
    """`text` with its sae section replaced by `section` (appended when there is none)."""
    return common.splice_section(text, section, MARK_BEGIN, MARK_END)
