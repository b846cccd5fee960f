"""Checkpoints of a tiny-model run: everything it needs to continue exactly, in safetensors and JSON.

`state.safetensors` holds the model's weights (`model.*`), AdamW's state per parameter (`adam.I.step`,
`adam.I.exp_avg`, `adam.I.exp_avg_sq`, I numbering the optimiser's parameters) and torch's RNG state;
`state.json` the step (which fixes the learning rate, the next contexts read and the length of the
metrics log, one line per step), the seconds trained so far, and the run's settings. The folder is written under a
temporary name and swapped in (`runtime.atomic_folder`), so a run killed while saving keeps the last one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mechscope.runtime import read_checkpoint, write_checkpoint


def save(folder: Path, model, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Write the checkpoint: the model, the optimiser, the RNG state, and `meta` (step, seconds, ...)."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"adam.{index}.{key}"] = torch.as_tensor(value).contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    write_checkpoint(folder, tensors, meta)


def load(folder: Path) -> dict | None:
    """The checkpoint in `folder` (its meta, with the tensors under "tensors"), or None if there is none."""
    return read_checkpoint(folder)


def restore(state: dict, model, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint's weights, optimiser state and RNG state into a fresh model and optimiser."""
    tensors = state["tensors"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    per_param: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("adam."):
            _, index, key = name.split(".", 2)
            per_param.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
