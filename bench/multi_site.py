"""Dictionaries over several sites on SmolLM2: `.venv/bin/python bench/multi_site.py [--store DIR] [--only quality|speed]`.

Every quality run is a `mechscope train-dict` command on one activation store of layers 12-17 (harvested by
HARVEST if --store is not given: each layer's `hook_resid_mid` and `hook_mlp_out`, the residual streams
of 13-17 and layer 15's normed MLP input), followed by `mechscope eval-dict --json` on held-out documents
(every 20th document of `builtin:all`, which no training run reads) with the float32 model.

  K1. A transcoder of layer 15's MLP (normed input -> hook_mlp_out), TopK, 9,216 latents, k = 64: FVU of the
      MLP output, CE recovered and KL with the MLP replaced; the same with a skip connection.
  K2. An acausal crosscoder over the residual streams of layers 13-17, TopK, 23,040 latents, k = 64:
      per-layer FVU, spliced CE recovered, the histogram of how many layers carry a feature (and its plot);
      beside five SAEs, one per layer, of 4,608 latents and k = 13 each (the same total latents, L0 65).
  K3. A cross-layer transcoder over layers 12-17, TopK, 4,608 latents and k = 32 per layer: the replacement
      model's CE recovered and KL (all six MLPs replaced at once, layer by layer), per-layer FVU.

Speed (V1, V2) is measured on in-memory activations (a slice of the same store), every trainer in this one
process, each for STEPS steps of 4,096 tokens, seconds per step the median after three warm-up steps:

  V1. the crosscoder of K2 against the five SAEs of K2 trained one after another on the same tokens;
  V2. the CLT of K3 against six per-layer transcoders (resid_mid -> mlp_out, 4,608 latents, k = 32 each);

with the achieved FLOP/s as a fraction of this machine's matmul peak, measured in the same run. Useful
FLOPs per step: the dense encoder product (2·B·(inputs a latent reads)·F) and the sparse products of the
active latents (decoder forward, its weight and input gradients, the encoder's weight gradient), counted
over the sites each latent actually writes (a CLT latent of layer l writes layers l..17 only).

Each quality run lives in RUNS/NAME (resumed if killed; skipped when its evaluation exists). The section of
RESULTS.md between MARK_BEGIN and MARK_END is rewritten at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import dict_quality  # noqa: E402
from common import log  # noqa: E402

RUNS = common.BENCH_DIR / "out" / "multi_site"
FIGURES = common.BENCH_DIR / "figures"
CROSS_LAYERS, CLT_LAYERS = list(range(13, 18)), list(range(12, 18))
SITES = (
    ["blocks.15.ln2.hook_normalized"]
    + [f"blocks.{n}.hook_resid_post" for n in CROSS_LAYERS]
    + [f"blocks.{n}.{hook}" for n in CLT_LAYERS for hook in ("hook_resid_mid", "hook_mlp_out")]
)
HARVEST = (
    f"mechscope harvest {' '.join(SITES)} --out STORE --tokens 1000000 --dtype bfloat16 --corpus builtin:all "
    "--model-dtype bfloat16"
)
TOKENS = "1000000"
MARK_BEGIN = "<!-- multi-site section: begin (regenerated alone by `bench/multi_site.py`) -->"
MARK_END = "<!-- multi-site section: end -->"
BATCH, STEPS = 4096, 12
LR_PILOT = ("0.00337", "0.0015")
"""K2b: the crosscoder's default learning rate at 23,040 latents, and that over sqrt(5) (its encoder reads five sites)."""


def _layers(kind: str, layers: list[int]) -> list[str]:
    return ["--kind", kind, *[arg for n in layers for arg in ("--layers", str(n))]]


