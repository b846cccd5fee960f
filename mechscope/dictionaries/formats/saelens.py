"""Dictionary folders in SAELens's layout (its 6.x releases), read and written.

A folder holds `cfg.json` and `sae_weights.safetensors` with

    W_enc [d_in, d_sae]   b_enc [d_sae]   W_dec [d_sae, d_out]   b_dec [d_out]
    threshold [d_sae]     (the JumpReLU architectures)
    W_skip [d_out, d_in]  (skip transcoders: x̂ gains x W_skipᵀ, so it is the transpose of ours)

and computes f = act((x - b_dec·[apply_b_dec_to_input]) W_enc + b_enc), x̂ = f W_dec + b_dec: the same
formulas as `Dictionary`, one read site and one write site. The config's `architecture` names the
activation and kind (`ARCHITECTURES`); its `metadata.hook_name` (and `hook_name_out` for a
transcoder) are TransformerLens hook names, which are our site names.

Details that decide whether a file means what it says:

- The reader needs `dtype`, and takes a config without `metadata.sae_lens_version` for the older
  (pre-6) layout, which drops the nested metadata and the hook name with it. Exported configs carry both.
- `jumprelu` keeps a latent where its pre-activation z > θ, as ReLU(z)·[z > θ]; a θ below 0 acts as 0.
  BatchTopK dictionaries (Matryoshka ones included) are written as `jumprelu`, their one inference
  threshold repeated for every latent. `topk` with `rescale_acts_by_decoder_norm` ranks z·‖W_dec,i‖
  and decodes f/‖W_dec,i‖: reading it folds the norms into the encoder, which changes neither.
- `normalize_activations: expected_average_only_in` means training saw x·s, s = √d_in / E‖x‖. The
  trainer folds s into the weights at its final save, and inference treats the setting as the
  identity. A checkpoint saved before that keeps s in `activation_scaler.json` beside the weights;
  reading it folds s in (W_enc·s, W_dec/s, b_dec/s), which gives the activations the trainer saw.
  Per-token normalisations (`layer_norm`, `constant_norm_rescale`) are not a fixed change of the
  weights, and are refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from mechscope.dictionaries.dictionary import DictConfig, Dictionary
from mechscope.dictionaries.formats.files import config_int, read_json, read_tensors
from mechscope.errors import MechscopeError, one_of
from mechscope.runtime import atomic_folder

CONFIG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"
LAYOUT_VERSION = "6.0.0"
"""The SAELens release whose file layout exported configs follow (`metadata.sae_lens_version`)."""

ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    # architecture: (mechscope activation, transcoder, skip connection)
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "batchtopk": ("batchtopk", False, False),  # a training checkpoint: one scalar `topk_threshold`
    "matryoshka_batchtopk": ("batchtopk", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
_MLP_INPUT = re.compile(r"blocks\.(\d+)\.(ln2\.hook_normalized|hook_resid_mid|hook_mlp_in)")


def is_saelens_folder(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


# ---- export ------------------------------------------------------------------------------------


def export_saelens(
    dictionary: Dictionary, folder: str | Path, hook_name: str | None = None, model_name: str | None = None
) -> Path:
    """Write `dictionary` as a SAELens folder (normalisation folded in), replacing `folder` atomically.

    `hook_name` defaults to the site the dictionary reads, `model_name` to the model it was trained on.
    ReLU exports as `standard` (`transcoder`, `skip_transcoder`), TopK as `topk`, and JumpReLU and
    BatchTopK (Matryoshka too) as `jumprelu` (`jumprelu_transcoder`, `jumprelu_skip_transcoder`).

    >>> export_saelens(load_dictionary("runs/sae/dictionary"), "exported/sae")
    """
    d = dictionary.folded()
    cfg = d.cfg
    if len(cfg.read_sites) != 1 or len(cfg.write_sites) != 1:
        raise MechscopeError(
            f"a {cfg.kind} cannot be exported for SAELens: it has no {cfg.kind} format (a file holds one read, one write site)"
        )
    transcoder = not cfg.reconstructs
    if cfg.skip_connection and not transcoder:
        raise MechscopeError("an SAE with a skip connection cannot be exported for SAELens: only its transcoders have one")
    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    extra: dict = {}
    if cfg.activation == "relu":
        architecture = "skip_transcoder" if cfg.skip_connection else "transcoder" if transcoder else "standard"
    elif cfg.activation == "topk":
        if transcoder:
            raise MechscopeError("a TopK transcoder cannot be exported for SAELens: its transcoders are ReLU or JumpReLU")
        architecture, extra = "topk", {"k": d.activation.k, "rescale_acts_by_decoder_norm": False}
    elif cfg.activation in ("jumprelu", "batchtopk"):
        architecture = "jumprelu_skip_transcoder" if cfg.skip_connection else "jumprelu_transcoder" if transcoder else "jumprelu"
        tensors["threshold"] = _thresholds(d)
    else:
        raise MechscopeError(f"a {cfg.activation!r} dictionary has no SAELens architecture")
    if cfg.skip_connection:
        tensors["W_skip"] = d.W_skip.T
    metadata = {
        "sae_lens_version": LAYOUT_VERSION,
        "model_name": model_name if model_name is not None else cfg.model,
        "hook_name": hook_name if hook_name is not None else cfg.read_sites[0],
        "hook_head_index": None,
        "exported_by": "mechscope",
        "model_fingerprint": cfg.model_fingerprint,
    }
    if transcoder:
        metadata["hook_name_out"] = cfg.write_sites[0]
        extra["d_out"] = cfg.d_out
    config = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": metadata,
    }
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=1))
    return Path(folder)


def _thresholds(d: Dictionary) -> torch.Tensor:
    """[F] each latent's inference threshold: JumpReLU's own, or BatchTopK's one threshold repeated."""
    if d.cfg.activation == "jumprelu":
        return d.activation.threshold.detach()
    if torch.isnan(d.activation.threshold):
        raise MechscopeError("this BatchTopK dictionary has no inference threshold yet: train it before exporting")
    return d.activation.threshold.detach().expand(d.d_sae)


