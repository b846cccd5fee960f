"""Dictionary features as index units: named, planned and read in the same pass as neurons.

A sparse dictionary's F features are one more "site" of an index, F units wide, named `f:NAME` in
the `sites` table; feature F is the unit `f:NAME:F` (`index show f:res5:123`, `index rank --site
f:res5`). NAME is given (`NAME=DIR` on the command line, a mapping's key in Python), or else the
dictionary folder's name, or its parent's for the `dictionary` folder that `train-dict` writes
(`runs/res5/dictionary` is `res5`). A feature's activation on a token is `Dictionary.encode` of the
model's activations at the dictionary's `read_sites` on that token, so the forward pass reads those
sites too, and stops after the deepest site either the index or a dictionary needs.

The index's meta `dictionaries` records each dictionary's name, latents, read sites and `digest` (a
hash of its weights), which resumes and merges check, and by which `feature_card` finds a folder's
features in an index whatever the folder is called.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mechscope.dictionaries.dictionary import Dictionary
from mechscope.errors import MechscopeError
from mechscope.index.units import IndexedSite

PREFIX = "f:"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")

DictionarySpec = Mapping[str, Dictionary | str | Path] | Sequence[str | Path]
"""Dictionaries to index: folders (named after themselves), or a mapping NAME -> folder or `Dictionary`."""


@dataclass(frozen=True)
class IndexedDictionary:
    """One dictionary read by an index: its features are the units of `site` (named `f:NAME`)."""

    name: str
    dictionary: Dictionary
    digest: str
    site: IndexedSite

    def meta(self) -> dict:
        cfg = self.dictionary.cfg
        return {"name": self.name, "digest": self.digest, "d_sae": cfg.d_sae, "read_sites": list(cfg.read_sites)}


def site_name(name: str) -> str:
    """The index site holding a dictionary's features: `f:NAME`."""
    return PREFIX + name


def default_name(folder: str | Path) -> str:
    """A folder's name, or its parent's for train-dict's `OUT/dictionary`."""
    path = Path(folder).resolve()
    return path.parent.name if path.name == "dictionary" and path.parent.name else path.name


def dictionary_digest(dictionary: Dictionary) -> str:
    """A short sha256 of the dictionary's config and weights, its normalisation folded in (`Dictionary.folded`, as
    saved): equal for the same dictionary in memory, in any folder, or in any format holding the same numbers.
    The precision the weights were stored in (`DictConfig.dtype`) is left out: loaded weights are float32. So is
    `layered` when false (added with cross-layer transcoders), so that indexes built before it still match."""
    folded = dictionary.folded()
    config = {**folded.cfg.to_dict(), "dtype": "float32"}
    if not config.get("layered"):
        config.pop("layered", None)
    digest = hashlib.sha256(repr(sorted(config.items(), key=lambda kv: kv[0])).encode())
    for name, value in sorted(folded.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _named(dictionaries: DictionarySpec) -> list[tuple[str, Dictionary | str | Path]]:
    if isinstance(dictionaries, Mapping):
        return list(dictionaries.items())
    if isinstance(dictionaries, str | Path):
        dictionaries = [dictionaries]
    return [(default_name(folder), folder) for folder in dictionaries]


def plan_dictionaries(model, dictionaries: DictionarySpec | None, first_unit: int) -> list[IndexedDictionary]:
    """Load and check each dictionary against the model, and number its features from `first_unit` on.

    One-line errors for a bad name, a name given twice, or a dictionary that does not fit the model
    (another model's fingerprint, another width, a site the model lacks).
    """
    from mechscope.dictionaries.formats import load_any
    from mechscope.dictionaries.formats.own import check_model

    out: list[IndexedDictionary] = []
    for name, given in _named(dictionaries or ()):
        if not _NAME.fullmatch(name):
            raise MechscopeError(
                f"dictionary name {name!r} is not valid: use letters, digits, '_', '-' and '.' (write --dict NAME=DIR)"
            )
        if any(d.name == name for d in out):
            raise MechscopeError(f"two dictionaries are named {name!r}: name them apart with --dict NAME=DIR")
        dictionary = given if isinstance(given, Dictionary) else load_any(given, model=model)
        check_model(dictionary, model)
        dictionary = dictionary.to(model.device).eval().requires_grad_(False)
        out.append(
            IndexedDictionary(
                name, dictionary, dictionary_digest(dictionary), IndexedSite(site_name(name), None, first_unit, dictionary.d_sae)
            )
        )
        first_unit += dictionary.d_sae
    return out


def read_sites(dictionaries: Sequence[IndexedDictionary]) -> list[str]:
    """Every site the dictionaries read, each once."""
    return list(dict.fromkeys(s for d in dictionaries for s in d.dictionary.cfg.read_sites))


@torch.no_grad()
def feature_acts(dictionary: Dictionary, cache: Mapping[str, Tensor], skip: int) -> Tensor:
    """[N, F] feature activations at positions skip.. of every context in `cache` ({site: [n, pos, d_in]})."""
    reads = [cache[s][:, skip:] for s in dictionary.cfg.read_sites]
    x = torch.stack(reads, dim=-2) if len(reads) > 1 else reads[0]  # [n, pos, (R,) d_in]
    return dictionary.encode_dense(x).reshape(-1, dictionary.d_sae)


def indexed_features(meta: dict, dictionary: Dictionary) -> str | None:
    """The site (`f:NAME`) holding `dictionary`'s features in an index with this meta, or None."""
    digest = dictionary_digest(dictionary)
    for entry in meta.get("dictionaries", []):
        if entry["digest"] == digest:
            return site_name(entry["name"])
    return None


def check_feature(dictionary: Dictionary, feature: int, name: str = "the dictionary") -> int:
    """`feature` if the dictionary has it; one line naming the valid range otherwise."""
    n = dictionary.d_sae
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < n:
        raise MechscopeError(f"feature {feature!r} out of range: {name} has features 0..{n - 1}")
    return feature