def quality(store: Path) -> dict:
    common_args = ["--tokens", TOKENS, "--activation", "topk", "--no-png"]
    tc = ["--d-sae", "9216", "--k", "64", *common_args]
    runs = {
        "k1-transcoder": dict_quality.train_and_eval("k1-transcoder", tc, store, _layers("transcoder", [15]), runs=RUNS),
        "k1-skip-transcoder": dict_quality.train_and_eval(
            "k1-skip-transcoder", [*tc, "--skip-connection"], store, _layers("transcoder", [15]), runs=RUNS
        ),
    }
    profile = ["--profile-png", str(RUNS / "k2-crosscoder" / "profile.png")]
    runs["k2-crosscoder"] = dict_quality.train_and_eval(
        "k2-crosscoder", ["--d-sae", "23040", "--k", "64", *common_args], store, _layers("crosscoder", CROSS_LAYERS),
        eval_args=profile, runs=RUNS,
    )  # fmt: skip
    for n in CROSS_LAYERS:
        runs[f"k2-sae-l{n}"] = dict_quality.train_and_eval(
            f"k2-sae-l{n}", ["--d-sae", "4608", "--k", "13", *common_args], store, _layers("sae", [n]), runs=RUNS
        )
    for lr in LR_PILOT:  # the crosscoder's dead latents against its learning rate, on 400k tokens
        runs[f"k2b-crosscoder-lr{lr}"] = dict_quality.train_and_eval(
            f"k2b-crosscoder-lr{lr}", ["--d-sae", "23040", "--k", "64", "--lr", lr, *common_args[:1], "400000",
            *common_args[2:]], store, _layers("crosscoder", CROSS_LAYERS), runs=RUNS,
        )  # fmt: skip
    profile = ["--profile-png", str(RUNS / "k3-clt" / "profile.png")]
    runs["k3-clt"] = dict_quality.train_and_eval(
        "k3-clt", ["--d-sae", str(4608 * 6), "--k", "32", *common_args], store, _layers("clt", CLT_LAYERS),
        eval_args=profile, runs=RUNS,
    )  # fmt: skip
    return runs


# -- speed ---------------------------------------------------------------------------------------------


def _timed_train(acts, sites: list[str], cfg_kwargs: dict) -> float:
    """Seconds per step of train_dictionary on the in-memory activations `acts` [n, len(sites), d]."""
    import torch

    from mechscope.activations import TensorSource
    from mechscope.dictionaries import TrainConfig, train_dictionary

    class Timed(TensorSource):
        def __init__(self):
            super().__init__(acts[:BATCH], sites, BATCH)
            self.stamps: list[float] = []

        def chunks(self, start=0):
            for number in range(start, STEPS):
                self.stamps.append(time.perf_counter())
                rows = torch.randperm(len(acts), generator=torch.Generator().manual_seed(number))[:BATCH]
                yield number, acts[rows]

    source = Timed()
    cfg = TrainConfig(**cfg_kwargs, tokens=STEPS * BATCH, batch_size=BATCH, eval_every=10**9, checkpoint_seconds=1e9,
                      dead_tokens=10**9, activation="topk")  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        train_dictionary(None, cfg, out, show_progress=False, source=source)
    source.stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(source.stamps, source.stamps[1:], strict=False)][3:]
    return statistics.median(gaps)


def _flops_sae(d: int, F: int, k: int, reads: int = 1, writes: int = 1) -> float:
    """Useful FLOPs of one TopK step: 2·B·(reads·d)·F dense, then per active pair 2·(writes·d) for the decoder
    forward and each of its two gradients and 2·(reads·d) for the encoder's weight gradient."""
    return 2 * BATCH * reads * d * F + BATCH * k * (3 * 2 * writes * d + 2 * reads * d)


def _flops_clt(d: int, per_layer: int, k: int, layers: int) -> float:
    written = sum(layers - r for r in range(layers))  # layer r's latents write layers r..last
    return 2 * BATCH * d * per_layer * layers + BATCH * k * (3 * 2 * d * written + 2 * d * layers)


