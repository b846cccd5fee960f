"""Dictionary files: mechscope's own folders, and exchange with SAELens, EleutherAI's sparsify and circuit-tracer.

`load_any` recognises each layout by the files in the folder:

| layout | files |
|---|---|
| mechscope (`own.py`) | `cfg.json` + `dictionary.safetensors` |
| SAELens (`saelens.py`) | `cfg.json` + `sae_weights.safetensors` |
| sparsify (`sparsify.py`) | `cfg.json` + `sae.safetensors`, or a folder of such folders, one per hookpoint |
| circuit-tracer CLT (`circuit_tracer.py`) | `W_enc_{i}.safetensors` + `W_dec_{i}.safetensors` per layer |
| circuit-tracer transcoder set | `config.yaml` + `layer_{i}.safetensors`: one dictionary per layer, picked by `site` |

`circuit_tracer.import_transcoder_set` and `export_transcoder_set` read and write whole transcoder
sets; `import_clt` and `export_clt` cross-layer transcoders. What each format cannot hold is refused in
one line rather than written as something its reader would misread: SAELens has no TopK transcoder,
crosscoder or CLT; circuit-tracer has no TopK CLT.
"""

from __future__ import annotations

from pathlib import Path

from mechscope.dictionaries.dictionary import Dictionary
from mechscope.dictionaries.formats import circuit_tracer, own, saelens, sparsify
from mechscope.dictionaries.formats.circuit_tracer import export_clt, export_transcoder_set, import_clt, import_transcoder_set
from mechscope.dictionaries.formats.files import read_json
from mechscope.dictionaries.formats.own import check_model, load_dictionary, save_dictionary
from mechscope.dictionaries.formats.saelens import export_saelens, import_saelens
from mechscope.dictionaries.formats.sparsify import import_sparsify
from mechscope.errors import MechscopeError


def load_any(path: str | Path, model=None, site: str | None = None) -> Dictionary:
    """The dictionary in `path`, in any layout mechscope reads, checked against `model` if given.

    `path` may also be a `train-dict` run folder (its `dictionary/` is read). `site` gives the site an
    imported dictionary reads where its files do not say, or picks one
    hookpoint of a sparsify run folder. Raises `MechscopeError` (one line) for anything else.

    >>> sae = load_any("checkpoints/run", model=model, site="blocks.15.hook_resid_post")
    """
    folder = Path(path)
    if folder.is_file() and folder.name in (own.WEIGHTS, saelens.WEIGHTS, sparsify.WEIGHTS, own.CONFIG):
        folder = folder.parent
    if not folder.is_dir():
        raise MechscopeError(f"no dictionary folder {str(path)!r}")
    if not (folder / own.WEIGHTS).is_file() and (folder / "dictionary" / own.WEIGHTS).is_file():
        folder = folder / "dictionary"  # a train-dict run folder: the dictionary it saved
    if (folder / own.WEIGHTS).is_file():
        read_json(folder / own.CONFIG)  # a config that is valid JSON but no object gets its one line here
        return load_dictionary(folder, model=model)
    if saelens.is_saelens_folder(folder):
        dictionary = import_saelens(folder, site=site)
    elif sparsify.is_sparsify_folder(folder) or sparsify.hookpoints(folder):
        dictionary = import_sparsify(folder, site=site)
    elif circuit_tracer.is_clt_folder(folder):
        dictionary = import_clt(folder)
    elif circuit_tracer.is_transcoder_set_folder(folder):
        dictionary = _one_layer(import_transcoder_set(folder), site, path)
    else:
        raise MechscopeError(
            f"{str(path)!r} is no dictionary folder mechscope reads: expected {own.CONFIG} with {own.WEIGHTS} (mechscope), "
            f"{saelens.WEIGHTS} (SAELens) or {sparsify.WEIGHTS} (sparsify), sparsify hookpoint subfolders, "
            "or circuit-tracer's W_enc_0.safetensors (CLT) or layer_0.safetensors (transcoder set)"
        )
    if model is not None:
        check_model(dictionary, model)
    return dictionary


def _one_layer(transcoders: list[Dictionary], site: str | None, path) -> Dictionary:
    """The transcoder of a circuit-tracer set that reads or writes `site`."""
    for d in transcoders:
        if site in (d.cfg.read_sites[0], d.cfg.write_sites[0]):
            return d
    sites = [d.cfg.read_sites[0] for d in transcoders]
    raise MechscopeError(
        f"{str(path)!r} holds circuit-tracer transcoders of {len(sites)} layers: give the site one of them reads "
        f"({sites[0]} .. {sites[-1]})" + ("" if site is None else f", not {site!r}")
    )


__all__ = [
    "export_clt",
    "export_saelens",
    "export_transcoder_set",
    "import_clt",
    "import_saelens",
    "import_sparsify",
    "import_transcoder_set",
    "load_any",
    "load_dictionary",
    "save_dictionary",
]
