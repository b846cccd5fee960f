"""What long jobs (harvest, dictionary training, index builds) share: ranks, atomic files, progress bars.

- `Ranks`: this process's place among torch.distributed processes (one process: rank 0 of 1). Under
  `torchrun` it joins the process group from the environment: gloo for CPU tensors and, where CUDA is
  available, NCCL for GPU tensors; its `wait_for_all` is a barrier for waits of hours (ranks finishing
  their shares of a job).
- `process_device`: the device a job's process computes on (`--device`): under torchrun, one GPU each.
- `atomic_folder`: write a folder under a temporary name and swap it into place, so a job killed at
  any moment leaves either the old folder or the new one, never half of one.
- `progress`: a rich progress bar with live fields, shown on rank 0 only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mechscope.errors import MechscopeError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Ranks:
        """Join the process group `torchrun` describes in the environment (WORLD_SIZE > 1), else one process.

        Collectives on CPU tensors run on gloo, and where CUDA is available those on CUDA tensors run on NCCL
        and the current GPU is cuda:LOCAL_RANK, so one job may hold both (`process_device`)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if cuda and local < torch.cuda.device_count():  # this process's GPU (`process_device`), NCCL's too
                torch.cuda.set_device(local)
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")  # CPU tensors on gloo, CUDA ones on NCCL
        return cls(dist.get_rank(), dist.get_world_size())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wait_for_all(self) -> None:
        """A barrier without a practical time limit, for a wait as long as a rank's share of a job.

        `barrier` gives up after the process group's timeout (10 or 30 minutes), and ranks that resume
        from checkpoints may finish their shares hours apart. This one runs on a gloo group of its own
        (on CPU, whatever the main backend), made once, whose timeout is `LONG_WAIT`.
        """
        if self.world > 1:
            dist.barrier(group=_waiting_group())

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
            tensor /= self.world
        return tensor


DEVICES = "auto, cpu, cuda, cuda:N"
"""What `process_device` takes."""


def process_device(choice: str = "auto", option: str = "device") -> torch.device:
    """The device this process of a long job computes on, checked; a one-line error names `option` otherwise.

    - "auto": where CUDA is available, this process's own GPU, cuda:LOCAL_RANK (torchrun's LOCAL_RANK; 0 for
      a single process); else the CPU.
    - "cuda": cuda:LOCAL_RANK too (torch's current device once `Ranks.from_environment` has set it), and an
      error without CUDA; "cuda:N": that GPU, for every process; "cpu": the CPU.

    >>> process_device("auto")  # under `torchrun --nproc-per-node 8` on 8 GPUs: cuda:0 in one process, ... cuda:7
    """
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", choice):
        raise MechscopeError(f"{option} {choice!r} is not a device: valid values are {DEVICES}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "cpu" or (choice == "auto" and n == 0):
        return torch.device("cpu")
    if n == 0:
        raise MechscopeError(f"{option} {choice!r} is not available: this machine has no CUDA device; valid here: auto, cpu")
    gpus = f"this machine has {n} CUDA device{'s' if n > 1 else ''}, cuda:0..cuda:{n - 1}"
    if choice.startswith("cuda:"):
        if int(choice[5:]) >= n:
            raise MechscopeError(
                f"{option} {choice!r} is not available: {gpus}; valid here: auto, cpu, cuda, cuda:0..cuda:{n - 1}"
            )
        return torch.device(choice)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= n:
        raise MechscopeError(
            f"{option} {choice} gives each process its own GPU, cuda:LOCAL_RANK, but LOCAL_RANK is {local} and {gpus}: "
            f"start at most {n} processes per node (--nproc-per-node {n}), or give {option} cpu"
        )
    return torch.device("cuda", local)


LONG_WAIT = timedelta(days=30)
"""How long `Ranks.wait_for_all` waits for the slowest rank before it gives up."""


@functools.cache
def _waiting_group() -> dist.ProcessGroup:
    return dist.new_group(backend="gloo", timeout=LONG_WAIT)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the block ends, it replaces `path` in one rename.

    If the block fails, the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _umask_modes(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


CHECKPOINT_STATE, CHECKPOINT_META = "state.safetensors", "state.json"
"""The two files of a long job's checkpoint folder: its tensors, and its meta (step, settings, ...) as JSON."""


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a checkpoint folder atomically: `tensors` as safetensors and `meta` as JSON, both or neither."""
    from safetensors.torch import save_file

    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / CHECKPOINT_STATE))
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta))


def read_checkpoint(folder: Path) -> dict | None:
    """The checkpoint in `folder` (its meta, with the tensors under "tensors"), or None if there is none.
    Raises `MechscopeError` for a damaged one: it is reported, never silently trained over."""
    from safetensors.torch import load_file

    if not (folder / CHECKPOINT_META).is_file():
        return None
    try:
        meta = json.loads((folder / CHECKPOINT_META).read_text())
        tensors = load_file(str(folder / CHECKPOINT_STATE))
    except Exception as err:
        raise MechscopeError(
            f"the checkpoint in {str(folder)!r} is damaged ({str(err).splitlines()[0][:100]}): remove it to start over"
        ) from None
    return {**meta, "tensors": tensors}


def _umask_modes(folder: Path) -> None:
    """Give the files written in `folder` the usual mode (`usual_mode`)."""
    for file in folder.rglob("*"):
        if file.is_file():
            usual_mode(file)


def usual_mode(file: Path) -> None:
    """Give `file` the usual mode, 0o666 less the umask: some writers (safetensors) create files 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    file.chmod(0o666 & ~umask)


def progress(title: str, fields: str = "", show: bool = True) -> Progress:
    """A progress bar: `title`, bar, done/total, elapsed and remaining time, then `fields` (a format string
    over the task's fields, e.g. "loss {task.fields[loss]:.3f}")."""
    columns = [TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    if fields:
        columns.append(TextColumn(fields))
    return Progress(*columns, disable=not show)
