"""`mechscope serve`: the web explorer on this machine (see `mechscope.server`).

`register(app)` adds the command to `mechscope`. Everything is checked before the model loads (port,
host, files); the server binds 127.0.0.1 unless --host says otherwise, with a warning.
"""

from __future__ import annotations

import socket
import webbrowser
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mechscope.cli_common import check_range, shown
from mechscope.errors import MechscopeError

console = Console()
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'default', a local HF folder, a .gguf file, or a hub id.")]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise MechscopeError(f"--port {port} on {host} cannot be used ({err.strerror}): choose another port") from None


def serve(
    db: Annotated[
        list[Path] | None,
        typer.Option(
            help="An index database (repeat for several; a unit's examples come from the first holding it). "
            "Default: the model's index, if there is one."
        ),
    ] = None,
    dictionary: Annotated[
        list[str] | None, typer.Option("--dict", help="A dictionary folder, or NAME=DIR (repeat for several).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; any other than 127.0.0.1 exposes the model.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the explorer in the web browser.")] = False,
    model: ModelOpt = "default",
):
    """The web explorer: prompt, distribution, lens, the units behind a token, their examples and interventions, patching."""
    import mechscope
    from mechscope.index.build import default_index_path
    from mechscope.server import open_explorer
    from mechscope.server import serve as run

    check_range("--port", port, 1, 65535)
    _check_port(host, port)
    if host not in LOOPBACK:
        console.print(f"[yellow]warning:[/] serving on {shown(host)}: anyone who can reach this address can run the model")
    m = mechscope.load(model)
    if not db and default_index_path(m.name).is_file():
        db = [default_index_path(m.name)]
    ex = open_explorer(m, db or [], dictionary or [])
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    console.print(f"mechscope explorer on {shown(repr(m))}: [bold]{url}[/] (Ctrl-C stops it)")
    for path in ex.index_paths:
        console.print(shown(f"index: {path}"))
    for name in ex.dictionaries:
        console.print(shown(f"dictionary: {name} (its features are f:{name}:F)"))
    if open_browser:
        webbrowser.open(url)
    try:
        run(ex, host=host, port=port)
    finally:
        ex.close()


def register(app: typer.Typer) -> None:
    """Add `serve` to `app`."""
    app.command(name="serve")(serve)
