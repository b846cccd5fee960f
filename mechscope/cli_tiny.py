"""Commands: train-tiny.

`register(app)` adds them to the `mechscope` command; they follow its conventions (`cli_common`):
numbers and output paths are checked before any work, errors are one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mechscope.cli_common import check_folder, shown
from mechscope.cli_options import with_options
from mechscope.toys.tiny_train import TinyTrainConfig

console = Console()


@with_options(TinyTrainConfig)
def train_tiny(
    out: Annotated[
        Path | None,
        typer.Option(help="Folder of the trained model (default tiny-ACT); the run works in OUT.training until done."),
    ] = None,
    config: TinyTrainConfig = None,
):
    """Train a 1-2 layer transformer with a GELU, SoLU or TopK MLP from scratch on the CPU; resumes an interrupted run."""
    from mechscope.toys.tiny_train import train_tiny as run_training

    out = out if out is not None else Path(f"tiny-{config.act}")
    check_folder("--out", out)
    from mechscope.toys.tiny_train import finished_run

    if finished_run(config, out) is not None:
        console.print(f"{shown(out)} already holds this run, trained with these settings: not training again")
    run = run_training(config, out)
    took = f"{run.seconds / 60:.1f} min" if run.seconds >= 60 else f"{run.seconds:.0f} s"
    console.print(
        f"tiny model {shown(run.folder)}: {config.act}, {config.layers} layers, d_model {config.d_model} · "
        f"{run.params:,} parameters · {run.tokens:,} tokens · held-out loss {run.held_out_loss:.3f} · "
        f"{took} ({run.tokens_per_second:,.0f} tokens/s)"
    )
    console.print(f"load it with mechscope.load({str(run.folder)!r}); curves: {shown(run.folder / 'curves.png')}")


def register(app) -> None:
    """Add this module's commands to `app`."""
    app.command(name="train-tiny")(train_tiny)
