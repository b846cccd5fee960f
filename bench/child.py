"""One measurement in a fresh process: `python bench/child.py OP MODEL_FOLDER IDS_FILE`; prints one JSON line.

OPs:
  load            time `import mechscope` and `mechscope.load()`
  hf_load         time importing transformers and `from_pretrained` on the same converted folder (no mechscope)
  rss:<what>      peak RSS of one operation; <what> is one of the keys of OPERATIONS below. The `hf_*`
                  operations never import mechscope: they are what a user would write with transformers alone.
"""

from __future__ import annotations

import json
import sys
import time

T_START = time.perf_counter()

import common  # noqa: E402  (stdlib only; imported after T_START on purpose)


def _ms_model():
    import mechscope

    return mechscope.load()


def _hf_model(folder: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(folder)


def time_load(folder: str) -> dict:
    t0 = time.perf_counter()
    import mechscope

    t1 = time.perf_counter()
    model = mechscope.load()
    t2 = time.perf_counter()
    assert model.dims.n_layers == common.N_LAYERS
    return {"import_s": t1 - t0, "load_s": t2 - t1}


def time_hf_load(folder: str) -> dict:
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t1 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    t2 = time.perf_counter()
    assert hf.config.num_hidden_layers == common.N_LAYERS and tokenizer is not None
    return {"import_s": t1 - t0, "load_s": t2 - t1}


# what -> (uses mechscope?, operation(model_or_pair, ids) -> (result, bytes held by the result's tensors))
def _hf_forward(pair, ids):
    out = pair[0](ids, use_cache=False)
    return common.tensor_bytes([out.logits])


def _ms_resid30(model, ids):
    out = model.run(ids, read=common.resid_post_sites())
    return common.tensor_bytes(out.cache.values())


def _ms_all(model, ids):
    out = model.run(ids, read=model.site_names())
    return common.tensor_bytes(out.cache.values())


def _hf_all(pair, ids):
    """Every site mechscope reads, saved with hand-written PyTorch hooks on the HF modules: the same tensors
    (embeddings; per layer resid_pre, pattern, z, attn_out, resid_mid, neurons, mlp_out, resid_post; the
    final norm's output), with HF's eager attention returning the patterns, and the base model's forward
    (no unembedding, as a user who wants activations would call it)."""
    hf = pair[0]
    hf.set_attn_implementation("eager")
    saved, pre = [], {}

    def output(module, args, out):
        saved.append(out[0] if isinstance(out, tuple) else out)

    def first_input(module, args, kwargs):
        saved.append(args[0] if args else kwargs["hidden_states"])

    def layer_input(i):
        def hook(module, args, kwargs):
            pre[i] = args[0] if args else kwargs["hidden_states"]
            saved.append(pre[i])

        return hook

    def attention(i):
        def hook(module, args, out):
            saved.extend([out[1], out[0], pre[i] + out[0]])  # pattern, attn_out, resid_mid

        return hook

    base = hf.model
    handles = [base.embed_tokens.register_forward_hook(output), base.norm.register_forward_hook(output)]
    for i, layer in enumerate(base.layers):
        handles += [
            layer.register_forward_pre_hook(layer_input(i), with_kwargs=True),
            layer.self_attn.o_proj.register_forward_pre_hook(first_input, with_kwargs=True),
            layer.self_attn.register_forward_hook(attention(i)),
            layer.mlp.down_proj.register_forward_pre_hook(first_input, with_kwargs=True),
            layer.mlp.register_forward_hook(output),
            layer.register_forward_hook(output),
        ]
    base(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    assert len(saved) == 2 + 8 * common.N_LAYERS, len(saved)
    return common.tensor_bytes(saved)


def _ms_lens(model, ids):
    import mechscope

    lens = mechscope.logit_lens(model, common.LENS_PROMPT, [common.LENS_TARGET], k=common.LENS_K)
    return common.tensor_bytes([lens.probs, lens.ranks, lens.top_ids, lens.top_probs])


def _hf_lens(pair, ids):
    out = common.hand_lens(*pair)
    return common.tensor_bytes([out["probs"], out["ranks"], out["top_ids"], out["top_probs"]])


OPERATIONS = {
    "hf_forward": (False, _hf_forward),
    "ms_resid30": (True, _ms_resid30),
    "ms_all": (True, _ms_all),
    "hf_all": (False, _hf_all),
    "ms_lens": (True, _ms_lens),
    "hf_lens": (False, _hf_lens),
}


def measure_rss(what: str, folder: str, ids_file: str) -> dict:
    import torch

    uses_mechscope, operation = OPERATIONS[what]
    rss_start = common.rss_bytes()
    model = _ms_model() if uses_mechscope else _hf_model(folder)
    ids = torch.load(ids_file, weights_only=True)
    rss_loaded = common.rss_bytes()
    # from_pretrained leaves the weights in a lazily read mapping: read them all, so that the increment
    # below is the operation's own memory and not the weights paging in on first use.
    hf = model.hf if uses_mechscope else model[0]
    with torch.inference_mode():
        checksum = sum(float(p.float().sum()) for p in hf.parameters())
    rss_weights = common.rss_bytes()
    peak_load = common.hwm_bytes()
    ru_maxrss_load = common.peak_rss_bytes()
    hwm_reset = common.reset_hwm()
    with torch.inference_mode():
        held = operation(model, ids)
    peak_op = common.hwm_bytes()
    return {
        "rss_start": rss_start,
        "rss_loaded": rss_loaded,
        "rss_weights": rss_weights,
        "peak_load": peak_load,
        "peak_op": peak_op,
        "peak_process": max(peak_load, peak_op),
        "ru_maxrss": max(ru_maxrss_load, common.peak_rss_bytes()),
        "hwm_reset": hwm_reset,
        "result_bytes": held,
        "checksum": checksum,
    }


def main(argv: list[str]) -> None:
    op, folder, ids_file = argv
    if op == "load":
        result = time_load(folder)
    elif op == "hf_load":
        result = time_hf_load(folder)
    elif op.startswith("rss:"):
        result = measure_rss(op.removeprefix("rss:"), folder, ids_file)
    else:
        raise SystemExit(f"unknown op {op!r}")
    result["child_s"] = time.perf_counter() - T_START
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
