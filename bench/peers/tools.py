"""The peers, each driven the way its documentation drives it, behind one small interface (peers' venv only).

Every peer gets the same four operations on the same inputs, returning plain dicts of tensors:

  resid30(handle, ids)   the 30 `blocks.L.hook_resid_post`, stopping before the unembedding where the tool offers it
  sites(handle, ids)     the 242 sites mechscope reads (TransformerLens names), with the attention patterns
  everything(handle, ids) everything the tool caches when asked for no particular hook (TransformerLens only)
  lens(handle, ids, tid) the logit lens: probabilities, ranks and top-k of the target over 31 rows, as `common.hand_lens`

Peers:
  hooked     TransformerLens `HookedTransformer`, built from the local folder through TransformerLens's own
             loading functions (config and state dict from a path), weights unprocessed (no LayerNorm folding
             or centring: the sites keep HF's values, as SAELens loads it)
  bridge     TransformerLens `TransformerBridge.boot_transformers(folder)`: the HF model wrapped with hooks
  nnsight    nnsight `TransformersModel(folder)`: module inputs and outputs saved inside a trace

Imports only the standard library at module level: `peer_child.py` times the imports itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

# PEERS_QUICK=1: a smoke run that checks the wiring (one timed call per variant, short SAE runs); its figures
# mean nothing, so run.py then leaves RESULTS.md alone.
QUICK = bool(os.environ.get("PEERS_QUICK"))
if QUICK:
    common._quiet_budget["left_s"] = 0.0  # no waiting for a quiet machine either
PEERS = ("hooked", "bridge", "nnsight")
LABELS = {
    "hooked": "TransformerLens HookedTransformer",
    "bridge": "TransformerLens TransformerBridge",
    "nnsight": "nnsight",
}
# Per layer, the sites mechscope reads, in the order a forward pass produces them.
LAYER_SITES = (
    "hook_resid_pre",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)


def site_names(n_layers: int = common.N_LAYERS) -> list[str]:
    """mechscope's 242 sites on SmolLM2, by their TransformerLens names."""
    per_layer = [f"blocks.{layer}.{site}" for layer in range(n_layers) for site in LAYER_SITES]
    return ["hook_embed", *per_layer, "ln_final.hook_normalized"]


# -- loading ----------------------------------------------------------------------------------------


def import_peer(peer: str) -> None:
    """Import what loading `peer` needs (timed separately from the load itself)."""
    if peer == "hooked":
        import transformer_lens  # noqa: F401
        import transformers  # noqa: F401
    elif peer == "bridge":
        import transformer_lens.model_bridge  # noqa: F401
    elif peer == "nnsight":
        import nnsight  # noqa: F401
    else:
        raise ValueError(f"unknown peer {peer!r}: expected one of {PEERS}")


def load(peer: str, folder: str):
    """A ready model of `peer` from the local folder (offline), on the CPU in float32."""
    import torch

    if peer == "hooked":
        return _load_hooked(folder)
    if peer == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(folder, device="cpu", dtype=torch.float32)
    if peer == "nnsight":
        from nnsight import TransformersModel

        return TransformersModel(folder, task="text-generation", dispatch=True, dtype=torch.float32)
    raise ValueError(f"unknown peer {peer!r}: expected one of {PEERS}")


def _load_hooked(folder: str):
    """HookedTransformer from a local folder: `HookedTransformer.from_pretrained` accepts only names from its
    registry, but its loading module reads a config and a state dict from a path; the HF model is dropped
    once converted, as `from_pretrained` does when it loads the HF model itself."""
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = loading.get_pretrained_model_config(folder, fold_ln=False, device="cpu", dtype=torch.float32)
    state = loading.get_pretrained_state_dict(folder, cfg, hf_model=hf, dtype=torch.float32)
    del hf
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(folder), move_to_device=False)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()


def parameters(handle):
    """The torch parameters behind a loaded peer (to page lazily mapped weights in before measuring memory)."""
    module = handle._module if hasattr(handle, "_module") else handle  # nnsight wraps the HF model
    return list(module.parameters())


def tokenizer(handle):
    return handle.tokenizer


# -- operations -------------------------------------------------------------------------------------


def resid30(peer: str, handle, ids) -> dict:
    """The 30 residual streams after each block; the forward stops after the last block where the tool can."""
    names = common.resid_post_sites()
    if peer in ("hooked", "bridge"):
        _, cache = handle.run_with_cache(ids, names_filter=names, stop_at_layer=common.N_LAYERS)
        return {name: cache[name] for name in names}
    saved = {}
    with handle.trace(ids) as tracer:
        for layer in range(common.N_LAYERS):
            saved[names[layer]] = handle.model.layers[layer].output.save()
        tracer.stop()
    return dict(saved)


