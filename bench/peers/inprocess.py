"""The peers timed in one process (peers' venv): `python bench/peers/inprocess.py FOLDER IN_DIR`.

First checks that every peer computes what mechscope computes on the same tokens (IN_DIR/reference.pt,
written by ours.py), then times each peer's reads and logit lens interleaved with a plain HF model
loaded from the same folder in this venv: the baseline of every ratio. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import tools  # noqa: E402
import torch  # noqa: E402
from common import log  # noqa: E402

FORWARD_REPEATS = 1 if tools.QUICK else 5
LENS_REPEATS = 1 if tools.QUICK else 20
RESID_RTOL = 1e-4  # max |peer - mechscope| / max |mechscope|, per tensor
LOGPROB_ATOL = 1e-3  # max |Δ log-prob| at the last position, over the whole vocabulary
LENS_ATOL = 1e-4  # max |Δ P(target)| over the 31 x 6 lens cells


def _rel(ours, theirs) -> float:
    return float((theirs.float() - ours.float()).abs().max() / ours.float().abs().max())


def agreement(peer: str, handle, ids, ref: dict, lens_in) -> dict:
    """The peer's values against mechscope's on the same tokens (relative max differences), and the
    entries and bytes (shared storages once) each of its reads keeps."""
    resid = tools.resid30(peer, handle, ids)
    names = [n for n in ref if n.endswith("hook_resid_post")]
    out = {"resid_rel": max(_rel(ref[n], resid[n]) for n in names), "resid_layers": names}
    out["sizes"] = {"resid30": [len(resid), common.tensor_bytes(resid.values())]}
    del resid
    sites = tools.sites(peer, handle, ids)
    out["n_sites"] = len(sites)
    out["sizes"]["sites"] = [len(sites), common.tensor_bytes(sites.values())]
    per_site = {}
    for name in [n for n in ref if n not in names and n.startswith(("hook_", "blocks.", "ln_final"))]:
        theirs = sites[name]
        if name == "ln_final.hook_normalized" and peer in ("hooked", "bridge"):
            theirs = theirs * ref["final_norm_weight"]  # TransformerLens's hook sits before the norm's gain
        per_site[name] = _rel(ref[name], theirs)
    out["sites_rel"] = per_site
    del sites
    if peer != "nnsight":
        cache = tools.everything(peer, handle, ids)
        out["sizes"]["everything"] = [len(cache), common.tensor_bytes(cache.values())]
        del cache
    logprobs = tools.final_logprobs(peer, handle, ids)
    out["logprob_abs"] = float((logprobs - ref["final_logprobs"]).abs().max())
    out["top1_equal"] = float((logprobs.argmax(-1) == ref["final_logprobs"].argmax(-1)).float().mean())
    lens = tools.lens(peer, handle, *lens_in)
    out["lens_abs"] = float((lens["probs"] - ref["lens_probs"]).abs().max())
    out["lens_rank_mismatches"] = int((lens["ranks"] != ref["lens_ranks"]).sum())
    out["lens_top5_last_equal"] = bool(torch.equal(lens["top_ids"][-1], ref["lens_top_ids"][-1]))
    worst_site = max(per_site.values()) if per_site else 0.0
    out["ok"] = (
        out["resid_rel"] <= RESID_RTOL
        and worst_site <= RESID_RTOL
        and out["logprob_abs"] <= LOGPROB_ATOL
        and out["top1_equal"] == 1.0
        and out["lens_abs"] <= LENS_ATOL
        and out["lens_top5_last_equal"]
    )
    return out


def forward_fns(peers: dict, hf, ids) -> dict:
    fns = {"hf": lambda: hf(ids, use_cache=False)}
    for peer, handle in peers.items():
        fns[f"{peer}_resid30"] = lambda p=peer, h=handle: tools.resid30(p, h, ids)
        fns[f"{peer}_sites"] = lambda p=peer, h=handle: tools.sites(p, h, ids)
        if peer != "nnsight":
            fns[f"{peer}_everything"] = lambda p=peer, h=handle: tools.everything(p, h, ids)
    return fns


def main(folder: str, in_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.load(in_dir / "ids.pt", weights_only=True)
    ref = torch.load(in_dir / "reference.pt", weights_only=True)
    lens_in = tools.lens_inputs(tok)
    peers, result = {}, {"errors": {}, "agreement": {}}
    for peer in tools.PEERS:
        try:
            peers[peer] = tools.load(peer, folder)
            with torch.inference_mode():
                log(f"{peer}: agreement with mechscope's values")
                result["agreement"][peer] = agreement(peer, peers[peer], ids, ref, lens_in)
        except Exception as err:  # a peer that fails is reported, not fatal
            log(f"{peer} failed: {err!r}")
            result["errors"][peer] = f"{type(err).__name__}: {err}"
            peers.pop(peer, None)
    with torch.inference_mode():
        fns = forward_fns(peers, hf, ids)
        log(f"peers: {len(fns)} variants x {FORWARD_REPEATS}+ forwards of {tuple(ids.shape)}, interleaved")
        result["forward"] = common.interleaved(fns, FORWARD_REPEATS, max_rounds=3 * FORWARD_REPEATS, budget_s=400, settle=True)
        lens_fns = {"hand_lens": lambda: common.hand_lens(hf, tok)}
        for peer, handle in peers.items():
            lens_fns[f"{peer}_lens"] = lambda p=peer, h=handle: tools.lens(p, h, *tools.lens_inputs(tok))
        log(f"peers: logit lens, {len(lens_fns)} variants x {LENS_REPEATS}+")
        common.wait_quiet("the lens")
        result["lens"] = common.interleaved(lens_fns, LENS_REPEATS, warmup=3, budget_s=90)
    result["tolerances"] = {"resid_rtol": RESID_RTOL, "logprob_atol": LOGPROB_ATOL, "lens_atol": LENS_ATOL}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
