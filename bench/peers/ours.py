"""mechscope's side of the peers run (mechscope's venv): `python bench/peers/ours.py OUT_DIR`.

1. Writes the shared inputs into OUT_DIR: the 8 x 128 token batch of the main benchmark (`ids.pt`),
   contexts of the built-in corpus for SAE training (`sae_tokens.pt`), their layer-15 residual stream read
   by mechscope (`sae_acts.pt`), and mechscope's own values on those inputs (`reference.pt`), against which
   every peer's values are checked.
2. Times, in this process, mechscope's reads and logit lens against a plain HF model loaded from the same
   folder (the baseline every figure is a ratio to), as the peers' venv does for the peers.

Prints one JSON line: the timings and the model folder.
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

FORWARD_REPEATS = 1 if tools.QUICK else 5  # clean 8 x 128 forwards per variant
LENS_REPEATS = 1 if tools.QUICK else 20  # clean calls of the 6-token lens per variant
SAE_CONTEXTS = 1024  # contexts of 128 tokens handed to the SAE trainers (131,072 tokens)
SAE_HARVEST_CONTEXTS = 128  # of which the first 128 (16,384 tokens) are read once for training-only runs
SAE_LAYER = 15
CHECK_LAYERS = (0, 15, 29)  # resid_post layers every peer is compared on
CHECK_SITES = (  # one site of each other kind, compared on every peer that reads all sites
    "hook_embed",
    "blocks.3.attn.hook_pattern",
    "blocks.10.attn.hook_z",
    "blocks.12.hook_attn_out",
    "blocks.25.hook_resid_mid",
    "blocks.20.mlp.hook_post",
    "blocks.7.hook_mlp_out",
    "ln_final.hook_normalized",
)


def write_inputs(model, out: Path) -> None:
    """The token batch, the SAE corpus contexts and their layer-15 activations."""
    from mechscope.data import corpus, pack

    ids = common.batch_ids(model.tokenizer)
    torch.save(ids, out / "ids.pt")
    batches = pack(corpus(), model.tokenizer, ctx_len=common.SEQ, seed=0, max_contexts=SAE_CONTEXTS)
    tokens = torch.cat([b.tokens for b in batches])
    if tokens.shape[0] < SAE_CONTEXTS:
        raise RuntimeError(f"the built-in corpus gave {tokens.shape[0]} contexts, fewer than {SAE_CONTEXTS}")
    torch.save(tokens, out / "sae_tokens.pt")
    site = f"blocks.{SAE_LAYER}.hook_resid_post"
    with torch.inference_mode():
        acts = [model.run(chunk, read=[site]).cache[site] for chunk in tokens[:SAE_HARVEST_CONTEXTS].split(common.BATCH)]
    torch.save(torch.cat(acts).flatten(0, 1).contiguous(), out / "sae_acts.pt")


def write_reference(model, ids, out: Path) -> None:
    """mechscope's resid_post at CHECK_LAYERS, CHECK_SITES, last-position log-probs and the logit lens."""
    import mechscope

    resid = [f"blocks.{layer}.hook_resid_post" for layer in CHECK_LAYERS]
    with torch.inference_mode():
        run = model.run(ids, read=resid + list(CHECK_SITES), logits=True)
        lens = mechscope.logit_lens(model, common.LENS_PROMPT, [common.LENS_TARGET], k=common.LENS_K)
    ref = {name: run.cache[name] for name in resid + list(CHECK_SITES)}
    ref["final_logprobs"] = run.logits[:, -1].float().log_softmax(-1)
    ref["lens_probs"], ref["lens_ranks"] = lens.probs[..., 0], lens.ranks[..., 0]
    ref["lens_top_ids"] = lens.top_ids
    ref["final_norm_weight"] = model.hf.model.norm.weight.detach().clone()
    torch.save(ref, out / "reference.pt")


def time_ours(model, pristine, ids) -> dict:
    """mechscope's figures against a plain HF model, interleaved as in the main benchmark."""
    import mechscope

    resid, every = common.resid_post_sites(), model.site_names()
    with torch.inference_mode():
        sizes = {
            "resid30_bytes": common.tensor_bytes(model.run(ids, read=resid).cache.values()),
            "sites_bytes": common.tensor_bytes(model.run(ids, read=every).cache.values()),
            "n_sites": len(every),
        }
        fns = {
            "hf": lambda: pristine(ids, use_cache=False),
            "ms_resid30": lambda: model.run(ids, read=resid),
            "ms_sites": lambda: model.run(ids, read=every),
            "ms_sites_logits": lambda: model.run(ids, read=every, logits=True),
        }
        log(f"mechscope: {len(fns)} variants x {FORWARD_REPEATS}+ forwards of {tuple(ids.shape)}, interleaved")
        forward = common.interleaved(fns, FORWARD_REPEATS, max_rounds=3 * FORWARD_REPEATS, budget_s=150, settle=True)
        lens_fns = {
            "ms_lens": lambda: mechscope.logit_lens(model, common.LENS_PROMPT, [common.LENS_TARGET], k=common.LENS_K),
            "hand_lens": lambda: common.hand_lens(pristine, model.tokenizer),
        }
        log(f"mechscope: logit lens vs hand-written, {LENS_REPEATS}+ each")
        common.wait_quiet("the lens")
        lens = common.interleaved(lens_fns, LENS_REPEATS, warmup=3, budget_s=40)
    return {"forward": forward, "lens": lens, **sizes}


def main(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    import mechscope
    from mechscope.models.load import converted_gguf, default_gguf

    out.mkdir(parents=True, exist_ok=True)
    model = mechscope.load()
    folder = str(converted_gguf(default_gguf()))
    log(f"mechscope side: inputs and reference values into {out}")
    write_inputs(model, out)
    ids = torch.load(out / "ids.pt", weights_only=True)
    write_reference(model, ids, out)
    pristine = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result = {"folder": folder, **time_ours(model, pristine, ids)}
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
