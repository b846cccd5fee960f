"""mechscope's own dictionary folder: `cfg.json` (the `DictConfig`) and `dictionary.safetensors`.

The weights are saved with the normalisation folded in (`Dictionary.folded`), so they read and write
raw activations, and the config keeps the sites and the model fingerprint. Only safetensors is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mechscope.dictionaries.dictionary import FORMAT_VERSION, DictConfig, Dictionary
from mechscope.errors import MechscopeError
from mechscope.runtime import atomic_folder

CONFIG, WEIGHTS = "cfg.json", "dictionary.safetensors"


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_dictionary(dictionary: Dictionary, folder: str | Path, extra: dict | None = None, dtype: str = "float32") -> Path:
    """Write `dictionary` (normalisation folded in) to `folder`, replacing it atomically; returns the folder.

    `extra` is stored beside the config under "training" (e.g. the training settings and final metrics).
    `dtype` (float32, bfloat16 or float16) is the weights' precision on disk: half the size in 16 bits;
    loading always gives float32 weights.
    """
    if dtype not in SAVE_DTYPES:
        raise MechscopeError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    folded = dictionary.folded()
    with atomic_folder(folder) as tmp:
        tensors = {
            k: v.detach().to(SAVE_DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous().cpu()
            for k, v in folded.state_dict().items()
        }
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "mechscope-dictionary"})
        cfg = {**folded.cfg.to_dict(), "dtype": dtype}
        if extra:
            cfg["training"] = extra
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=1))
    return Path(folder)


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not Path(folder).is_dir():
        raise MechscopeError(f"no dictionary folder {str(folder)!r}: give a folder written by mechscope train-dict")
    if not path.is_file():
        raise MechscopeError(f"{str(folder)!r} is not a dictionary folder: it has no {CONFIG}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MechscopeError(f"{str(path)!r} is not valid JSON: {err.msg}") from None
    if not isinstance(config, dict):
        raise MechscopeError(f"{str(path)!r} holds a JSON {type(config).__name__}, not a dictionary config object")
    return config


def load_dictionary(folder: str | Path, model=None) -> Dictionary:
    """The dictionary saved in `folder` (mechscope's own format), checked against `model` if given.

    Raises `MechscopeError` (one line) for a missing folder, a damaged or truncated weights file,
    weights whose shapes disagree with the config, or a dictionary made for another model.
    """
    raw = read_config(folder)
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise MechscopeError(f"{str(folder)!r} was written by a newer mechscope (format {raw['format_version']}): upgrade")
    raw.pop("training", None)
    try:
        cfg = DictConfig(**raw)
    except TypeError as err:
        raise MechscopeError(f"{str(Path(folder) / CONFIG)!r} is not a dictionary config: {err}") from None
    dictionary = Dictionary(cfg)
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise MechscopeError(f"{str(folder)!r} has no {WEIGHTS}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise MechscopeError(f"{str(path)!r} is damaged or truncated: {str(err).splitlines()[0][:120]}") from None
    expected = dictionary.state_dict()
    for name, value in expected.items():
        if name not in tensors:
            raise MechscopeError(f"{str(path)!r} has no tensor {name!r}")
        if tensors[name].shape != value.shape:
            raise MechscopeError(
                f"{str(path)!r}: {name} is {list(tensors[name].shape)} but the config makes it {list(value.shape)}"
            )
    dictionary.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()})
    if model is not None:
        check_model(dictionary, model)
    return dictionary.eval().requires_grad_(False)


def check_model(dictionary: Dictionary, model) -> None:
    """One-line error if the dictionary was made for another model, or its sites or widths do not fit `model`."""
    from mechscope.models.fingerprint import model_fingerprint

    cfg = dictionary.cfg
    for site in [*cfg.read_sites, *cfg.write_sites]:
        model.site(site)
    width = model.shape(cfg.read_sites[0])[-1]
    if width != cfg.d_in:
        raise MechscopeError(f"the dictionary reads d_in={cfg.d_in} but {cfg.read_sites[0]} of {model.name} has width {width}")
    if cfg.model_fingerprint and cfg.model_fingerprint != model_fingerprint(model):
        raise MechscopeError(
            f"the dictionary was trained on {cfg.model or 'another model'} (fingerprint {cfg.model_fingerprint}), "
            f"not on {model.name} (fingerprint {model_fingerprint(model)})"
        )
