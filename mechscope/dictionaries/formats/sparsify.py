"""Dictionary folders in EleutherAI sparsify's layout, read into a `Dictionary`.

One folder per hookpoint holds `cfg.json` (`activation`, `k`, `num_latents` or `expansion_factor`,
`d_in`, `skip_connection`, `transcode`, ...) and `sae.safetensors` with

    encoder.weight [n, d]   encoder.bias [n]   W_dec [n, d]   b_dec [d]   W_skip [d, d] (optional)

The coder computes f = TopK(ReLU((x - b_dec·[not transcode]) encoder.weightᵀ + encoder.bias)) and
x̂ = f W_dec + b_dec (+ x W_skipᵀ). So `W_dec` is already our [F, d] layout, `encoder.weight` and
`W_skip` are transposed, and only an SAE subtracts `b_dec` from its input: a transcoder (whose
output has the width of its input) does not. ReLU before the top-k and ReLU after it keep the same
activations; they differ only in which zero-valued latents they list when fewer than k are positive.

A training run saves one such folder per hookpoint under one parent folder, named after the
module it hooked (`layers.15`, `layers.15.mlp`). The name is the only record of where the coder
reads; `SITES` turns the common ones into sites, and `site=` gives any other.
"""

from __future__ import annotations

import re
from pathlib import Path

from mechscope.dictionaries.dictionary import DictConfig, Dictionary
from mechscope.dictionaries.formats.files import config_int, read_json, read_tensors
from mechscope.errors import MechscopeError, one_of

CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"

SITES: dict[str, tuple[str, str | None]] = {
    # the hooked module, after the block number: (site an SAE reads and writes, site a transcoder reads)
    "": ("hook_resid_post", None),
    "mlp": ("hook_mlp_out", "ln2.hook_normalized"),
    "self_attn": ("hook_attn_out", None),
    "attn": ("hook_attn_out", None),
    "attention": ("hook_attn_out", None),
}
_HOOKPOINT = re.compile(r"(?:.*\.)?(\d+)(?:\.(\w+))?")


def is_sparsify_folder(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def hookpoints(folder: Path) -> list[str]:
    """The hookpoint subfolders of a sparsify run folder, in name order (layers.2 before layers.10)."""
    names = [p.name for p in folder.iterdir() if p.is_dir() and is_sparsify_folder(p)] if folder.is_dir() else []
    return sorted(names, key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])


def import_sparsify(folder: str | Path, site: str | None = None, write_site: str | None = None) -> Dictionary:
    """The sparse coder in a sparsify folder, or in one hookpoint subfolder of a run folder.

    In a run folder, `site` picks the hookpoint (by folder name or by the site it maps to). Otherwise
    `site` gives the site the coder reads where its folder name does not say, and `write_site` the
    site a transcoder writes. Raises `MechscopeError` (one line, naming the file) for anything it
    cannot read exactly.

    >>> sae = import_sparsify("checkpoints/run", site="blocks.15.hook_resid_post")
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MechscopeError(f"no dictionary folder {str(folder)!r}")
    if not is_sparsify_folder(folder):
        folder, site = _pick_hookpoint(folder, site), None  # the folder's name now says where it reads
    path = folder / CONFIG
    raw = read_json(path)
    if raw.get("activation", "topk") != "topk":
        raise MechscopeError(f"{str(path)!r}: activation {raw.get('activation')!r} cannot be read: valid are topk")
    d = config_int(raw, "d_in", path)
    n = raw.get("num_latents") or d * config_int(raw, "expansion_factor", path)
    n = config_int({"num_latents": n}, "num_latents", path)
    k = config_int(raw, "k", path)
    transcode, skip = bool(raw.get("transcode", False)), bool(raw.get("skip_connection", False))
    read, write = _sites(folder.name, transcode, site, write_site, path)

    shapes = {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}
    if skip:
        shapes["W_skip"] = (d, d)
    tensors = read_tensors(folder / WEIGHTS, shapes)
    try:
        cfg = DictConfig([read], [write], d, d, n, "topk", {"k": k}, apply_b_dec_to_input=not transcode, skip_connection=skip)
        dictionary = Dictionary(cfg)
    except MechscopeError as err:
        raise MechscopeError(f"{str(path)!r}: {err}") from None
    state = dictionary.state_dict()
    state |= {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"]}
    state |= {"W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    if skip:
        state["W_skip"] = tensors["W_skip"].T
    dictionary.load_state_dict(state)
    return dictionary.eval().requires_grad_(False)


def _pick_hookpoint(folder: Path, site: str | None) -> Path:
    names = hookpoints(folder)
    if not names:
        raise MechscopeError(
            f"{str(folder)!r} is not a sparsify folder: it has no {CONFIG} and {WEIGHTS}, nor subfolders with them"
        )
    if site is None and len(names) == 1:
        return folder / names[0]
    chosen = [name for name in names if site in (name, _known_sites(name)[0])]
    if site is None or len(chosen) != 1:
        given = "give one" if site is None else f"{site!r} is none of them"
        raise MechscopeError(f"{str(folder)!r} holds a coder per hookpoint ({given} with site=): {one_of(names)}")
    return folder / chosen[0]


def _known_sites(name: str) -> tuple[str | None, str | None]:
    """(the site an SAE hooked on module `name` reads and writes, the site a transcoder there reads), where known."""
    match = _HOOKPOINT.fullmatch(name)
    if match is None or (match.group(2) or "") not in SITES:
        return None, None
    sae, transcoder = SITES[match.group(2) or ""]
    return f"blocks.{match.group(1)}.{sae}", f"blocks.{match.group(1)}.{transcoder}" if transcoder else None


def _sites(name: str, transcode: bool, site: str | None, write_site: str | None, path: Path) -> tuple[str, str]:
    """(read site, write site) of the coder saved in folder `name`."""
    sae_site, transcoder_read = _known_sites(name)
    if not transcode:
        read = site or sae_site
        if read is None:
            raise MechscopeError(
                f"{str(path)!r}: the hookpoint {name!r} names no site mechscope knows: give the site it reads with site="
            )
        return read, write_site or read
    read, write = site or transcoder_read, write_site or (sae_site if transcoder_read else None)
    if read is None or write is None:
        raise MechscopeError(
            f"{str(path)!r}: the transcoder's hookpoint {name!r} names no sites mechscope knows: give site= and write_site="
        )
    return read, write
