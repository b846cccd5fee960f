"""Our circuit-tracer files read by circuit-tracer itself: `.venv/bin/python bench/peers/circuit_tracer_check.py`.

circuit-tracer 0.5.0 pins transformers <= 4.57.3, which cannot live beside mechscope (transformers 5), nor in the
peers' venv (SAELens 6 and nnsight want 5 there). Its transcoder and CLT loaders need only torch, safetensors,
numpy and huggingface_hub, so it is installed into the peers' venv without its dependencies, and its own
`load_clt` and `load_transcoder_set` read the folders mechscope writes. Then:

1. (mechscope's venv) random dictionaries with normalisation scales not yet folded: cross-layer transcoders
   (JumpReLU, ReLU) and per-layer transcoder sets (ReLU, JumpReLU, JumpReLU with a skip connection) are
   written with `export_clt` / `export_transcoder_set`, with inputs and mechscope's features and outputs;
2. (the peers' venv, `--theirs DIR`) circuit-tracer loads each folder and computes its features and outputs;
3. (mechscope's venv) the largest differences are written to bench/out/circuit_tracer.json and to the
   circuit-tracer section of bench/RESULTS.md.

Not part of `make test` (it needs the peers' venv); `make bench-peers` runs it after the peers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
REQUIREMENT = "circuit-tracer==0.5.0"
LAYERS, D, PER_LAYER, TOKENS = 3, 64, 96, 40
MARK_BEGIN = "<!-- circuit-tracer section: begin (regenerated alone by `bench/peers/circuit_tracer_check.py`) -->"
MARK_END = "<!-- circuit-tracer section: end -->"
CASES = {  # name: (kind, activation, skip)
    "clt-jumprelu": ("clt", "jumprelu", False),
    "clt-relu": ("clt", "relu", False),
    "set-relu": ("set", "relu", False),
    "set-jumprelu": ("set", "jumprelu", False),
    "set-jumprelu-skip": ("set", "jumprelu", True),
}


def _random(d, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        if hasattr(d.activation, "log_threshold"):
            d.activation.log_threshold.copy_((0.5 * torch.rand(d.d_sae, generator=gen)).log())
        d.mask_decoder_(d.W_dec.data)


def ours(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from mechscope.dictionaries import DictConfig, Dictionary
    from mechscope.dictionaries.formats import export_clt, export_transcoder_set

    x = torch.randn(TOKENS, LAYERS, D, generator=torch.Generator().manual_seed(0))
    tensors = {"x": x}
    for i, (name, (kind, activation, skip)) in enumerate(CASES.items()):
        reads = [f"blocks.{n}.hook_resid_mid" for n in range(LAYERS)]
        writes = [f"blocks.{n}.hook_mlp_out" for n in range(LAYERS)]
        scales = {"input_scale": [1.5 + n for n in range(LAYERS)], "output_scale": [0.5 + 0.25 * n for n in range(LAYERS)]}
        if kind == "clt":
            d = Dictionary(DictConfig(reads, writes, D, D, PER_LAYER * LAYERS, activation, layered=True, **scales)).eval()
            _random(d, i)
            export_clt(d, folder / name)
            tensors[f"{name}.features"] = d.encode_dense(x)
            tensors[f"{name}.outputs"] = d(x).recon
            continue
        features, outputs, dictionaries = [], [], []
        for n in range(LAYERS):
            own = {"input_scale": [scales["input_scale"][n]], "output_scale": [scales["output_scale"][n]]}
            d = Dictionary(DictConfig([reads[n]], [writes[n]], D, D, PER_LAYER, activation, skip_connection=skip, **own)).eval()
            _random(d, 10 * i + n)
            dictionaries.append(d)
            features.append(d.encode_dense(x[:, n]))
            outputs.append(d.decode(d.encode(x[:, n]), x[:, n]))
        export_transcoder_set(dictionaries, folder / name)
        tensors[f"{name}.features"] = torch.cat(features, dim=-1)
        tensors[f"{name}.outputs"] = torch.stack(outputs, dim=1)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(folder / "ours.safetensors"))


def theirs(folder: Path) -> None:
    """In the peers' venv: circuit-tracer's own loaders and forward passes on the same inputs."""
    import torch
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from safetensors.torch import load_file, save_file

    x = load_file(str(folder / "ours.safetensors"))["x"]
    cpu, out = torch.device("cpu"), {}
    for name, (kind, _, _) in CASES.items():
        with torch.no_grad():
            if kind == "clt":
                clt = load_clt(str(folder / name), device=cpu, dtype=torch.float32, lazy_decoder=False)
                features = clt.encode(x.transpose(0, 1))  # [layers, tokens, d_tc]
                pos, layer, _, vectors, _ = clt.select_decoder_vectors(features)
                outputs = clt.compute_reconstruction(pos, layer, vectors)  # [layers, tokens, d]
                out[f"{name}.features"] = features.transpose(0, 1).reshape(TOKENS, -1)
                out[f"{name}.outputs"] = outputs.transpose(0, 1)
            else:
                paths = {n: str(folder / name / f"layer_{n}.safetensors") for n in range(LAYERS)}
                hooks = {"feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}
                ts = load_transcoder_set(
                    paths, scan=None, **hooks, device=cpu, dtype=torch.float32, lazy_encoder=False, lazy_decoder=False
                )
                tcs = [ts.transcoders[n] for n in range(LAYERS)]
                out[f"{name}.features"] = torch.cat([tc.encode(x[:, n]) for n, tc in enumerate(tcs)], dim=-1)
                out[f"{name}.outputs"] = torch.stack([tc(x[:, n]) for n, tc in enumerate(tcs)], dim=1)
    save_file({k: v.contiguous().float() for k, v in out.items()}, str(folder / "theirs.safetensors"))


def compare(folder: Path) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(str(folder / "ours.safetensors")), load_file(str(folder / "theirs.safetensors"))
    result = {}
    for name in CASES:
        f, o = a[f"{name}.features"], a[f"{name}.outputs"]
        result[name] = {
            "features_max_abs_diff": float((f - b[f"{name}.features"]).abs().max()),
            "outputs_max_abs_diff": float((o - b[f"{name}.outputs"]).abs().max()),
            "active_fraction": float((f > 0).float().mean()),
            "output_scale": float(o.abs().max()),
        }
    return result


def render(result: dict, stamp: str) -> str:
    lines = [MARK_BEGIN, "## Our circuit-tracer files, read by circuit-tracer", "", stamp, ""]
    lines += [
        f"{REQUIREMENT} (installed without its dependencies into the peers' venv: it pins transformers <= 4.57.3) loads",
        "each folder mechscope wrote with its own `load_clt` / `load_transcoder_set`, and computes features and outputs",
        f"of {TOKENS} random inputs at each of {LAYERS} layers (d = {D}, {PER_LAYER} latents per layer; scales not yet folded",
        "on our side, so the folding is checked too).",
        "",
        "| folder | features: max abs diff | outputs: max abs diff | largest output | active features |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["cases"].items():
        lines.append(
            f"| {name} | {r['features_max_abs_diff']:.1e} | {r['outputs_max_abs_diff']:.1e} | {r['output_scale']:.1f} | "
            f"{100 * r['active_fraction']:.0f} % |"
        )
    lines += [
        "",
        "TopK transcoder sets and TopK CLTs are refused by the export: circuit-tracer would read them as ReLU.",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--theirs":
        theirs(Path(sys.argv[2]))
        return
    import common
    import install

    python, failed = install.ensure(common.log)
    ok, why = install._pip(python, "--no-deps", REQUIREMENT)
    if failed or not ok:
        raise SystemExit(f"the peers' venv is not ready: {failed or why}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ours(folder)
        subprocess.run([python, __file__, "--theirs", str(folder)], check=True)
        result = {"cases": compare(folder), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (common.BENCH_DIR / "out" / "circuit_tracer.json").write_text(json.dumps(result, indent=1))
    section = render(result, f"Measured {result['date']}, mechscope commit {common.machine_info()['mechscope commit']}.")
    results = common.BENCH_DIR / "RESULTS.md"
    results.write_text(common.splice_section(results.read_text(), section, MARK_BEGIN, MARK_END))
    print(section)


if __name__ == "__main__":
    main()
