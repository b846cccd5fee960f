"""Per-layer transcoder sets in circuit-tracer's layout, read and written.

A folder holds `config.yaml` and one `layer_{i}.safetensors` per layer 0..n-1 (circuit-tracer wants
every layer from 0 covered), each with

    W_enc [d_tc, d_model]   b_enc [d_tc]   W_dec [d_tc, d_model]   b_dec [d_model]
    activation_function.threshold [d_tc]   (JumpReLU)
    W_skip [d_model, d_model]              (skip transcoders: x̂ gains x W_skipᵀ, the transpose of ours)

and computes f = act(x W_encᵀ + b_enc) (the input never loses b_dec), x̂ = f W_dec + b_dec, where
x is read at `feature_input_hook` and x̂ written at `feature_output_hook` of the config (hook names
of one block, e.g. `hook_resid_mid` or `ln2.hook_normalized`, and `hook_mlp_out`). `W_enc` is stored
transposed with respect to SAELens and to us. ReLU layers have no threshold; TopK sets give
`activation: topk` and `k` in the config; BatchTopK transcoders are written as JumpReLU with their
one inference threshold repeated per latent, as for SAELens. A threshold at or below 0 reads as
the smallest positive one (our JumpReLU keeps positive values only).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from mechscope.dictionaries.dictionary import DictConfig, Dictionary
from mechscope.dictionaries.formats.files import read_tensors
from mechscope.dictionaries.formats.saelens import _thresholds
from mechscope.errors import MechscopeError
from mechscope.runtime import atomic_folder

CONFIG = "config.yaml"
THRESHOLD = "activation_function.threshold"
_SITE = re.compile(r"blocks\.(\d+)\.(.+)")


def _layer_and_hook(site: str) -> tuple[int, str]:
    match = _SITE.fullmatch(site)
    if not match:
        raise MechscopeError(f"site {site!r} is not a block's site: circuit-tracer's transcoders read and write blocks.L.* sites")
    return int(match[1]), match[2]


def export_transcoder_set(dictionaries: list[Dictionary], folder: str | Path, model_name: str | None = None) -> Path:
    """Write per-layer transcoders (one per layer 0..n-1, in any order) as a circuit-tracer folder,
    normalisation folded in, replacing `folder` atomically. Raises `MechscopeError` (one line) for a
    dictionary that is no single-site transcoder, layers missing or repeated, hooks that differ
    between layers, or mixed activations."""
    if not dictionaries:
        raise MechscopeError("no transcoders to export")
    by_layer: dict[int, Dictionary] = {}
    hooks, activations = set(), set()
    for d in dictionaries:
        cfg = d.cfg
        if cfg.reconstructs or len(cfg.read_sites) != 1 or len(cfg.write_sites) != 1:
            raise MechscopeError(
                f"a {cfg.kind} cannot be exported as a circuit-tracer transcoder: it holds transcoders of one layer each"
            )
        (layer, hook_in), (layer_out, hook_out) = _layer_and_hook(cfg.read_sites[0]), _layer_and_hook(cfg.write_sites[0])
        if layer != layer_out:
            raise MechscopeError(f"the transcoder reading {cfg.read_sites[0]!r} writes another layer ({cfg.write_sites[0]!r})")
        if layer in by_layer:
            raise MechscopeError(f"two transcoders of layer {layer}: give one per layer")
        by_layer[layer] = d
        hooks.add((hook_in, hook_out))
        activations.add((cfg.activation if cfg.activation != "batchtopk" else "jumprelu", getattr(d.activation, "k", None)))
    if sorted(by_layer) != list(range(len(by_layer))):
        raise MechscopeError(f"circuit-tracer needs a transcoder for every layer from 0: these cover layers {sorted(by_layer)}")
    if len(hooks) != 1 or len(activations) != 1:
        raise MechscopeError("the transcoders differ in the sites they read or write, or in activation: a set shares them")
    (hook_in, hook_out), (activation, k) = hooks.pop(), activations.pop()
    config = {
        "model_name": model_name if model_name is not None else dictionaries[0].cfg.model,
        "model_kind": "transcoder_set",
        "feature_input_hook": hook_in,
        "feature_output_hook": hook_out,
        "exported_by": "mechscope",
        "transcoders": [f"layer_{i}.safetensors" for i in range(len(by_layer))],
    }
    if activation in ("relu", "topk"):
        config["activation"] = activation
    if activation == "topk":
        config["k"] = int(k)
    with atomic_folder(folder) as tmp:
        for layer, dictionary in by_layer.items():
            d = dictionary.folded()
            tensors = {"W_enc": d.W_enc.T, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
            if activation == "jumprelu":
                tensors[THRESHOLD] = _thresholds(d)
            if d.W_skip is not None:
                tensors["W_skip"] = d.W_skip.T
            save_file(
                {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp / f"layer_{layer}.safetensors")
            )
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(folder)


def import_transcoder_set(folder: str | Path) -> list[Dictionary]:
    """The per-layer transcoders of a circuit-tracer folder, layer 0 first, each reading
    `blocks.L.<feature_input_hook>` and writing `blocks.L.<feature_output_hook>`."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise MechscopeError(f"{str(folder)!r} has no {CONFIG}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise MechscopeError(f"{str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict) or not isinstance(config.get("transcoders"), list) or not config["transcoders"]:
        raise MechscopeError(f"{str(path)!r} lists no transcoders")
    if config.get("model_kind", "transcoder_set") != "transcoder_set":
        raise MechscopeError(f"{str(path)!r} holds a {config['model_kind']!r}, not per-layer transcoders (transcoder_set)")
    hook_in, hook_out = config.get("feature_input_hook", "hook_resid_mid"), config.get("feature_output_hook", "hook_mlp_out")
    out = []
    for layer, name in enumerate(config["transcoders"]):
        file = folder / Path(str(name)).name
        out.append(_read_layer(file, layer, hook_in, hook_out, config))
    return out


def _read_layer(file: Path, layer: int, hook_in: str, hook_out: str, config: dict) -> Dictionary:
    try:
        with safe_open(str(file), "pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as err:  # safetensors raises its own error types for damaged files
        if not file.is_file():
            raise MechscopeError(f"{str(file.parent)!r} has no {file.name}") from None
        raise MechscopeError(f"{str(file)!r} is damaged or truncated: {str(err).splitlines()[0][:120]}") from None
    if "W_enc" not in shapes or len(shapes["W_enc"]) != 2:
        raise MechscopeError(f"{str(file)!r} has no W_enc [d_tc, d_model]")
    F, d_in = shapes["W_enc"]
    d_out = shapes.get("b_dec", (d_in,))[0]
    skip = "W_skip" in shapes
    expected = {
        "W_enc": (F, d_in),
        "b_enc": (F,),
        "W_dec": (F, d_out),
        "b_dec": (d_out,),
        THRESHOLD: (F,),
        "W_skip": (d_out, d_in),
    }
    tensors = read_tensors(file, expected, optional=(THRESHOLD, "W_skip"))
    if config.get("activation") == "topk":
        activation, options = "topk", {"k": int(config.get("k", 0))}
    elif THRESHOLD in tensors:
        activation, options = "jumprelu", {}
    else:
        activation, options = "relu", {}
    cfg = DictConfig([f"blocks.{layer}.{hook_in}"], [f"blocks.{layer}.{hook_out}"], d_in, d_out, F, activation, options,
                     apply_b_dec_to_input=False, skip_connection=skip, model=str(config.get("model_name", "")))  # fmt: skip
    d = Dictionary(cfg)
    with torch.no_grad():
        d.W_enc.copy_(tensors["W_enc"].T)
        d.b_enc.copy_(tensors["b_enc"])
        d.W_dec.copy_(tensors["W_dec"])
        d.b_dec.copy_(tensors["b_dec"])
        if skip:
            d.W_skip.copy_(tensors["W_skip"].T)
        if activation == "jumprelu":
            d.activation.log_threshold.copy_(tensors[THRESHOLD].clamp_min(torch.finfo(torch.float32).tiny).log())
    return d.eval()
