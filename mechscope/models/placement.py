"""Where a model's weights live and where they compute: devices, device maps and offloaded weights.

A model too large for one device is loaded with a `device_map`, as HF transformers and accelerate do
it (accelerate's "big model inference", https://huggingface.co/docs/accelerate/usage_guides/big_modeling):
each top-level module (embedding, each block, final norm, unembedding) is placed on a GPU, on the CPU,
or on "disk", and accelerate wraps every module's forward in an `AlignDevicesHook` that moves its
inputs to its *execution device*. A module offloaded to the CPU (while a GPU computes) or to disk
keeps its weights on the meta device, and its hook loads them for the length of each forward.

mechscope's own hooks are plain PyTorch hooks around those modules, so reads and writes see the
same values as on a model on one device; this module holds the few things that must know about
the placement: checking a device map, a module's execution device, a module's weights with their
values (read from the offload where they are on meta), and a module without accelerate's hook.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor, nn

from mechscope.errors import MechscopeError, one_of

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""The device-map strategies of accelerate's `infer_auto_device_map`, by the names transformers takes."""

DeviceMap = str | dict[str, str | int | torch.device]
"""A strategy in STRATEGIES, one device for the whole model, or module name -> device (or "disk")."""


def devices() -> list[str]:
    """Every device on this machine that a model can compute on: "cpu", then each accelerator."""
    found = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            found += [kind] if kind == "mps" else [f"{kind}:{i}" for i in range(backend.device_count())]
    return found


def check_device(device: str | int | torch.device, what: str = "device", also: tuple[str, ...] = ()) -> torch.device:
    """`device` as a `torch.device` if this machine has it; otherwise a one-line error listing those it has (and `also`)."""
    valid = one_of([*devices(), *also])
    try:
        parsed = torch.device(f"cuda:{device}" if isinstance(device, int) else device)  # an int is a GPU, as in accelerate
    except (RuntimeError, TypeError) as err:
        raise MechscopeError(f"{what} {device!r} is not a device: valid devices here are {valid}") from err
    if parsed.type != "cpu":
        index = parsed.index if parsed.index is not None else 0
        name = parsed.type if parsed.type == "mps" else f"{parsed.type}:{index}"
        if name not in devices():
            raise MechscopeError(f"{what} {device!r} does not exist on this machine: valid devices here are {valid}")
    return parsed


def check_device_map(device_map: DeviceMap) -> DeviceMap:
    """A device map transformers can take, or a one-line error naming the bad entry and what is valid."""
    strategies = f"{', '.join(map(repr, STRATEGIES))}, a device such as 'cpu' or 'cuda:0', or a dict of module name -> device"
    if isinstance(device_map, str):
        if device_map in STRATEGIES:
            return device_map
        try:
            torch.device(device_map)
        except RuntimeError:
            raise MechscopeError(f"unknown device_map {device_map!r}: give {strategies}") from None
        return {"": str(check_device(device_map, "device_map"))}
    if isinstance(device_map, int | torch.device):
        return {"": str(check_device(device_map, "device_map"))}
    if not isinstance(device_map, dict) or not device_map:
        raise MechscopeError(f"device_map {device_map!r} is not a device map: give {strategies}")
    checked: dict[str, str] = {}
    for name, device in device_map.items():
        where = f"device_map[{name!r}]"
        if device == "disk":
            checked[name] = "disk"
            continue
        checked[name] = str(check_device(device, where, also=("disk",)))
    return checked


def offload_hook(module: nn.Module):
    """accelerate's `AlignDevicesHook` on `module`, or None when accelerate placed nothing there."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        if hasattr(candidate, "execution_device") and hasattr(candidate, "weights_map"):
            return candidate
    return None


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its accelerate hook's execution device, else where its first weight is."""
    hook = offload_hook(module)
    if hook is not None and hook.execution_device is not None:
        return torch.device(hook.execution_device)
    for tensor in chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def stored(root: nn.Module, name: str, tensor: Tensor) -> Tensor:
    """The parameter or buffer `name` of `root` (the tensor `tensor`) with its values, on its module's execution device.

    A weight accelerate offloaded is a meta tensor in the module; its values are in its hook's weights map.
    """
    if tensor.device.type != "meta":
        return tensor
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name)
    hook = offload_hook(owner)
    if hook is None or hook.weights_map is None or leaf not in hook.weights_map:
        raise MechscopeError(f"{name} is on the meta device and no accelerate offload holds its values: load the model again")
    return hook.weights_map[leaf].to(execution_device(owner), tensor.dtype)


def module_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of `module`, by name, each holding its values (read from the offload where needed)."""
    named = chain(module.named_parameters(), module.named_buffers())
    return {name: stored(module, name, tensor) for name, tensor in named}


def bare(module: nn.Module) -> nn.Module:
    """`module` without accelerate's hooks: the module itself where it has none, else a shallow copy (sharing its
    tensors and PyTorch hooks) that runs its class's own forward, neither moving inputs nor loading weights."""
    if not any(hasattr(m, "_hf_hook") for m in module.modules()):
        return module
    copied = copy.copy(module)
    for attr in ("forward", "_hf_hook", "_old_forward"):
        copied.__dict__.pop(attr, None)
    copied._parameters, copied._buffers = dict(module._parameters), dict(module._buffers)
    copied._modules = {name: bare(child) if child is not None else None for name, child in module._modules.items()}
    return copied


@dataclass(frozen=True)
class Placement:
    """Where a loaded model goes: one device, or a device map that accelerate fills."""

    device: torch.device | None = None
    """The one device of the whole model (None with a device map)."""
    device_map: DeviceMap | None = None
    """A strategy ("auto", ...) or module name -> device or "disk"; see `models.placement`."""
    max_memory: dict | None = None
    """Device -> most memory the map may fill there ({0: "20GiB", "cpu": "60GiB"}), as accelerate takes it."""
    offload_folder: str | None = None
    """Where weights mapped to "disk" are written when they cannot be read from the model's own files."""

    def from_pretrained_kwargs(self) -> dict:
        if self.device_map is None:
            return {}
        return dict(device_map=self.device_map, max_memory=self.max_memory, offload_folder=self.offload_folder)


def placement(device, device_map, max_memory, offload_folder) -> Placement:
    """Check where the model should go; a one-line error for an unknown strategy or a device this machine lacks."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise MechscopeError("max_memory and offload_folder apply with a device_map: pass device_map='auto' as well")
        return Placement(device=check_device(device or "cpu"))
    if device is not None:
        raise MechscopeError(f"give device or device_map, not both (got device={str(device)!r} and a device_map)")
    for key in max_memory or {}:
        if key != "disk":
            check_device(key, "max_memory key", also=("disk",))
    folder = None if offload_folder is None else str(Path(offload_folder).expanduser())
    return Placement(device_map=check_device_map(device_map), max_memory=max_memory, offload_folder=folder)
