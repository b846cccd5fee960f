"""Per-layer transcoder sets and cross-layer transcoders in circuit-tracer's layout, read and written.

## Per-layer transcoder sets

A folder holds `config.yaml` and one `layer_{i}.safetensors` per layer 0..n-1 (circuit-tracer wants
every layer from 0 covered), each with

    W_enc [d_tc, d_model]   b_enc [d_tc]   W_dec [d_tc, d_model]   b_dec [d_model]
    activation_function.threshold [d_tc]   (JumpReLU)
    W_skip [d_model, d_model]              (skip transcoders: x̂ gains x W_skipᵀ, the transpose of ours)

and computes f = act(x W_encᵀ + b_enc) (the input never loses b_dec), x̂ = f W_dec + b_dec, where
x is read at `feature_input_hook` and x̂ written at `feature_output_hook` of the config (hook names
of one block, e.g. `hook_resid_mid` or `ln2.hook_normalized`, and `hook_mlp_out`). `W_enc` is stored
transposed with respect to SAELens and to us. ReLU layers have no threshold. circuit-tracer's loader
(0.5.0) reads every layer without a threshold as ReLU, whatever its config says, so a TopK set is
refused rather than written as one it would misread (a set that says `activation: topk` and `k` is
still read here); BatchTopK transcoders are written as JumpReLU with their
one inference threshold repeated per latent, as for SAELens. A threshold at or below 0 reads as
the smallest positive one (our JumpReLU keeps positive values only).

## Cross-layer transcoders
A folder holds, per layer i = 0..n−1 (again every layer from 0), `W_enc_{i}.safetensors` with

    W_enc_{i} [d_tc, d_model]   b_enc_{i} [d_tc]   b_dec_{i} [d_model]   threshold_{i} [d_tc]  (JumpReLU)

and `W_dec_{i}.safetensors` with `W_dec_{i}` [d_tc, n − i, d_model]: the decoders of layer i's features
into the MLP outputs of layers i, i+1, ..., n−1. The features of layer i are f_i = act(x_i W_enc_iᵀ +
b_enc_i), x_i read at `feature_input_hook` of layer i, and layer j's output is Σ_{i≤j} f_i W_dec_i[:, j−i]
+ b_dec_j. We add a `config.yaml` (`model_kind: cross_layer_transcoder` and the two hooks), which
circuit-tracer's own reader does not need. Its CLTs are JumpReLU or ReLU: a TopK CLT is refused
rather than written as a ReLU one it would misread. In mechscope the features of layer i are numbered
i·d_tc .. (i+1)·d_tc − 1.
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
                f"a {cfg.kind} cannot be exported as a circuit-tracer transcoder set: a set holds one-layer transcoders only"
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
    (hook_in, hook_out), (activation, _) = hooks.pop(), activations.pop()
    if activation == "topk":
        raise MechscopeError(
            "TopK transcoders cannot be exported for circuit-tracer: its loader reads a layer without a threshold "
            "as ReLU, so it would misread them"
        )
    config = {
        "model_name": model_name if model_name is not None else dictionaries[0].cfg.model,
        "model_kind": "transcoder_set",
        "feature_input_hook": hook_in,
        "feature_output_hook": hook_out,
        "scan": None,
        "exported_by": "mechscope",
        "transcoders": [f"layer_{i}.safetensors" for i in range(len(by_layer))],
    }
    if activation == "relu":
        config["activation"] = activation
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
    if is_clt_folder(folder):
        raise MechscopeError(
            f"{str(folder)!r} holds a circuit-tracer cross-layer transcoder, not per-layer transcoders: import it as a CLT"
        )
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


def is_clt_folder(folder: Path) -> bool:
    """Whether `folder` holds circuit-tracer's cross-layer transcoder files (`W_enc_0.safetensors`, ...)."""
    return (Path(folder) / "W_enc_0.safetensors").is_file()


def is_transcoder_set_folder(folder: Path) -> bool:
    """Whether `folder` holds a circuit-tracer per-layer transcoder set (`config.yaml`, `layer_0.safetensors`, ...)."""
    return (Path(folder) / CONFIG).is_file() and (Path(folder) / "layer_0.safetensors").is_file()


