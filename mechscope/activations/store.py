"""Activation stores on disk: `harvest` writes them, `StoreSource` reads them back for training.

A store is a folder of safetensors shards and a JSON manifest:

    manifest.json             model, its fingerprint and dtype, sites, d, corpus id, dtype, ctx_len, skipped positions,
                              seed, shard size, and per shard its token count and a hash chaining its tokens
    shard-00000.safetensors   "acts" [n, n_sites, d] (float32, bfloat16 or float16), "tokens" [n] int32

A store holds the corpus's training documents: every 20th document is held out for evaluation, as when
a dictionary trains on activations streamed from the model (`mechscope.data.held_out`).

Each shard holds `shard_contexts` contexts of the packed corpus, positions `skip`.. of each (the first
positions are attention sinks with huge norms; see `mechscope.data.SKIP_POSITIONS`). A shard is written
to a temporary file and renamed into place, then the manifest is rewritten the same way, so a harvest
killed at any moment resumes after its last whole shard and ends with the same content as one that
ran through. `StoreSource` reads the shards memory-mapped, a few at a time, in a seeded order.

Under `torchrun` (WORLD_SIZE > 1) the processes write one store together, the one a single process
writes, shard for shard: shard i is written by rank i % world, in rounds of `world` consecutive shards.
After each round a barrier, then rank 0 lists the round's shards in the manifest, so the manifest never
names a shard that is not in place. Every rank tokenises every chunk (the packing is the same on each),
and rank 0 chains their tokens itself. A run killed at any moment resumes after its last whole round,
with any number of processes. On several nodes the folder must be one that every node shares.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import save_file

from mechscope.activations.source import ModelSource, StreamSpec, read_contexts
from mechscope.data import corpus, held_out
from mechscope.errors import MechscopeError, one_of
from mechscope.runtime import Ranks, usual_mode

MANIFEST = "manifest.json"
STORE_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_manifest(folder: str | Path) -> dict:
    """The manifest of the store in `folder`; one-line error if there is no store there."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise MechscopeError(
            f"{str(folder)!r} is not an activation store: it has no {MANIFEST} (write one with mechscope harvest)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MechscopeError(f"{str(path)!r} is not a valid manifest: {err.msg}") from None


@dataclass(frozen=True)
class HarvestSettings:
    """How a store is harvested (the stream, plus the on-disk layout)."""

    tokens: int = 1_000_000
    """Tokens to store (rounded up to whole shards)."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    shard_contexts: int = 256
    """Contexts per shard."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise MechscopeError(f"unknown dtype {self.dtype!r}: valid dtypes are {one_of(DTYPES)}")
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise MechscopeError(f"tokens={self.tokens!r} is invalid: give a positive number of tokens")
        if not isinstance(self.shard_contexts, int) or self.shard_contexts < 1:
            raise MechscopeError(f"shard_contexts={self.shard_contexts!r} is invalid: give a positive number of contexts")


def _settings_meta(model, source: ModelSource, settings: HarvestSettings) -> dict:
    from mechscope.models.fingerprint import model_fingerprint

    spec = source.spec
    return {
        "store_version": STORE_VERSION,
        "model": model.name,
        "model_fingerprint": model_fingerprint(model),
        "model_dtype": str(model.hf.dtype).removeprefix("torch."),
        "sites": source.sites,
        "d": source.d,
        "corpus": source.corpus.id,
        "ctx_len": spec.ctx_len,
        "skip": spec.skip,
        "skipped_positions": f"the first {spec.skip} positions of each context (attention sinks with outlier norms)",
        "seed": spec.seed,
        "dtype": settings.dtype,
        "shard_contexts": settings.shard_contexts,
        "shard_tokens": settings.shard_contexts * spec.tokens_per_context,
    }


