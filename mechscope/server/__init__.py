"""The web explorer: `mechscope serve` (FastAPI on uvicorn, bound to 127.0.0.1, every asset inside the package).

`open_explorer(model, dbs, dictionaries)` checks and opens what the explorer serves, `create_app(explorer)`
builds the application (routes in `app.py`, JSON schemas in `schemas.py`), and `serve(...)` runs it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from mechscope.errors import MechscopeError
from mechscope.server.app import Explorer, create_app

__all__ = ["Explorer", "create_app", "open_explorer", "serve"]


def _dictionary_name(spec: str) -> tuple[str | None, str]:
    """`NAME=DIR` or `DIR` -> (NAME or None, DIR)."""
    name, sep, folder = spec.partition("=")
    return (name, folder) if sep and name and not Path(spec).exists() else (None, spec)


def open_explorer(model, dbs: Sequence[str | Path] = (), dictionaries: Sequence[str] = ()) -> Explorer:
    """An `Explorer` over `model`, the index databases `dbs` and the dictionary folders `dictionaries`
    (each `DIR` or `NAME=DIR`). A dictionary is named as given, else as the first index holding it names
    it, else by its folder. Every index is opened once here, so a bad file fails now (MechscopeError)."""
    from mechscope.dictionaries import load_any
    from mechscope.index.features import default_name, indexed_features
    from mechscope.index.query import Index

    paths = []
    for db in dbs:
        path = Path(db)
        if not path.is_file():
            raise MechscopeError(f"--db {str(db)!r} is not a file: give an index built by `mechscope index build`")
        with warnings.catch_warnings(), Index(path, model=model, warn=False):
            paths.append(path)
    ex = Explorer(model, paths)
    for spec in dictionaries:
        name, folder = _dictionary_name(spec)
        dictionary = load_any(folder, model=model)
        if name is None:
            held = (indexed_features(index.meta, dictionary) for index in ex.indexes)
            site = next((h for h in held if h), None)
            name = site.removeprefix("f:") if site else default_name(folder)
        if name in ex.dictionaries:
            raise MechscopeError(f"two dictionaries are named {name!r}: name them with --dict NAME=DIR")
        ex.dictionaries[name] = dictionary
    return ex


def serve(ex: Explorer, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run the explorer until interrupted (uvicorn)."""
    import gc

    import uvicorn

    # Each answer makes tens of thousands of small objects; without this, the collections they set off walk every
    # object of the loaded model and library too (about 0.1 s per lens answer on SmolLM2, bench/serve.py).
    gc.freeze()
    uvicorn.run(create_app(ex), host=host, port=port, log_level=log_level)
