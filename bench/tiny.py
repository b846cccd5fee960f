"""Tiny transformers with GELU, SoLU and TopK MLPs, trained from scratch: `.venv/bin/python bench/tiny.py`.

Y1. The three activations of `mechscope train-tiny` at its defaults (2 layers, d_model 256, d_mlp 1,024, a
    4,096-token BPE vocabulary, 128-token contexts, batches of 16 contexts, DEFAULT_TOKENS tokens of
    builtin:all), seed 0, the same tokens in the same order (solu and topk reuse the tokenizer gelu trained):
    parameters, tokens, training tokens per second, wall time (tokenizer and data included) and the final
    held-out loss.

Runs live in OUT/{gelu,solu,topk} (bench/out/tiny by default): a killed run resumes, a finished one is read
back. The section of RESULTS.md between MARK_BEGIN and MARK_END is rewritten at the end. Any override of the
defaults (`--tokens`, `--d-model`, ...) trains into bench/out/tiny-check and prints the section instead of
writing it, as a check that the script works.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log  # noqa: E402

ACTS = ("gelu", "solu", "topk")
MARK_BEGIN = "<!-- tiny section: begin (regenerated alone by `bench/tiny.py`) -->"
MARK_END = "<!-- tiny section: end -->"
OVERRIDES = ("tokens", "d_model", "layers", "vocab", "ctx_len", "batch", "corpus")


def train(out: Path, overrides: dict) -> dict:
    """Train (or read back) the three runs; act -> its figures."""
    from mechscope.toys.tiny_train import TinyTrainConfig, train_tiny

    walls_file = out / "wall_seconds.json"
    walls = json.loads(walls_file.read_text()) if walls_file.exists() else {}
    results = {}
    for act in ACTS:
        tokenizer = str(out / "gelu") if act != "gelu" else None
        cfg = TinyTrainConfig(act=act, tokenizer=tokenizer, **overrides)
        finished = (out / act / "train.json").exists()
        log(f"Y1: {act}" + (" (finished before: read back)" if finished else ""))
        start = time.perf_counter()
        run = train_tiny(cfg, out / act)
        if not finished:
            walls[act] = time.perf_counter() - start
            walls_file.write_text(json.dumps(walls))
        results[act] = {**run._asdict(), "folder": str(run.folder), "wall": walls.get(act), "cfg": cfg}
    return results


def render(results: dict, stamp: str, how: str = "at its defaults") -> str:
    cfg = results["gelu"]["cfg"]
    wall = lambda s: "?" if s is None else f"{s / 60:.1f} min"  # noqa: E731
    lines = [
        MARK_BEGIN,
        "## Tiny transformers: GELU, SoLU and TopK MLPs (issue 12)",
        "",
        stamp,
        "",
        f"Y1. `mechscope train-tiny --act ACT` {how}: {cfg.layers} layer{'s' * (cfg.layers > 1)}, d_model {cfg.d_model}, "
        f"d_mlp {cfg.d_mlp_or_default:,}, {cfg.n_heads} heads, a {cfg.vocab:,}-token BPE vocabulary, {cfg.ctx_len}-token "
        f"contexts, {cfg.batch} per step, {cfg.tokens:,} tokens requested of {cfg.corpus} (k = {cfg.k} for topk), seed "
        f"{cfg.seed}; the three read the same tokens in the same order. Held-out loss: nats per token on "
        f"{cfg.eval_contexts} contexts of the held-out documents (every 20th).",
        "",
        "| activation | parameters | tokens | tokens/s (training) | wall time | held-out loss |",
        "|---|---|---|---|---|---|",
    ]
    for act, r in results.items():
        row = f"| {act} | {r['params']:,} | {r['tokens']:,} | {r['tokens_per_second']:,.0f} | {wall(r['wall'])} "
        lines.append(row + f"| {r['held_out_loss']:.3f} |")
    lines += ["", "Wall time includes reading the corpus, the tokenizer (gelu trains it) and packing.", "", MARK_END]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in OVERRIDES:
        parser.add_argument(f"--{name.replace('_', '-')}", type=str if name == "corpus" else int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="Folder of the runs.")
    args = parser.parse_args()
    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    check = bool(overrides)
    out = args.out or common.BENCH_DIR / "out" / ("tiny-check" if check else "tiny")
    load_start = common.load_average()
    results = train(out, overrides)
    stamp = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average at start {load_start}"
    how = "with " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items()) if check else "at its defaults"
    section = render(results, stamp + ".", how)
    if check:
        print(section)
        log("overrides given: RESULTS.md left as it was")
    else:
        common.write_section(section, MARK_BEGIN, MARK_END, "tiny")


if __name__ == "__main__":
    main()
