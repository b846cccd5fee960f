"""The peers section of bench/RESULTS.md, from the figures run.py gathered (stdlib only)."""

from __future__ import annotations

BEGIN = "<!-- peers section: begin (regenerated alone by `make bench-peers`) -->"
END = "<!-- peers section: end -->"
PEERS = {"hooked": "HookedTransformer", "bridge": "TransformerBridge", "nnsight": "nnsight"}


def splice(text: str, section: str) -> str:
    """`text` with its peers section replaced by `section` (appended when there is none)."""
    block = f"{BEGIN}\n\n{section.strip()}\n\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _noisy(*summaries: dict) -> str:
    return " *(noisy)*" if any(s.get("noisy") for s in summaries) else ""


def _row(label: str, base: str, fmt, ours: tuple | None, peers: dict[str, tuple], base_peers: dict | None) -> tuple:
    """One headline row. `ours` is (mechscope's summary, its baseline) in mechscope's venv, `peers` maps a peer
    to its summary, `base_peers` is the baseline in the peers' venv; a summary is {"median": value, ...}.
    A cell reads `ratio to plain HF (absolute; ratio to mechscope's ratio)`."""
    cells, mine = {}, None
    if ours:
        mine = ours[0]["median"] / ours[1]["median"]
        cells["mechscope"] = f"{mine:.2f}× ({fmt(ours[0]['median'])}){_noisy(*ours)}"
    for peer, summary in peers.items():
        ratio = summary["median"] / base_peers["median"]
        vs = f"; {ratio / mine:.2f}× mechscope" if mine else ""
        cells[peer] = f"{ratio:.2f}× ({fmt(summary['median'])}{vs}){_noisy(summary, base_peers)}"
    values = [fmt(b["median"]) for b in (ours[1] if ours else None, base_peers) if b]
    return label, f"{base}: {' / '.join(values)}", cells


def _rows(res: dict) -> list[tuple[str, str, dict]]:
    """(figure, baseline with its values in mechscope's / the peers' venv, {tool: cell}) for each figure measured."""
    rows = []
    ours, peers = res.get("ours"), res.get("peers")
    if ours and peers:
        of, pf = ours["forward"], peers["forward"]
        for key, label in (("resid30", "1. read all 30 `blocks.L.hook_resid_post`"), ("sites", "2. read the 242 sites")):
            got = {p: pf[f"{p}_{key}"] for p in PEERS if f"{p}_{key}" in pf}
            rows.append(_row(label, "plain HF forward", _s, (of[f"ms_{key}"], of["hf"]), got, pf["hf"]))
        got = {p: pf[f"{p}_everything"] for p in PEERS if f"{p}_everything" in pf}
        rows.append(_row("2′. cache everything the tool hooks (context)", "plain HF forward", _s, None, got, pf["hf"]))
        ol, pl = ours["lens"], peers["lens"]
        got = {p: pl[f"{p}_lens"] for p in PEERS if f"{p}_lens" in pl}
        rows.append(
            _row(
                "3. logit lens, 6 tokens × 31 rows",
                "hand-written HF lens",
                _s,
                (ol["ms_lens"], ol["hand_lens"]),
                got,
                pl["hand_lens"],
            )
        )
    ol, pl = res.get("ours_loads"), res.get("peer_loads")
    if ol and pl:
        for key, label, base in (
            ("import_load_s", "4. import + load, fresh process", "importing transformers + `from_pretrained`"),
            ("load_s", "4′. load alone, fresh process", "`from_pretrained` (model + tokenizer)"),
        ):
            pick = lambda summary, k=key: {**summary, "median": summary[k]}  # noqa: E731
            got = {p: pick(pl[p]) for p in PEERS if p in pl}
            rows.append(_row(label, base, _s, (pick(ol["load"]), pick(ol["hf_load"])), got, pick(pl["hf_load"])))
    return rows + _rss_rows(res)