def speed(store: Path) -> dict:
    import torch

    from mechscope.activations import StoreSource

    source = StoreSource(store, sites=SITES)
    acts = next(source.chunks(0))[1]  # [chunk tokens, sites, 576] float32
    col = {s: i for i, s in enumerate(SITES)}

    def pick(sites):
        return acts[:, [col[s] for s in sites]].contiguous()

    cross = [f"blocks.{n}.hook_resid_post" for n in CROSS_LAYERS]
    mids = [f"blocks.{n}.hook_resid_mid" for n in CLT_LAYERS]
    outs = [f"blocks.{n}.hook_mlp_out" for n in CLT_LAYERS]
    clt_sites = mids + outs  # the trainer's order: reads, then writes
    from sae_speed import run_peak  # this machine's float32 and bfloat16 matmul peaks, as S2 measures them

    peak = run_peak()
    result = {"threads": torch.get_num_threads(), "peak": {k: peak[f"{k}_flops"] for k in ("float32", "bfloat16")},
              "steps": STEPS, "batch": BATCH}  # fmt: skip
    log("V1: crosscoder")
    result["crosscoder_s"] = _timed_train(pick(cross), cross, {"sites": cross, "d_sae": 23040, "k": 64})
    result["saes_s"] = []
    for s in cross:
        log(f"V1: SAE {s}")
        result["saes_s"].append(_timed_train(pick([s]), [s], {"sites": [s], "d_sae": 4608, "k": 13}))
    log("V2: CLT")
    result["clt_s"] = _timed_train(
        pick(clt_sites), clt_sites, {"kind": "clt", "layers": CLT_LAYERS, "sites": None, "d_sae": 4608 * 6, "k": 32}
    )
    result["transcoders_s"] = []
    for mid, out in zip(mids, outs, strict=True):
        log(f"V2: transcoder {mid} -> {out}")
        result["transcoders_s"].append(
            _timed_train(pick([mid, out]), [mid, out], {"sites": [mid], "write_sites": [out], "d_sae": 4608, "k": 32})
        )
    result["adam_s"] = {"clt": _adam_step_s((4608 * 6, 576 * 6)), "transcoders": 6 * _adam_step_s((4608, 576))}
    result["flops"] = {
        "crosscoder": _flops_sae(576, 23040, 64, 5, 5),
        "saes": 5 * _flops_sae(576, 4608, 13),
        "clt": _flops_clt(576, 4608, 32, 6),
        "transcoders": 6 * _flops_sae(576, 4608, 32),
    }
    return result


def _adam_step_s(shape: tuple[int, int]) -> float:
    """Seconds of one Adam update of a decoder of this shape, alone (the median of three after one warm-up)."""
    import torch

    weight = torch.nn.Parameter(torch.zeros(shape))
    weight.grad = torch.randn(shape)
    optimiser = torch.optim.Adam([weight], lr=1e-3)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        optimiser.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


# -- report ----------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _crosscoder_blocks(folder: Path) -> list[str]:
    """Whether the crosscoder's decoder rows moved from their random start: the cosine between a latent's decoder
    blocks at adjacent layers (about 0 for random rows) and each layer's mean share of a row's squared norm."""
    if not folder.is_dir():
        return []

    from mechscope.dictionaries.formats import load_any

    d = load_any(folder)
    rows = d.W_dec.detach().float().reshape(d.d_sae, d.n_write, -1)
    norms = rows.norm(dim=-1)
    units = rows / norms[..., None].clamp_min(1e-12)
    cosine = (units[:, :-1] * units[:, 1:]).sum(-1).median().item()
    share = (norms**2 / (norms**2).sum(-1, keepdim=True)).mean(0).tolist()
    return [
        f"Its decoder rows are learned, not their random start: a latent's blocks at adjacent layers have median cosine "
        f"{cosine:.2f} (random rows: about 0), and a layer's mean share of a row's squared norm rises from "
        + " / ".join(f"{x:.2f}" for x in share)
        + " (layers 13 to 17; random rows: 0.20 each).",
        "",
    ]