def export_clt(dictionary: Dictionary, folder: str | Path, model_name: str | None = None) -> Path:
    """Write a cross-layer transcoder (normalisation folded in) as circuit-tracer's CLT files, replacing
    `folder` atomically. Raises `MechscopeError` (one line) for another kind, a CLT that does not start at
    layer 0 or skips one, sites of other blocks, or TopK latents (circuit-tracer's CLTs are JumpReLU or ReLU)."""
    cfg = dictionary.cfg
    if not cfg.layered:
        raise MechscopeError(f"a {cfg.kind} cannot be exported as a circuit-tracer cross-layer transcoder: give a clt")
    reads = [_layer_and_hook(s) for s in cfg.read_sites]
    writes = [_layer_and_hook(s) for s in cfg.write_sites]
    layers = [layer for layer, _ in reads]
    if layers != list(range(len(layers))) or [layer for layer, _ in writes] != layers:
        raise MechscopeError(
            f"circuit-tracer's cross-layer transcoders cover every layer from 0: this one covers layers {layers}"
        )
    if len({hook for _, hook in reads}) != 1 or len({hook for _, hook in writes}) != 1:
        raise MechscopeError("the CLT reads or writes different hooks at different layers: circuit-tracer's share one pair")
    if cfg.activation not in ("jumprelu", "relu"):
        raise MechscopeError(
            f"a {cfg.activation} CLT cannot be exported for circuit-tracer: its CLTs are JumpReLU or ReLU "
            "and it would read TopK latents as ReLU ones"
        )
    n, block, D = len(layers), dictionary.d_sae // len(layers), cfg.d_out
    d = dictionary.folded()
    config = {
        "model_name": model_name if model_name is not None else cfg.model,
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": reads[0][1],
        "feature_output_hook": writes[0][1],
        "scan": None,
        "exported_by": "mechscope",
        "n_layers": n,
    }
    with atomic_folder(folder) as tmp:
        W_dec = d.W_dec.detach().view(n, block, n, D)
        for i in range(n):
            rows = slice(i * block, (i + 1) * block)
            encoder = {f"W_enc_{i}": d.W_enc[:, rows].T, f"b_enc_{i}": d.b_enc[rows], f"b_dec_{i}": d.b_dec.view(n, D)[i]}
            if cfg.activation == "jumprelu":
                encoder[f"threshold_{i}"] = d.activation.threshold[rows]
            save_file({k: v.detach().float().contiguous().cpu() for k, v in encoder.items()}, str(tmp / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": W_dec[i, :, i:].float().contiguous().cpu()}, str(tmp / f"W_dec_{i}.safetensors"))
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(folder)


def import_clt(folder: str | Path) -> Dictionary:
    """The cross-layer transcoder in a circuit-tracer CLT folder: layer i's features read
    `blocks.i.<feature_input_hook>` and write `blocks.j.<feature_output_hook>` for j >= i (hooks from
    `config.yaml` when there is one, else hook_resid_mid and hook_mlp_out, circuit-tracer's defaults)."""
    folder = Path(folder)
    if not is_clt_folder(folder):
        if is_transcoder_set_folder(folder):
            raise MechscopeError(f"{str(folder)!r} holds circuit-tracer per-layer transcoders, not a cross-layer transcoder")
        raise MechscopeError(f"{str(folder)!r} holds no circuit-tracer cross-layer transcoder: it has no W_enc_0.safetensors")
    config = {}
    if (folder / CONFIG).is_file():
        try:
            config = yaml.safe_load((folder / CONFIG).read_text()) or {}
        except yaml.YAMLError as err:
            raise MechscopeError(f"{str(folder / CONFIG)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(config, dict) or config.get("model_kind", "cross_layer_transcoder") != "cross_layer_transcoder":
            raise MechscopeError(f"{str(folder / CONFIG)!r} does not describe a cross-layer transcoder")
    n = 0
    while (folder / f"W_enc_{n}.safetensors").is_file():
        n += 1
    try:
        with safe_open(str(folder / "W_enc_0.safetensors"), "pt") as f:
            block, D = f.get_slice("W_enc_0").get_shape()
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise MechscopeError(
            f"{str(folder / 'W_enc_0.safetensors')!r} is unreadable or has no W_enc_0: {str(err)[:100]}"
        ) from None
    parts = []
    for i in range(n):
        shapes = {f"W_enc_{i}": (block, D), f"b_enc_{i}": (block,), f"b_dec_{i}": (D,), f"threshold_{i}": (block,)}
        encoder = read_tensors(folder / f"W_enc_{i}.safetensors", shapes, optional=(f"threshold_{i}",))
        decoder = read_tensors(folder / f"W_dec_{i}.safetensors", {f"W_dec_{i}": (block, n - i, D)})
        parts.append((encoder, decoder[f"W_dec_{i}"]))
    jump = [f"threshold_{i}" in encoder for i, (encoder, _) in enumerate(parts)]
    if any(jump) and not all(jump):
        raise MechscopeError(f"{str(folder)!r} has thresholds for some layers only: a CLT's layers share one activation")
    hook_in, hook_out = config.get("feature_input_hook", "hook_resid_mid"), config.get("feature_output_hook", "hook_mlp_out")
    reads, writes = [f"blocks.{i}.{hook_in}" for i in range(n)], [f"blocks.{i}.{hook_out}" for i in range(n)]
    activation, model = "jumprelu" if all(jump) else "relu", str(config.get("model_name") or "")
    cfg = DictConfig(reads, writes, D, D, n * block, activation, {}, layered=True, model=model)
    d = Dictionary(cfg)
    with torch.no_grad():
        W_dec = d.W_dec.view(n, block, n, D)
        for i, (encoder, decoder) in enumerate(parts):
            rows = slice(i * block, (i + 1) * block)
            d.W_enc[:, rows] = encoder[f"W_enc_{i}"].T
            d.b_enc[rows] = encoder[f"b_enc_{i}"]
            d.b_dec.view(n, D)[i] = encoder[f"b_dec_{i}"]
            W_dec[i, :, i:] = decoder
            if all(jump):
                d.activation.log_threshold[rows] = encoder[f"threshold_{i}"].clamp_min(torch.finfo(torch.float32).tiny).log()
    return d.eval()