def _rss_rows(res: dict) -> list:
    orss, prss = res.get("ours_rss"), res.get("peer_rss")
    if not (orss and prss):
        return []
    rows = []
    spec = (
        ("resid30", "ms_resid30", "hf_forward", "5. peak RSS: read 30 resid_post", "plain HF forward"),
        ("sites", "ms_all", "hf_all", "5. peak RSS: the 242 sites", "the same sites saved by hand-written HF hooks"),
        ("lens", "ms_lens", "hf_lens", "5. peak RSS: logit lens", "hand-written HF lens"),
        ("everything", None, "hf_forward", "5′. peak RSS: cache everything (context)", "plain HF forward"),
    )
    peak = lambda r: {"median": r["peak_process"]}  # noqa: E731
    for what, ours_op, base_op, label, base in spec:
        ours = (peak(orss[ours_op]), peak(orss[base_op])) if ours_op else None
        got = {p: peak(prss[f"{p}:{what}"]) for p in PEERS if f"{p}:{what}" in prss}
        rows.append(_row(label, base, _mib, ours, got, peak(prss[base_op])))
    return rows


def _headline(res: dict) -> list[str]:
    tools = ["mechscope", *PEERS]
    head = "| figure | baseline: in mechscope's venv / in the peers' venv | " + " | ".join(PEERS.get(t, t) for t in tools) + " |"
    lines = [head, "|" + "---|" * (len(tools) + 2)]
    for label, base, cells in _rows(res):
        lines.append(f"| {label} | {base} | " + " | ".join(cells.get(t, "—") for t in tools) + " |")
    return lines


def _versions(res: dict) -> list[str]:
    ours, peers = res.get("versions_ours", {}), res.get("versions_peers", {})
    names = ["python", "torch", "transformers", "mechscope", "transformer-lens", "nnsight", "sae-lens", "eai-sparsify"]
    lines = ["| package | mechscope's venv (`.venv`) | peers' venv (`bench/peers/.venv`) |", "|---|---|---|"]
    for name in names:
        lines.append(f"| {name} | {ours.get(name) or '—'} | {peers.get(name) or '—'} |")
    return lines


