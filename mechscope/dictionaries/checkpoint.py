"""Training checkpoints: everything a run needs to continue exactly, in safetensors and JSON.

`checkpoint/state.safetensors` holds the dictionary's parameters and buffers (normalisation not folded),
Adam's moments per parameter, and each latent's tokens since it last fired; `checkpoint/state.json` the
step, Adam's step counts, the dictionary's config and how many lines of the metrics log belong to the
run so far. The folder is written under a temporary name and swapped in (`runtime.atomic_folder`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mechscope.runtime import read_checkpoint, write_checkpoint


def save(
    folder: Path,
    dictionary,
    optimizer: torch.optim.Optimizer,
    since_fired: torch.Tensor,
    step: int,
    metrics_lines: int,
    train_cfg: dict | None = None,
) -> None:
    tensors = {f"dict.{k}": v.detach().contiguous() for k, v in dictionary.state_dict().items()}
    names = [n for n, _ in dictionary.named_parameters()]
    steps = {}
    for name, param in zip(names, [p for _, p in dictionary.named_parameters()], strict=True):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"adam.{name}.{key}"] = state[key].contiguous()
        if "step" in state:
            steps[name] = float(state["step"])
    tensors["since_fired"] = since_fired.contiguous()
    cfg = dictionary.cfg.to_dict() | {"activation_options": dictionary.activation.options()}
    meta = {"step": step, "adam_steps": steps, "dict_cfg": cfg, "metrics_lines": metrics_lines, "train_cfg": train_cfg}
    write_checkpoint(folder, tensors, meta)


def load(folder: Path) -> dict | None:
    """The checkpoint in `folder` (its meta, with the tensors under "tensors"), or None if there is none."""
    return read_checkpoint(folder)


def restore(state: dict, dictionary, optimizer: torch.optim.Optimizer, since_fired: torch.Tensor) -> int:
    """Load a checkpoint into a fresh dictionary and optimizer; returns the step to continue from."""
    tensors = state["tensors"]
    dictionary.load_state_dict({k.removeprefix("dict."): v for k, v in tensors.items() if k.startswith("dict.")})
    for name, param in dictionary.named_parameters():
        if f"adam.{name}.exp_avg" in tensors:
            optimizer.state[param] = {  # the moments take the parameter's memory layout, as Adam's own do
                "step": torch.tensor(state["adam_steps"][name], device=param.device),  # fused Adam's is on the device
                "exp_avg": torch.empty_like(param).copy_(tensors[f"adam.{name}.exp_avg"]),
                "exp_avg_sq": torch.empty_like(param).copy_(tensors[f"adam.{name}.exp_avg_sq"]),
            }
    since_fired.copy_(tensors["since_fired"])
    return int(state["step"])


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
