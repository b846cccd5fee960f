"""Dictionary files: mechscope's own folders, and exchange with SAELens and EleutherAI's sparsify.

`load_any` recognises each layout by the files in the folder:

| layout | files |
|---|---|
| mechscope (`own.py`) | `cfg.json` + `dictionary.safetensors` |
| SAELens (`saelens.py`) | `cfg.json` + `sae_weights.safetensors` |
| sparsify (`sparsify.py`) | `cfg.json` + `sae.safetensors`, or a folder of such folders, one per hookpoint |

circuit-tracer's per-layer transcoder sets (`config.yaml` + `layer_{i}.safetensors`) hold one
dictionary per layer: `circuit_tracer.import_transcoder_set` and `export_transcoder_set` read and write them.
"""

from __future__ import annotations

from pathlib import Path

from mechscope.dictionaries.dictionary import Dictionary
from mechscope.dictionaries.formats import own, saelens, sparsify
from mechscope.dictionaries.formats.circuit_tracer import export_transcoder_set, import_transcoder_set
from mechscope.dictionaries.formats.files import read_json
from mechscope.dictionaries.formats.own import check_model, load_dictionary, save_dictionary
from mechscope.dictionaries.formats.saelens import export_saelens, import_saelens
from mechscope.dictionaries.formats.sparsify import import_sparsify
from mechscope.errors import MechscopeError


def load_any(path: str | Path, model=None, site: str | None = None) -> Dictionary:
    """The dictionary in `path`, in any layout mechscope reads, checked against `model` if given.

    `site` gives the site an imported dictionary reads where its files do not say, or picks one
    hookpoint of a sparsify run folder. Raises `MechscopeError` (one line) for anything else.

    >>> sae = load_any("checkpoints/run", model=model, site="blocks.15.hook_resid_post")
    """
    folder = Path(path)
    if folder.is_file() and folder.name in (own.WEIGHTS, saelens.WEIGHTS, sparsify.WEIGHTS, own.CONFIG):
        folder = folder.parent
    if not folder.is_dir():
        raise MechscopeError(f"no dictionary folder {str(path)!r}")
    if (folder / own.WEIGHTS).is_file():
        read_json(folder / own.CONFIG)  # a config that is valid JSON but no object gets its one line here
        return load_dictionary(folder, model=model)
    if saelens.is_saelens_folder(folder):
        dictionary = import_saelens(folder, site=site)
    elif sparsify.is_sparsify_folder(folder) or sparsify.hookpoints(folder):
        dictionary = import_sparsify(folder, site=site)
    else:
        raise MechscopeError(
            f"{str(path)!r} is no dictionary folder mechscope reads: expected {own.CONFIG} with {own.WEIGHTS} (mechscope), "
            f"{saelens.WEIGHTS} (SAELens) or {sparsify.WEIGHTS} (sparsify), or sparsify hookpoint subfolders"
        )
    if model is not None:
        check_model(dictionary, model)
    return dictionary


__all__ = [
    "export_saelens",
    "export_transcoder_set",
    "import_saelens",
    "import_sparsify",
    "import_transcoder_set",
    "load_any",
    "load_dictionary",
    "save_dictionary",
]