def _agreement(res: dict) -> list[str]:
    peers = res.get("peers")
    if not peers:
        return []
    tol = peers["tolerances"]
    lines = [
        "### Agreement with mechscope (checked before timing)",
        "",
        f"Each peer's values on the same 8 × 128 tokens against mechscope's. Tolerances: tensors within "
        f"{tol['resid_rtol']:g} of the reference's largest magnitude (SmolLM2's residual stream reaches ≈ 2·10⁴ at "
        f"its first position), last-position log-probabilities within {tol['logprob_atol']:g}, the same top-1 token, "
        f"lens probabilities within {tol['lens_atol']:g}.",
        "",
        "| peer | resid_post (layers 0, 15, 29), rel. | worst other site, rel. | sites read | last-position "
        "log-prob, max abs Δ | same top-1 | lens P(target), max abs Δ | lens rank mismatches / 186 | lens last-row "
        "top-5 equal | within tolerance |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, a in peers["agreement"].items():
        worst = max(a["sites_rel"].items(), key=lambda kv: kv[1]) if a["sites_rel"] else ("—", 0.0)
        lines.append(
            f"| {PEERS[p]} | {a['resid_rel']:.1e} | {worst[1]:.1e} (`{worst[0]}`) | {a['n_sites']} | "
            f"{a['logprob_abs']:.1e} | {a['top1_equal']:.0%} | {a['lens_abs']:.1e} | {a['lens_rank_mismatches']} | "
            f"{'yes' if a['lens_top5_last_equal'] else 'no'} | **{'yes' if a['ok'] else 'NO'}** |"
        )
    lines += [
        "",
        "Sites compared besides resid_post: `hook_embed`, `blocks.3.attn.hook_pattern`, `blocks.10.attn.hook_z`, "
        "`blocks.12.hook_attn_out`, `blocks.25.hook_resid_mid`, `blocks.20.mlp.hook_post`, `blocks.7.hook_mlp_out`, "
        "`ln_final.hook_normalized` (TransformerLens's sits before the final norm's gain, so it is compared after "
        "multiplying by that gain). Rank mismatches come from near-ties among tiny probabilities.",
    ]
    for p, err in peers.get("errors", {}).items():
        lines.append(f"- {PEERS[p]} could not be measured: `{err}`")
    return lines


def _timings(res: dict) -> list[str]:
    lines = ["### Timings (medians over clean calls), seconds", ""]
    lines += [
        "| venv | variant | median | min | max | clean / calls | other processes' cores (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for venv, key in (("mechscope", "ours"), ("peers", "peers")):
        part = res.get(key) or {}
        for group in ("forward", "lens"):
            for name, t in (part.get(group) or {}).items():
                lines.append(
                    f"| {venv} | `{name}` | {t['median']:.3f} | {t['min']:.3f} | {t['max']:.3f} | "
                    f"{t['n_clean']} / {t['n']} | {t['background_max']:.2f} |"
                )
    for venv, key in (("mechscope", "ours_loads"), ("peers", "peer_loads")):
        for name, t in (res.get(key) or {}).items():
            lines.append(
                f"| {venv} | load `{name}`: import {t['import_s']:.2f} + load {t['load_s']:.2f} | "
                f"{t['import_load_s']:.3f} | — | — | {t['n_clean']} / {t['n']} | {t['background_max']:.2f} |"
            )
    return lines


def _memory(res: dict) -> list[str]:
    lines = ["### Peak RSS per fresh process", ""]
    lines += [
        "| venv | process | peak during load | peak (process) | peak during op − RSS with weights read | held by result |",
        "|---|---|---|---|---|---|",
    ]
    for venv, key in (("mechscope", "ours_rss"), ("peers", "peer_rss")):
        for name, r in (res.get(key) or {}).items():
            own = r["peak_op"] - r["rss_weights"]
            lines.append(
                f"| {venv} | `{name}` | {_mib(r['peak_load'])} | {_mib(r['peak_process'])} | {_mib(own)} | "
                f"{_mib(r['result_bytes'])} |"
            )
    agreement = (res.get("peers") or {}).get("agreement", {})
    if agreement:
        lines += ["", "In-process caches (entries; bytes with shared storages once):", ""]
        if res.get("ours"):
            o = res["ours"]
            lines.append(f"- mechscope: 30 resid_post {_mib(o['resid30_bytes'])}; {o['n_sites']} sites {_mib(o['sites_bytes'])}")
        for p, a in agreement.items():
            parts = [f"{what} {n} entries, {_mib(size)}" for what, (n, size) in a["sizes"].items()]
            lines.append(f"- {PEERS[p]}: " + "; ".join(parts))
    return lines


def _sae(res: dict) -> list[str]:
    sae = res.get("sae") or {}
    if not sae:
        return []
    labels = {
        "saelens_train": "SAELens `SAETrainer`, activations read beforehand (the trainer alone)",
        "saelens_e2e": "SAELens `LanguageModelSAETrainingRunner` (HookedTransformer to layer 15 + mixing buffer + training)",
        "sparsify_e2e": "sparsify `Trainer` (full HF forward per batch, SAE trained in a hook on layer 15)",
    }
    lines = [
        "### SAE training throughput (baseline for mechscope's trainer, which does not exist yet)",
        "",
        "TopK SAE, d_in 576 → 9,216 latents, k = 64, on `blocks.15.hook_resid_post` of SmolLM2, CPU, float32, "
        "batches of 4,096 tokens from the built-in corpus (128-token contexts), each tool's defaults otherwise "
        "(SAELens: Adam, lr 3e-4, its TopK auxiliary loss; sparsify: signum, automatic lr, no auxiliary loss).",
        "",
        "| run | tokens | seconds | tokens/s | steady tokens/s (median step) | other processes' cores |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in sae.items():
        if "error" in r:
            lines.append(f"| {labels[mode]} | — | — | could not run: `{r['error']}` | — | — |")
            continue
        steady = f"{r['steady_tokens_per_s']:,.0f}" if r.get("steady_tokens_per_s") else "—"
        lines.append(
            f"| {labels[mode]} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {steady} | "
            f"{r['background_cores']:.2f} |"
        )
    sp = sae.get("sparsify_e2e", {})
    if "forward_only" in sp and sp.get("steady_tokens_per_s"):
        fwd = sp["forward_only"]
        step = 4096 / sp["steady_tokens_per_s"] - fwd["seconds_per_batch"]
        derived = (
            f"subtracting it from its median step leaves ≈ {4096 / step:,.0f} tokens/s for the SAE's own work (derived, "
            "not measured directly: sparsify's trainer has no activations-only input)."
            if step > 0
            else "it came out slower than a whole training step, so other processes disturbed it and no SAE-only figure "
            "is derived."
        )
        lines += ["", f"sparsify's full forward alone, timed after training: {fwd['tokens_per_s']:,.0f} tokens/s; {derived}"]
    busy = [r["background_cores"] for r in sae.values() if "background_cores" in r]
    if busy and max(busy) >= 0.5:
        lines += [
            "",
            f"These runs shared the 2 cores with other processes (on average {min(busy):.1f}–{max(busy):.1f} cores busy "
            "elsewhere, last column): their tokens/s are lower than the machine gives alone. Rerun on a quiet machine.",
        ]
    return lines


def render(res: dict) -> str:
    m = res.get("machine", {})
    lines = [
        "## Peers, measured",
        "",
        f"Measured {res.get('date', '?')} by `make bench-peers` (`bench/peers/run.py`), mechscope commit "
        f"{m.get('mechscope commit', '?')}, {m.get('CPU', '?')}, {m.get('cores (os.cpu_count)', '?')} cores, "
        f"load average at start / end {res.get('load_avg_start', '?')} — {res.get('load_avg_end', '?')}, "
        f"{res.get('wall_s', 0):.0f} s ({res.get('quiet_waited_s', 0):.0f} s of it waiting for a quiet CPU).",
        "",
        "Same model (the converted SmolLM2-135M-Instruct folder, loaded offline by every tool), the same 8 × 128 "
        "tokens and the same clean-call rule as the sections above. Each tool runs in its own venv and each ratio "
        "is to plain HF measured in that venv in the same run (`from_pretrained` on the same folder, float32, "
        "its default attention); the second figure in a cell is that ratio over mechscope's ratio for the same "
        "figure. Cells read `ratio to plain HF (absolute; ratio to mechscope)`. A cell marked *(noisy)* had too few "
        "calls undisturbed by other processes; its median is over all calls and does not measure the tool.",
        "",
        *_headline(res),
        "",
        "How each tool is driven: HookedTransformer is built from the folder with TransformerLens's own loading "
        "functions (`from_pretrained` accepts only registry names) with unprocessed weights, so its sites hold HF's "
        "values; TransformerBridge is `boot_transformers(folder)` (it switches the model to eager attention); "
        "nnsight is `TransformersModel(folder)` with module inputs and outputs saved in a trace (eager attention "
        "for the sites read, since SDPA returns no patterns). Reading resid_post stops after the last block where "
        "the tool can (`stop_at_layer` in TransformerLens, `tracer.stop()` in nnsight), as mechscope does; reading "
        "the 242 sites runs the whole model in the peers (mechscope stops after the final norm). Peak RSS is the "
        "whole fresh process, as figure 5 above.",
        "",
        "### Versions",
        "",
        *_versions(res),
        "",
        *_agreement(res),
        "",
        *_sae(res),
        "",
        *_timings(res),
        "",
        *_memory(res),
    ]
    failures = [f"- could not install `{req}`: `{why}`" for req, why in res.get("install_errors", {}).items()]
    failures += [f"- phase {name}: `{why}`" for name, why in res.get("errors", {}).items()]
    if failures:
        lines += ["", "### What could not be measured", "", *failures]
    return "\n".join(lines)