def render(runs: dict, fast: dict | None, stamp: str) -> str:
    lines = [MARK_BEGIN, "## Dictionaries over several sites: transcoders, crosscoders, CLTs (issue 11)", "", stamp, ""]
    lines += [
        f"One store of 1 M tokens of SmolLM2 (bfloat16) over layers 12-17, harvested by `{HARVEST}`; every run",
        "reads the sites it needs from it (STORE below). Figures on 32,768 held-out tokens, float32 model.",
        "",
    ]
    if "k1-transcoder" in runs and "k1-skip-transcoder" in runs:
        t, s = runs["k1-transcoder"], runs["k1-skip-transcoder"]
        lines += ["### K1. Transcoder of layer 15's MLP (normed input -> hook_mlp_out), 9,216 latents, k = 64", ""]
        lines += [
            "| run | L0 | FVU of the MLP output | CE recovered (MLP replaced) | delta CE | KL | dead |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in (("transcoder", t), ("skip transcoder", s)):
            e = r["eval"]
            lines.append(
                f"| {name} | {e['l0']:.1f} | {e['fvu']:.3f} | {_pct(e['ce_recovered'])} | {e['delta_ce']:.3f} | "
                f"{e['kl']:.3f} | {_pct(e['dead_fraction'])} |"
            )
        lines += ["", f"`{t['train_cmd']}` (and `--skip-connection`); `{t['eval_cmd']}`", ""]
    if "k2-crosscoder" in runs and all(f"k2-sae-l{n}" in runs for n in CROSS_LAYERS):
        c = runs["k2-crosscoder"]
        e = c["eval"]
        saes = [runs[f"k2-sae-l{n}"]["eval"] for n in CROSS_LAYERS]
        lines += ["### K2. Crosscoder over the residual streams of layers 13-17 against one SAE per layer", ""]
        lines += [
            f"Crosscoder: 23,040 latents, k = 64 (L0 {e['l0']:.1f}), each latent writing all five layers. SAEs: 4,608",
            f"latents each (23,040 in all), k = 13 (L0 {sum(x['l0'] for x in saes):.0f} in all). The same 1 M tokens.",
            "",
            "| layer | crosscoder FVU | SAE FVU |",
            "|---|---|---|",
        ]
        for n, fvu, sae in zip(CROSS_LAYERS, e["fvu_per_site"], saes, strict=True):
            lines.append(f"| {n} | {fvu:.3f} | {sae['fvu']:.3f} |")
        pooled = statistics.fmean(x["fvu"] for x in saes)
        lines.append(f"| all (crosscoder pooled; SAEs mean) | {e['fvu']:.3f} | {pooled:.3f} |")
        better = "the crosscoder" if e["fvu"] < pooled else "the per-layer SAEs"
        lines += [
            "",
            f"At equal total latents and L0, {better} reconstruct{'s' if better == 'the crosscoder' else ''} better.",
            f"The crosscoder spliced at all five layers at once: CE recovered {_pct(e['ce_recovered'])}, delta CE "
            f"{e['delta_ce']:.3f}, KL {e['kl']:.3f}; dead {_pct(e['dead_fraction'])}. Each SAE spliced alone: CE recovered "
            + ", ".join(f"{_pct(x['ce_recovered'])}" for x in saes)
            + ".",
            "",
            f"Dead on the held-out tokens: crosscoder {_pct(e['dead_fraction'])}, SAEs "
            + ", ".join(_pct(x["dead_fraction"]) for x in saes)
            + "."
            + (
                " Layers carrying 80 % of a crosscoder feature's squared decoder norm (latents that fired on the held-out "
                "tokens): "
                + ", ".join(f"{i + 1}: {n:,}" for i, n in enumerate(e["sites_carrying"]))
                + " (plot: `bench/figures/crosscoder_profile.png`)."
                if sum(e["sites_carrying"]) <= round(23040 * (1 - e["dead_fraction"]))
                else " The histogram of layers carrying a feature is not shown: this evaluation also counted the latents "
                "that never fired, whose rows are still random."
            ),
            "",
            *_crosscoder_blocks(RUNS / "k2-crosscoder" / "dictionary"),
            f"`{c['train_cmd']}`; SAEs: `{runs['k2-sae-l13']['train_cmd']}` for each layer.",
            "",
        ]
    pilots = [runs.get(f"k2b-crosscoder-lr{lr}") for lr in LR_PILOT]
    if all(pilots):
        lines += ["### K2b. The crosscoder's dead latents and its learning rate (400k tokens)", ""]
        lines += ["| lr | FVU (pooled) | CE recovered | dead (held-out) | dead (last 100k training tokens) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for lr, r in zip(LR_PILOT, pilots, strict=True):
            e, m = r["eval"], r["last_train_metrics"]
            dead = f"{_pct(e['dead_fraction'])} | {_pct(m['dead'])}"
            lines.append(f"| {lr} | {e['fvu']:.3f} | {_pct(e['ce_recovered'])} | {dead} |")
        high, low = (p["eval"] for p in pilots)
        lines += [
            "",
            "3.37e-3 is the default at 23,040 latents. The crosscoder's latents die in a wave well after warm-up (from",
            "about 250k tokens on, in both the 400k and the 1 M runs), once their pre-activations are negative on every",
            "token, where AuxK has nothing to revive. A likely cause: Adam moves each of the encoder's 5 x 576 inputs",
            "by about the learning rate, so a crosscoder's pre-activations move about sqrt(5) times as far per step as an SAE's.",
            f"At the default over sqrt(5), {_pct(low['dead_fraction'])} are dead instead of {_pct(high['dead_fraction'])},"
            f" at FVU {low['fvu']:.3f} instead of {high['fvu']:.3f} for this budget: the lower rate converges more slowly.",
            "`--lr` sets it; long runs, where the dead latents' capacity matters more, may prefer the lower one.",
            "",
            f"`{pilots[0]['train_cmd']}`, and with `--lr {LR_PILOT[1]}`.",
            "",
        ]
    if "k3-clt" in runs:
        k3 = runs["k3-clt"]
        e = k3["eval"]
        lines += ["### K3. Cross-layer transcoder over layers 12-17", ""]
        lines += [
            f"4,608 latents and k = 32 per layer (27,648 in all, L0 {e['l0']:.1f}). Replacement model, all six MLPs",
            f"replaced at once, layer by layer: **CE recovered {_pct(e['ce_recovered'])}, KL {e['kl']:.3f}**, delta CE "
            f"{e['delta_ce']:.3f} (clean {e['ce_clean']:.3f}, zero-ablated {e['ce_ablated']:.3f} nats). FVU of each MLP output: "
            + ", ".join(f"{n}: {fvu:.3f}" for n, fvu in zip(CLT_LAYERS, e["fvu_per_site"], strict=True))
            + f" (pooled {e['fvu']:.3f}); dead {_pct(e['dead_fraction'])}. Layers carrying 80 % of a feature's norm "
            "(latents that fired): "
            + ", ".join(f"{i + 1}: {n:,}" for i, n in enumerate(e["sites_carrying"]))
            + " (plot: `bench/figures/clt_profile.png`).",
            "",
            f"`{k3['train_cmd']}`; `{k3['eval_cmd']}`",
            "",
        ]
    if fast:
        peak = fast["peak"]
        lines += [f"### V1, V2. Training speed, {fast['steps']} steps of {fast['batch']:,} tokens, in-memory activations", ""]
        lines += ["| what | s/step | tokens/s | vs the separate dictionaries | GFLOP/s | of fp32 peak | of bf16 peak |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        saes, transcoders = sum(fast["saes_s"]), sum(fast["transcoders_s"])
        pairs = (("crosscoder 13-17", "crosscoder", fast["crosscoder_s"], "5 SAEs, one after another", "saes", saes),
                 ("CLT 12-17", "clt", fast["clt_s"], "6 transcoders, one after another", "transcoders", transcoders))  # fmt: skip
        for name, key, sec, other, okey, osec in pairs:
            for label, k_, s_, ratio in ((name, key, sec, osec / sec), (other, okey, osec, None)):
                flops = fast["flops"][k_] / s_
                lines.append(
                    f"| {label} | {s_:.2f} | {BATCH / s_:,.0f} | {'' if ratio is None else f'{ratio:.2f}x'} | "
                    f"{flops / 1e9:,.0f} | {flops / peak['float32']:.2f} | {flops / peak['bfloat16']:.2f} |"
                )
        lines += [
            "",
            f"Matmul peak measured in the same run: {peak['float32'] / 1e9:,.0f} GFLOP/s float32, {peak['bfloat16'] / 1e9:,.0f} "
            f"GFLOP/s bfloat16 ({fast['threads']} threads). 'vs the separate dictionaries' is the time of the separate ones "
            "over the time of the one; above 1 the one is faster for the same tokens. Each reads the same tokens but does "
            "different work (a crosscoder's encoder reads all five layers), so FLOP/s is the fairer measure of the code.",
            "",
        ]
        if "adam_s" in fast:
            adam = fast["adam_s"]
            lines += [
                "The CLT does the same dense encoder work as the six transcoders, but each of its active pairs reads and",
                "writes a decoder row over all six sites (3,456 values, its blocks before the latent's layer held at zero;",
                "2,016 writable on average), where a transcoder's pair touches one site's 576. Those sparse products are",
                "memory-bound: a torch.profiler run of six CLT steps here (not part of this script) put about 1.5 s of",
                "each step in torch.sparse.mm (the decoder's and encoder's weight gradients) and 0.9 s in the embedding",
                "bag (decoding and its value gradient). Products over only the writable blocks would save about 40 % of",
                f"that; not done yet. Adam's update of the whole decoder takes {adam['clt']:.2f} s per step, against"
                f" {adam['transcoders']:.2f} s for the six transcoders' decoders.",
                "",
            ]
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="the store (harvested here if not given)")
    parser.add_argument("--only", choices=["quality", "speed", "render"], default=None)
    args = parser.parse_args()
    store = args.store or RUNS / "store"
    manifest = store / "manifest.json"
    if not manifest.is_file() or not json.loads(manifest.read_text()).get("complete"):
        dict_quality._run(HARVEST.replace("mechscope", dict_quality.MECHSCOPE, 1).replace("STORE", str(store)).split())
    RUNS.mkdir(parents=True, exist_ok=True)
    load_start = common.load_average()
    runs_file, speed_file = RUNS / "quality.json", RUNS / "speed.json"
    runs = {path.parent.name: json.loads(path.read_text()) for path in sorted(RUNS.glob("*/eval.json"))}  # runs done
    fast = json.loads(speed_file.read_text()) if speed_file.exists() else None
    if args.only in (None, "quality"):
        runs = quality(store)
        runs_file.write_text(json.dumps(runs, indent=1))
        FIGURES.mkdir(exist_ok=True)
        for name, figure in (("k2-crosscoder", "crosscoder_profile.png"), ("k3-clt", "clt_profile.png")):
            png = RUNS / name / "profile.png"
            if png.exists():
                (FIGURES / figure).write_bytes(png.read_bytes())
    if args.only in (None, "speed"):
        fast = speed(store)
        speed_file.write_text(json.dumps(fast, indent=1))
    stamp = dict_quality._stamp(load_start) + "."
    section = render(runs, fast, stamp)
    common.write_section(section, MARK_BEGIN, MARK_END, "multi-site")


if __name__ == "__main__":
    main()