def sites(peer: str, handle, ids) -> dict:
    """The 242 sites, each tool's way: TransformerLens filters its hooks by name; nnsight saves module
    inputs and outputs (HF's eager attention returns the patterns; resid_mid is resid_pre + attn_out)."""
    names = site_names()
    if peer in ("hooked", "bridge"):
        _, cache = handle.run_with_cache(ids, names_filter=names)
        return {name: cache[name] for name in names}
    return _nnsight_sites(handle, ids)


def _nnsight_sites(handle, ids) -> dict:
    hf = handle._module
    hf.set_attn_implementation("eager")
    try:
        saved = _nnsight_trace_sites(handle, ids)
    finally:
        hf.set_attn_implementation("sdpa")
    batch, pos = ids.shape
    for layer in range(common.N_LAYERS):
        z = saved[f"blocks.{layer}.attn.hook_z"]
        saved[f"blocks.{layer}.attn.hook_z"] = z.view(batch, pos, hf.config.num_attention_heads, -1)
    return saved


def _nnsight_trace_sites(handle, ids) -> dict:
    saved = {}
    with handle.trace(ids):
        saved["hook_embed"] = handle.model.embed_tokens.output.save()
        for layer in range(common.N_LAYERS):
            block, at = handle.model.layers[layer], f"blocks.{layer}."
            pre = block.input
            saved[at + "hook_resid_pre"] = pre.save()
            saved[at + "attn.hook_z"] = block.self_attn.o_proj.input.save()
            attn_out, pattern = block.self_attn.output[0], block.self_attn.output[1]
            saved[at + "attn.hook_pattern"] = pattern.save()
            saved[at + "hook_attn_out"] = attn_out.save()
            saved[at + "hook_resid_mid"] = (pre + attn_out).save()
            saved[at + "mlp.hook_post"] = block.mlp.down_proj.input.save()
            saved[at + "hook_mlp_out"] = block.mlp.output.save()
            saved[at + "hook_resid_post"] = block.output.save()
        saved["ln_final.hook_normalized"] = handle.model.norm.output.save()
    return dict(saved)


def everything(peer: str, handle, ids) -> dict:
    """Every hook the tool has, cached (its `run_with_cache` with no filter)."""
    if peer not in ("hooked", "bridge"):
        raise ValueError(f"{peer} has no cache-everything call")
    _, cache = handle.run_with_cache(ids)
    return dict(cache.items())


def final_logprobs(peer: str, handle, ids):
    """log-softmax of the logits at the last position, [batch, d_vocab] (for the agreement check)."""
    if peer in ("hooked", "bridge"):
        logits = handle(ids)
    else:
        with handle.trace(ids):
            out = handle.output.save()
        logits = out.logits
    return logits[:, -1].float().log_softmax(-1)


def lens_inputs(tokenizer, text: str = common.LENS_PROMPT, target: str = common.LENS_TARGET):
    """The prompt's ids [1, pos] and the target's first token id, tokenised as `common.hand_lens` does (a
    HookedTransformer's own tokenizer would prepend BOS, so every peer gets these ids instead)."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids, tokenizer(target, add_special_tokens=False).input_ids[0]


def lens(peer: str, handle, ids, tid: int, k: int = common.LENS_K) -> dict:
    """The logit lens of prompt `ids` for token `tid` (31 rows: the embeddings, then after each block)."""
    if peer in ("hooked", "bridge"):
        _, cache = handle.run_with_cache(ids, names_filter=lambda name: "resid" in name or name == "hook_embed")
        resid = cache.accumulated_resid(apply_ln=True)[:, 0]  # [row, pos, d_model], the final norm recomputed per row
        logits = handle.unembed(resid)
    else:
        logits = _nnsight_lens_logits(handle, ids)
    logprobs = logits.float().log_softmax(-1)
    target_lp = logprobs[..., tid]
    top = logprobs.topk(k, dim=-1)
    return {
        "probs": target_lp.exp(),
        "ranks": (logprobs > target_lp[..., None]).sum(-1) + 1,
        "top_ids": top.indices,
        "top_probs": top.values.exp(),
    }


def _nnsight_lens_logits(handle, ids):
    import torch

    rows = []  # filled inside the trace: nnsight hands back names bound before it
    with handle.trace(ids):
        rows.append(handle.model.layers[0].input.save())
        for layer in range(common.N_LAYERS):
            rows.append(handle.model.layers[layer].output.save())
    model = handle._module.model
    resid = torch.stack([r[0] for r in rows])
    return handle._module.lm_head(model.norm(resid))