def harvest(
    model, spec: StreamSpec, out: str | Path, settings: HarvestSettings = HarvestSettings(), progress: bool = True
) -> dict:
    """Write the activations of `spec` on `model` into a store at `out`, or continue the one there.

    Returns the manifest. An existing store must have been harvested with the same settings (model,
    sites, corpus, ctx_len, skip, seed, dtype, shard size); asking for more tokens than it has extends it.
    Under torchrun, each process writes its share of the shards (see the module docstring); every
    process returns the finished manifest.

    >>> harvest(model, StreamSpec(("blocks.15.hook_resid_post",)), "acts/", HarvestSettings(tokens=1_000_000))
    """
    out = Path(out)
    ranks = Ranks.from_environment()
    spec = StreamSpec(**{**asdict(spec), "chunk_contexts": settings.shard_contexts})
    source = ModelSource(model, spec, held_out(corpus(spec.corpus, field=spec.field))[0])
    want = _settings_meta(model, source, settings)
    n_shards = -(-settings.tokens // want["shard_tokens"])
    manifest = _open_shared(out, want, ranks)
    done = len(manifest["shards"])
    with _progress(progress and ranks.main, done, n_shards, want["shard_tokens"]) as (bar, task):
        if done < n_shards:
            for number in _write_rounds(model, source, out, manifest, ranks, n_shards, DTYPES[settings.dtype]):
                bar.update(task, completed=number)
    if ranks.main:
        manifest["complete"] = True
        _write_json(out / MANIFEST, manifest)
    ranks.barrier()  # every process returns once the store is complete
    return manifest if ranks.main else read_manifest(out)


def _write_rounds(model, source: ModelSource, out: Path, manifest: dict, ranks: Ranks, n_shards: int, dtype) -> Iterator[int]:
    """Write this rank's shards from the manifest's last one up to `n_shards`, a round of `ranks.world`
    consecutive shards at a time; after each round's barrier rank 0 lists the round. Yields the number of
    shards done after each round (one process: a round is one shard, the barrier does nothing)."""
    skip = source.spec.skip
    held: list[torch.Tensor] = []  # the tokens [n] of each shard of the round, in order
    for number, contexts in source.contexts(len(manifest["shards"])):
        if number % ranks.world == ranks.rank:
            _write_shard(model, source, out, number, contexts, dtype)
        held.append(contexts[:, skip:].reshape(-1).to(torch.int32))
        if len(held) == ranks.world or number + 1 == n_shards:
            ranks.barrier()  # every shard of the round is in place
            if ranks.main:
                _list_shards(out, manifest, number + 1 - len(held), held)
            held = []
            yield number + 1
        if number + 1 >= n_shards:
            return


def _open_shared(out: Path, want: dict, ranks: Ranks) -> dict:
    """The store's manifest, on every rank. Each rank checks the folder first (bad input fails alike on
    every rank); then rank 0 alone opens or creates the store, and the others read what it wrote."""
    _check_store(out, want)
    ranks.barrier()
    manifest = _open_store(out, want) if ranks.main else None
    ranks.barrier()
    if manifest is not None:
        return manifest
    if not (out / MANIFEST).is_file():
        raise MechscopeError(
            f"rank {ranks.rank} does not see the store that rank 0 opened at {str(out)!r}: "
            "on several nodes, give a folder that every node shares"
        )
    return read_manifest(out)


def _check_store(out: Path, want: dict) -> dict | None:
    """The manifest of the store at `out`, harvested with the settings `want` (None: no store yet, and the
    folder is new or empty). Writes nothing."""
    if out.exists() and not out.is_dir():
        raise MechscopeError(f"{str(out)!r} is a file: give a folder for the activation store")
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        differ = [k for k in want if manifest.get(k) != want[k] and k != "skipped_positions"]
        if differ:
            shown = ", ".join(f"{k} {manifest.get(k)!r} (asked {want[k]!r})" for k in differ[:3])
            raise MechscopeError(f"the store at {str(out)!r} was harvested with other settings: {shown}; use another folder")
        return manifest
    if out.is_dir() and any(out.iterdir()):
        raise MechscopeError(f"folder {str(out)!r} is not empty and holds no activation store: give an empty or new folder")
    return None


def _open_store(out: Path, want: dict) -> dict:
    """The store at `out`, cut back to its whole shards, or a new one."""
    manifest = _check_store(out, want)
    if manifest is not None:
        _keep_whole(out, manifest)
        _drop_partial(out, len(manifest["shards"]))
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        **want,
        "shards": [],
        "tokens": 0,
        "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(out / MANIFEST, manifest)
    return manifest


def _keep_whole(out: Path, manifest: dict) -> None:
    """Cut the manifest's shard list before its first shard that is missing or cannot be read whole (a file
    truncated or damaged after it was listed), so that the harvest writes it and those after it again."""
    rows = (int(manifest["shard_tokens"]), len(manifest["sites"]), int(manifest["d"]))
    for i, shard in enumerate(manifest["shards"]):
        try:
            with safe_open(str(out / shard["file"]), "pt") as f:
                whole = tuple(f.get_slice("acts").get_shape()) == rows and len(f.get_slice("tokens").get_shape()) == 1
        except Exception:  # missing, truncated or not safetensors: safetensors raises its own error types
            whole = False
        if not whole:
            del manifest["shards"][i:]
            manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
            manifest["corpus_hash"] = manifest["shards"][-1]["chain"] if manifest["shards"] else ""
            manifest["complete"] = False
            _write_json(out / MANIFEST, manifest)
            return


def _drop_partial(out: Path, done: int) -> None:
    """Remove what a killed harvest left beyond its last whole shard (temporary files, an unlisted shard)."""
    for path in out.iterdir():
        if path.name.startswith(".") and ".tmp-" in path.name or path.name.startswith("shard-") and int(path.name[6:11]) >= done:
            path.unlink(missing_ok=True)


def _write_shard(model, source: ModelSource, out: Path, number: int, contexts, dtype) -> None:
    """Run the model over one shard's `contexts` [shard_contexts, ctx_len] and write the shard file, atomically."""
    spec = source.spec
    acts = torch.cat([read_contexts(model, source.sites, c, spec.skip) for c in contexts.split(spec.batch_contexts)])
    tokens = contexts[:, spec.skip :].reshape(-1).to(torch.int32)
    path = out / _shard_name(number)
    tmp = out / f".{path.name}.tmp-{os.getpid()}"
    save_file({"acts": acts.to(dtype).contiguous(), "tokens": tokens.contiguous()}, str(tmp))
    usual_mode(tmp)
    os.replace(tmp, path)


def _list_shards(out: Path, manifest: dict, first: int, tokens: list[torch.Tensor]) -> None:
    """Add the shards `first`, `first` + 1, ... (their `tokens`, in place on disk) to the manifest and rewrite it.
    Each shard's chain hashes its tokens after the previous shard's chain: the corpus_hash names the whole text."""
    if first != len(manifest["shards"]):
        raise RuntimeError(f"shard {first} listed after {len(manifest['shards'])} shards")  # a bug, never input
    for number, shard_tokens in enumerate(tokens, start=first):
        previous = manifest["shards"][-1]["chain"] if manifest["shards"] else ""
        chain = hashlib.sha256(previous.encode() + shard_tokens.numpy().tobytes()).hexdigest()[:16]
        manifest["shards"].append({"file": _shard_name(number), "tokens": len(shard_tokens), "chain": chain})
        manifest["tokens"] += len(shard_tokens)
        manifest["corpus_hash"] = chain
    _write_json(out / MANIFEST, manifest)


class _progress:
    def __init__(self, show: bool, done: int, total: int, shard_tokens: int):
        self.bar = Progress(
            TextColumn("harvest"), BarColumn(), MofNCompleteColumn(), TextColumn(f"shards of {shard_tokens:,} tokens"),
            TimeRemainingColumn(), disable=not show, transient=False,
        )  # fmt: skip
        self.done, self.total = done, total

    def __enter__(self):
        self.bar.__enter__()
        return self.bar, self.bar.add_task("harvest", total=self.total, completed=self.done)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


class StoreSource:
    """Chunks of a store for `source.batches`, each as many tokens as `shards_per_chunk` shards, made of
    `parts` equal slices of as many different shards (`shards_per_chunk` x `parts` slices).

    A shard holds consecutive contexts, often of one long document, so a chunk of whole shards holds a
    few documents, and training on chunk after chunk sees the text change every few steps (the loss
    jumps at each chunk, and latents of a document not seen for a while count as dead). Slices of many
    shards mix the text at the cost of reading more, smaller pieces. Each pass reads every slice once,
    in a seeded order of its own.
    """

    def __init__(
        self, folder: str | Path, shards_per_chunk: int = 4, seed: int = 0, parts: int = 8, sites: list[str] | None = None
    ):
        """`sites`: the sites to read, in this order, from a store that may hold more (one harvest can feed
        several dictionaries); None reads every site of the store."""
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        if not self.manifest.get("complete"):
            raise MechscopeError(
                f"the store at {str(folder)!r} is partial ({len(self.manifest['shards'])} shards): "
                "run the same mechscope harvest again to finish it"
            )
        self.shards = [self.folder / s["file"] for s in self.manifest["shards"]]
        for path, meta in zip(self.shards, self.manifest["shards"], strict=True):
            if not path.is_file():
                raise MechscopeError(f"the store at {str(folder)!r} is missing {meta['file']}: harvest it again")
        self.stored, self.d = list(self.manifest["sites"]), int(self.manifest["d"])
        self.sites = list(self.stored if sites is None else sites)
        if missing := [s for s in self.sites if s not in self.stored]:
            held = ", ".join(self.stored[:3]) + (f", ... ({len(self.stored)} in all)" if len(self.stored) > 3 else "")
            raise MechscopeError(f"the store at {str(folder)!r} has no {missing[0]}: it holds {held}")
        self.columns = None if self.sites == self.stored else [self.stored.index(s) for s in self.sites]
        self.shards_per_chunk = max(1, min(shards_per_chunk, len(self.shards)))
        shard_tokens = int(self.manifest["shard_tokens"])
        self.parts = max(p for p in range(1, max(1, parts) + 1) if shard_tokens % p == 0)  # slices of equal size
        self.seed = seed

    @property
    def chunk_tokens(self) -> int:
        return self.shards_per_chunk * int(self.manifest["shard_tokens"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])

    def _read(self, path: Path, part: int) -> torch.Tensor:
        """Slice `part` of `parts` of one shard, float32 [shard_tokens / parts, n_sites, d] (the sites read)."""
        rows = int(self.manifest["shard_tokens"])
        size = rows // self.parts
        try:
            with safe_open(str(path), "pt") as f:
                acts = f.get_slice("acts")
                shape = tuple(acts.get_shape())
                if shape != (rows, len(self.stored), self.d):
                    raise MechscopeError(
                        f"shard {str(path)!r} has shape {list(shape)}, not what the manifest says: harvest it again"
                    )
                piece = acts[part * size : (part + 1) * size]
                return (piece if self.columns is None else piece[:, self.columns]).float()
        except MechscopeError:
            raise
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise MechscopeError(
                f"shard {str(path)!r} cannot be read ({str(err).splitlines()[0][:120]}): harvest it again"
            ) from None

    def chunks(self, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(chunk number, [chunk_tokens, n_sites, d] float32) from chunk `start` on, endlessly (a new seeded
        order of the slices each pass)."""
        per_pass = len(self.shards) // self.shards_per_chunk
        per_chunk = self.shards_per_chunk * self.parts
        number = start
        while True:
            epoch, within = divmod(number, per_pass)
            order = torch.randperm(
                len(self.shards) * self.parts, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)
            )
            picked = order[within * per_chunk : (within + 1) * per_chunk].tolist()
            yield number, torch.cat([self._read(self.shards[i // self.parts], i % self.parts) for i in picked])
            number += 1