# ---- import ------------------------------------------------------------------------------------


def import_saelens(folder: str | Path, site: str | None = None, write_site: str | None = None) -> Dictionary:
    """The dictionary in a SAELens folder, reading raw activations at the site its config names.

    `site` gives the read site where the config has no hook name (or overrides it); `write_site` the
    site a transcoder writes where its config has no `hook_name_out` (one that reads an MLP's input,
    `blocks.L.ln2.hook_normalized` or `hook_resid_mid`, writes `blocks.L.hook_mlp_out`).
    Raises `MechscopeError` (one line, naming the file) for anything it cannot read exactly.
    """
    folder = Path(folder)
    path = folder / CONFIG
    raw = read_json(path)
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    architecture = _architecture(raw, path)
    activation, transcoder, skip = ARCHITECTURES[architecture]
    d_in, d_sae = config_int(raw, "d_in", path), config_int(raw, "d_sae", path)
    d_out = config_int(raw, "d_out", path) if transcoder else d_in
    read = site or metadata.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    if not read:
        raise MechscopeError(f"{str(path)!r} names no hook (metadata.hook_name): give the site it reads with site=")
    write = _write_site(read, write_site or metadata.get("hook_name_out"), path) if transcoder else read
    scale = _scale(raw, folder)

    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "scaling_factor": (d_sae,)}
    if activation == "jumprelu":
        shapes |= {"threshold": (d_sae,), "log_threshold": (d_sae,)}
    if activation == "batchtopk":
        shapes["topk_threshold"] = ()
    if skip:
        shapes["W_skip"] = (d_out, d_in)
    weights_path = folder / WEIGHTS
    optional = ("scaling_factor", "threshold", "log_threshold")
    tensors = read_tensors(weights_path, shapes, optional=optional)
    if "scaling_factor" in tensors and not bool((tensors.pop("scaling_factor") == 1).all()):
        raise MechscopeError(
            f"{str(weights_path)!r} holds a per-latent scaling_factor other than 1 (older fine-tuning), which is not read"
        )
    if activation == "jumprelu" and not {"threshold", "log_threshold"} & set(tensors):
        raise MechscopeError(f"{str(weights_path)!r} has no tensor 'threshold'")
    if raw.get("rescale_acts_by_decoder_norm"):
        _fold_decoder_norms(tensors)

    options = _activation_options(raw, activation, tensors, path)
    try:
        cfg = DictConfig(
            [read], [write], d_in, d_out, d_sae, activation, options,
            apply_b_dec_to_input=False if transcoder else bool(raw.get("apply_b_dec_to_input", True)),
            skip_connection=skip, input_scale=[scale], output_scale=[scale], matryoshka=_matryoshka(raw, d_sae),
            model=str(metadata.get("model_name") or raw.get("model_name") or ""),
            model_fingerprint=str(metadata.get("model_fingerprint") or ""),
        )  # fmt: skip
        dictionary = Dictionary(cfg)
    except MechscopeError as err:
        raise MechscopeError(f"{str(path)!r}: {err}") from None
    state = dictionary.state_dict()
    state |= {"W_enc": tensors["W_enc"], "b_enc": tensors["b_enc"], "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    if skip:
        state["W_skip"] = tensors["W_skip"].T
    if activation == "jumprelu":
        theta = tensors["threshold"] if "threshold" in tensors else tensors["log_threshold"].exp()
        state["activation.log_threshold"] = theta.double().clamp(min=0).log().float()  # θ < 0 keeps what θ = 0 keeps
    dictionary.load_state_dict(state)
    return dictionary.folded().eval().requires_grad_(False)


def _architecture(raw: dict, path: Path) -> str:
    """The config's architecture; configs of the older layout name TopK through their activation function."""
    name = raw.get("architecture")
    if name is None:
        activation = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
        name = {"topk": "topk", "relu": "standard"}.get(activation)
        if name is None:
            raise MechscopeError(f"{str(path)!r}: activation_fn {activation!r} has no mechscope activation: valid are relu, topk")
    if name not in ARCHITECTURES:
        raise MechscopeError(
            f"{str(path)!r}: architecture {name!r} cannot be read: valid architectures are {one_of(ARCHITECTURES)}"
        )
    return name


def _write_site(read: str, write: str | None, path: Path) -> str:
    if write:
        return write
    match = _MLP_INPUT.fullmatch(read)
    if match is None:
        raise MechscopeError(
            f"{str(path)!r} is a transcoder reading {read} with no hook_name_out: give the site it writes with write_site="
        )
    return f"blocks.{match.group(1)}.hook_mlp_out"


def _scale(raw: dict, folder: Path) -> float:
    """The input scale s training used that the weights do not include yet (1.0 when they do)."""
    mode = raw.get("normalize_activations")
    if mode is None or isinstance(mode, bool):  # the older layout says it with a bool
        mode = "expected_average_only_in" if mode else "none"
    if mode == "none":
        return 1.0
    if mode == "covariance_whitening":
        if (folder / "activation_whitening.safetensors").exists():
            raise MechscopeError(
                f"{str(folder)!r} still holds its whitening (activation_whitening.safetensors): fold it in first"
            )
        return 1.0
    if mode != "expected_average_only_in":
        raise MechscopeError(
            f"{str(folder / CONFIG)!r}: normalize_activations={mode!r} normalises each token at run time, "
            "which a mechscope dictionary cannot express: valid are none, expected_average_only_in"
        )
    if not (folder / SCALER).is_file():
        return 1.0  # folded at the final save: the identity, as at SAELens inference
    scaler = read_json(folder / SCALER)
    if scaler.get("has_whitening"):
        raise MechscopeError(f"{str(folder / SCALER)!r} keeps a whitening beside the weights: fold it in first")
    s = scaler.get("scaling_factor")
    if s is None:
        return 1.0
    if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
        raise MechscopeError(f"{str(folder / SCALER)!r}: scaling_factor={s!r} is invalid: it must be a positive number")
    return float(s)


def _fold_decoder_norms(tensors: dict) -> None:
    """Rank z·‖W_dec,i‖ and decode f/‖W_dec,i‖ -> encoder scaled by the norms, decoder rows unit norm."""
    norms = tensors["W_dec"].norm(dim=-1).clamp(min=1e-8)
    tensors["W_enc"] = tensors["W_enc"] * norms
    tensors["b_enc"] = tensors["b_enc"] * norms
    tensors["W_dec"] = tensors["W_dec"] / norms[:, None]


def _activation_options(raw: dict, activation: str, tensors: dict, path: Path) -> dict:
    if activation == "topk":
        kwargs = raw.get("activation_fn_kwargs") or {}
        return {"k": config_int(raw, "k", path, default=kwargs.get("k"))}
    if activation == "batchtopk":
        k = raw.get("k", 1)
        return {"k": max(1, round(k)) if isinstance(k, int | float) else 1, "threshold": float(tensors.pop("topk_threshold"))}
    return {}


def _matryoshka(raw: dict, d_sae: int) -> list[int] | None:
    widths = raw.get("matryoshka_widths")
    if not widths or not all(isinstance(w, int) for w in widths):
        return None
    widths = widths if widths[-1] == d_sae else [*widths, d_sae]
    return widths if widths == sorted(set(widths)) and widths[0] >= 1 else None
