"""Reading the parts of a dictionary folder with one-line errors: its JSON config and its safetensors weights.

Only JSON and safetensors are read, never a pickle. Every error names the file and what was wrong
with it: missing, not JSON, damaged or truncated, a tensor missing, unexpected or of the wrong shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from mechscope.errors import MechscopeError


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or a one-line error naming the file."""
    if not path.is_file():
        raise MechscopeError(f"{str(path.parent)!r} has no {path.name}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MechscopeError(f"{str(path)!r} is not valid JSON: {getattr(err, 'msg', err)}") from None
    if not isinstance(value, dict):
        raise MechscopeError(f"{str(path)!r} is not a config: it holds a JSON {type(value).__name__}, not an object")
    return value


def read_tensors(path: Path, shapes: dict[str, tuple[int, ...]], optional: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The tensors of the safetensors file `path`, each checked against `shapes` and returned as float32.

    Every name in `shapes` must be present unless listed in `optional`; a name not in `shapes` is
    refused, since a tensor the reader does not know could change what the dictionary computes.
    """
    if not path.is_file():
        raise MechscopeError(f"{str(path.parent)!r} has no {path.name}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise MechscopeError(f"{str(path)!r} is damaged or truncated: {str(err).splitlines()[0][:120]}") from None
    for name in tensors:
        if name not in shapes:
            raise MechscopeError(
                f"{str(path)!r} holds a tensor {name!r} that this format does not have: expected {sorted(shapes)}"
            )
    for name, shape in shapes.items():
        if name not in tensors:
            if name in optional:
                continue
            raise MechscopeError(f"{str(path)!r} has no tensor {name!r}")
        value = tensors[name]
        if tuple(value.shape) != tuple(shape):
            raise MechscopeError(f"{str(path)!r}: {name} is {list(value.shape)} but the config makes it {list(shape)}")
        if not value.is_floating_point():
            raise MechscopeError(f"{str(path)!r}: {name} holds {value.dtype}, not floating-point numbers")
    return {name: value.to(torch.float32) for name, value in tensors.items()}


def config_int(cfg: dict, key: str, path: Path, default: int | None = None) -> int:
    """A positive integer field of a config, or a one-line error naming the file and the field."""
    value = cfg.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MechscopeError(f"{str(path)!r}: {key}={value!r} is invalid: it must be a positive integer")
    return value
