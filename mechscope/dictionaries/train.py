"""One trainer for every dictionary: `train_dictionary(model, TrainConfig(...), out)`.

Phases:
1. Plan: sites and widths, the activation source (streamed from the model over the training
   documents, or a harvested store), a held-out batch from held-out documents.
2. Initialise (`init.py`) from the first chunk, or resume the checkpoint in `out/checkpoint`.
3. Train: each step normalises a batch, encodes and decodes it (only the active latents get gradients,
   `sparse.py`), and minimises the reconstruction loss (summed over Matryoshka prefixes if any), the
   activation's sparsity penalty (its coefficient warmed up over the first steps) and, for TopK-style
   activations, the AuxK loss of dead latents (Gao et al. 2024). Decoder rows stay unit norm where the
   recipe asks, with the gradient's component along each row removed before the step. The learning
   rate warms up, then decays linearly over the last `decay_fraction` of the steps.
4. Checkpoint every `checkpoint_seconds` (atomically; a run killed at any moment resumes to the same
   weights as one that never stopped), evaluate on the held-out batch every `eval_every` steps, and log
   metrics to `out/metrics.jsonl`. At the end, save the dictionary with its normalisation folded in.

The dictionary trains on `TrainConfig.device`; activations arrive on the CPU (streamed or read from a
store) and each batch moves there. Under `torchrun`, every process reads the same chunks and takes its
share of each batch; gradients are averaged by DistributedDataParallel (gloo for CPU tensors, NCCL for
CUDA ones; with device "auto" each process trains on its own GPU), so N processes train what one
process trains with the same global batch. BatchTopK selects within each process's share.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mechscope.activations import ModelSource, StoreSource, StreamSpec, batches, site_width
from mechscope.data import SKIP_POSITIONS, corpus, held_out
from mechscope.dictionaries import checkpoint
from mechscope.dictionaries.activations import ACTIVATIONS
from mechscope.dictionaries.dictionary import SKIP_NEEDS_OTHER_SITES, DictConfig, Dictionary, check_clt_options
from mechscope.dictionaries.formats.own import save_dictionary
from mechscope.dictionaries.init import initialise, mean_norm_scales, start_sparse
from mechscope.dictionaries.sparse import Active, sparse_decode
from mechscope.errors import MechscopeError, one_of
from mechscope.runtime import Ranks, process_device, progress

KINDS = ("sae", "transcoder", "crosscoder", "clt")
TRANSCODER_INPUTS = {"normed": "ln2.hook_normalized", "resid_mid": "hook_resid_mid"}
DEFAULT_SITES = ["blocks.15.hook_resid_post"]


def check_kind(kind: str) -> None:
    """Raise MechscopeError (one line, with the valid kinds) for a kind not in KINDS."""
    if kind not in KINDS:
        raise MechscopeError(f"unknown dictionary kind {kind!r}: valid kinds are {one_of(KINDS)}")


def kind_sites(kind: str | None, layers: list[int] | None, transcoder_input: str = "normed") -> tuple[list[str], list[str]]:
    """(read sites, write sites) of a dictionary of `kind` over `layers`:

    - sae, one layer L: reads and writes `blocks.L.hook_resid_post`;
    - transcoder, one layer L: reads the MLP's input, `blocks.L.ln2.hook_normalized` (transcoder_input
      "normed") or `blocks.L.hook_resid_mid` ("resid_mid"), and writes its output `blocks.L.hook_mlp_out`;
    - crosscoder, layers ascending: reads and writes `blocks.l.hook_resid_post` of each (acausal);
    - clt (cross-layer transcoder), consecutive layers: reads `blocks.l.hook_resid_mid` and writes
      `blocks.l.hook_mlp_out` of each; the latents of layer l write the MLP outputs of l and every later layer.

    Raises MechscopeError (one line) for an unknown kind or input, or layers of the wrong number or order;
    whether the model has the layers is checked when the sites are resolved on it.
    """
    check_kind(kind)
    if not layers or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in layers):
        raise MechscopeError(f"layers={layers!r} is invalid: kind {kind} needs layer numbers (0 or more)")
    if kind in ("sae", "transcoder") and len(layers) != 1:
        raise MechscopeError(f"layers={layers} is invalid: kind {kind} takes one layer")
    if kind == "crosscoder" and (len(layers) < 2 or any(b <= a for a, b in zip(layers, layers[1:], strict=False))):
        raise MechscopeError(f"layers={layers} is invalid: a crosscoder reads two or more layers, each once, in ascending order")
    if kind == "clt" and (len(layers) < 2 or any(b != a + 1 for a, b in zip(layers, layers[1:], strict=False))):
        raise MechscopeError(
            f"layers={layers} is invalid: a cross-layer transcoder covers two or more consecutive layers, ascending"
        )
    if kind == "clt":
        return [f"blocks.{n}.hook_resid_mid" for n in layers], [f"blocks.{n}.hook_mlp_out" for n in layers]
    if kind == "transcoder":
        if transcoder_input not in TRANSCODER_INPUTS:
            raise MechscopeError(f"transcoder_input={transcoder_input!r} is invalid: give {one_of(TRANSCODER_INPUTS)}")
        return [f"blocks.{layers[0]}.{TRANSCODER_INPUTS[transcoder_input]}"], [f"blocks.{layers[0]}.hook_mlp_out"]
    sites = [f"blocks.{n}.hook_resid_post" for n in layers]
    return sites, list(sites)


@dataclass
class TrainConfig:
    """How a dictionary is trained. `mechscope train-dict` has one option per field."""

    sites: list[str] = field(default_factory=lambda: list(DEFAULT_SITES))
    """Sites the dictionary reads."""
    write_sites: list[str] | None = None
    """Sites it writes; None: the sites it reads (an SAE, or a crosscoder over several)."""
    kind: str | None = None
    """sae, transcoder, crosscoder or clt over `layers`, instead of sites: sets sites and write_sites (`kind_sites`)."""
    layers: list[int] | None = None
    """The layers of `kind`: one for sae and transcoder, two or more ascending for crosscoder, consecutive for clt."""
    transcoder_input: str = "normed"
    """What a transcoder reads: normed (the MLP's input, blocks.L.ln2.hook_normalized) or resid_mid."""
    expansion: int = 16
    """Latents per input dimension (d_sae = expansion x d_in; for a clt, per layer: d_sae = layers x
    expansion x d_in), unless d_sae is given."""
    d_sae: int | None = None
    """Number of latents (for a clt, over all its layers: a multiple of their number)."""
    activation: str = "topk"
    """relu, topk, batchtopk or jumprelu."""
    k: int = 64
    """Active latents per token (topk, batchtopk; per layer for a clt); jumprelu and relu start at about k
    per token (`init.start_sparse`; per layer for a clt)."""
    sparsity: float | None = None
    """Penalty coefficient: relu's L1 (default 5) or jumprelu's L0 (default 1)."""
    jumprelu_penalty: str = "l0"
    """jumprelu's penalty: l0, or tanh (Anthropic 2025)."""
    matryoshka: list[int] | None = None
    """Nested prefix sizes whose reconstruction losses add up (the last is d_sae)."""
    skip_connection: bool = False
    """An affine skip from what is read to what is written (transcoders)."""
    tokens: int = 5_000_000
    """Training tokens."""
    batch_size: int = 4096
    """Tokens per step (the global batch, over every process)."""
    lr: float | None = None
    """Adam learning rate; None: `default_lr`, c / sqrt(d_sae / 2^14) (Gao et al. 2024's scaling with width),
    c = 4e-3 for topk and batchtopk (a sweep on SmolLM2 here), 2e-3 for relu and jumprelu (pilots here)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up."""
    decay_fraction: float = 0.2
    """The last fraction of the steps over which the learning rate decays linearly to 0."""
    sparsity_warmup_fraction: float = 0.05
    """The first fraction of the steps over which the penalty coefficient rises linearly from 0."""
    dead_tokens: int | None = None
    """A latent that has not fired in this many tokens is dead (AuxK trains it back). None: a tenth of the
    run, at most 1 M tokens and at least one batch, so that short runs revive dead latents too."""
    aux_k: int | None = None
    """Dead latents AuxK uses per token; None: d_in / 2."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss."""
    selection_dtype: str = "bfloat16"
    """Precision of the encoder product that chooses the active latents (bfloat16 or float32). Their values
    and every gradient are float32 either way; bfloat16 only moves the choice at the k-th largest
    pre-activation when two are within its rounding."""
    unit_norm_decoder: bool | None = None
    """Keep decoder rows at norm 1; None: for topk and batchtopk."""
    seed: int = 0
    corpus: str | None = "builtin:all"
    """Training text (its documents, less every 20th, which are held out for evaluation)."""
    store: str | None = None
    """An activation store (mechscope harvest) to read instead of running the model."""
    ctx_len: int = 128
    skip: int = SKIP_POSITIONS
    """The first positions of each context left out (attention sinks)."""
    chunk_contexts: int = 1024
    """Contexts per chunk: the shuffle buffer holds one chunk (from the model: at most the contexts the run reads)."""
    eval_every: int = 100
    """Steps between evaluations on the held-out batch."""
    eval_tokens: int = 8192
    """Held-out tokens in each evaluation."""
    checkpoint_seconds: float = 300.0
    """Seconds between checkpoints."""
    device: str = "cpu"
    """Where the dictionary trains: cpu, cuda:N, cuda or auto (this process's GPU, cuda:LOCAL_RANK under
    torchrun, where CUDA is available; else cpu) (`runtime.process_device`). Where, not what: a run resumes,
    or is found finished, on any device."""

    def __post_init__(self):
        if self.kind is not None or self.layers is not None:
            if self.sites not in (None, DEFAULT_SITES) or self.write_sites is not None:
                raise MechscopeError("give either sites (and write_sites) or kind and layers, not both")
            if self.kind is None:
                raise MechscopeError("layers name the sites of a kind: give kind sae, transcoder, crosscoder or clt too")
            check_kind(self.kind)
            if self.layers is None:
                raise MechscopeError(f"kind {self.kind!r} needs the layers it covers: give layers too")
            self.sites, self.write_sites = kind_sites(self.kind, self.layers, self.transcoder_input)
        elif not self.sites:
            raise MechscopeError("give the sites to read, or a kind and its layers")
        if self.activation not in ACTIVATIONS:
            raise MechscopeError(f"unknown activation {self.activation!r}: valid activations are {one_of(ACTIVATIONS)}")
        if self.jumprelu_penalty != "l0" and self.activation != "jumprelu":
            raise MechscopeError(
                f"jumprelu_penalty={self.jumprelu_penalty!r} applies to jumprelu only, not {self.activation}: "
                "give activation jumprelu"
            )
        if self.kind == "clt":
            check_clt_options(self.activation, self.matryoshka, self.skip_connection)
        elif self.skip_connection and (self.write_sites is None or list(self.write_sites) == list(self.sites)):
            raise MechscopeError(SKIP_NEEDS_OTHER_SITES)
        if self.dead_tokens is None:
            self.dead_tokens = min(1_000_000, max(self.batch_size, self.tokens // 10))
        for name in ("expansion", "k", "tokens", "batch_size", "eval_every", "eval_tokens", "dead_tokens", "ctx_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MechscopeError(f"{name}={value!r} is invalid: it must be a positive integer")
        if self.selection_dtype not in ("bfloat16", "float32"):
            raise MechscopeError(f"selection_dtype={self.selection_dtype!r} is invalid: give bfloat16 or float32")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.sparsity_warmup_fraction <= 1:
            raise MechscopeError("decay_fraction and sparsity_warmup_fraction must be between 0 and 1")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)


def _activation_options(cfg: TrainConfig) -> dict:
    if cfg.activation in ("topk", "batchtopk"):
        return {"k": cfg.k}
    if cfg.activation == "relu":
        return {"l1": 5.0 if cfg.sparsity is None else cfg.sparsity}
    return {"l0": 1.0 if cfg.sparsity is None else cfg.sparsity, "penalty": cfg.jumprelu_penalty}


class _Loss(nn.Module):
    """The training loss of one batch, as a module so DistributedDataParallel can average its gradients."""

    def __init__(self, dictionary: Dictionary, cfg: TrainConfig, d_in: int):
        super().__init__()
        self.dictionary, self.cfg = dictionary, cfg
        self.aux_k = cfg.aux_k or max(1, d_in // 2)
        self.selection_dtype = {"float32": None, "bfloat16": torch.bfloat16}[cfg.selection_dtype]

    def forward(self, x_read: Tensor, x_write: Tensor, dead: Tensor, penalty_scale: float) -> dict[str, Tensor]:
        d = self.dictionary
        z = d.pre_activations(x_read, self.selection_dtype)
        rows, cols = d.activation.select(z)
        z_pairs = d.gather(z, x_read, rows, cols)
        active = Active(d.activation.values(z_pairs, cols), rows, cols, x_read.shape[0], d.d_sae)
        recon = d.decode_normalised(active, x_read)
        error = x_write - recon
        mse = error.pow(2).sum(-1).mean()
        loss = mse
        for size in (d.cfg.matryoshka or [])[:-1]:  # the last prefix is the whole dictionary: mse itself
            prefix = d.decode_normalised(active.keep(active.cols < size), x_read)
            loss = loss + (x_write - prefix).pow(2).sum(-1).mean()
        penalty = d.activation.penalty(active, z_pairs, d.decoder_norms()) if d.activation.uses_penalty else mse.new_zeros(())
        loss = loss + penalty_scale * penalty
        aux = mse.new_zeros(())
        if d.activation.name in ("topk", "batchtopk") and bool(dead.any()):
            aux = self._aux(z, x_read, error.detach(), dead)
            loss = loss + self.cfg.aux_coefficient * aux
        return {"loss": loss, "mse": mse.detach(), "penalty": penalty.detach(), "aux": aux.detach(), "active": active}

    def _aux(self, z: Tensor, x_read: Tensor, residual: Tensor, dead: Tensor) -> Tensor:
        """AuxK: the top pre-activations among dead latents reconstruct the error; MSE over the error's variance."""
        d = self.dictionary
        k = min(self.aux_k, int(dead.sum()))
        cols = z.masked_fill(~dead, -math.inf).topk(k, dim=-1, sorted=False).indices.reshape(-1)
        rows = torch.arange(z.shape[0], device=z.device).repeat_interleave(k)
        values = torch.relu(d.gather(z, x_read, rows, cols))
        aux_recon = sparse_decode(Active(values, rows, cols, z.shape[0], d.d_sae), d.W_dec)
        scale = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return (residual - aux_recon).pow(2).sum(-1).mean() / scale


LR_AT_16K = {"topk": 4e-3, "batchtopk": 4e-3, "relu": 2e-3, "jumprelu": 2e-3}
"""The default learning rate at 2^14 latents. For TopK and BatchTopK it comes from a sweep on SmolLM2's
layer-15 residual stream (inputs at mean norm sqrt(d_in), batches of 4,096 tokens, runs of 0.5-5 M tokens):
after 120 steps, held-out FVU was 0.38, 0.19, 0.13, 0.11, 0.11 at 2.7e-4, 1e-3, 3e-3, 6e-3, 1.2e-2 (9,216
latents). Gao et al.'s 2e-4 suits their far longer runs. For JumpReLU and ReLU, started sparse
(`init.start_sparse`), pilots on the same data gave held-out FVU 0.37 at 2e-4 and 0.22 at 2e-3 after 50
steps (JumpReLU); ReLU at 2e-4, started dense (b_enc = 0, its recipe), had barely lowered its L0 after 30 steps."""


def default_lr(activation: str, d_sae: int) -> float:
    """Adam's default learning rate for `activation` at `d_sae` latents: LR_AT_16K / sqrt(d_sae / 2^14)."""
    return LR_AT_16K.get(activation, 2e-4) / math.sqrt(d_sae / 2**14)


def _lr(cfg: TrainConfig, base: float, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_start = cfg.steps * (1 - cfg.decay_fraction)
    decay = 1.0 if step < decay_start else max(0.0, (cfg.steps - step) / max(1.0, cfg.steps - decay_start))
    return base * warm * decay


class Trainer:
    """Trains one dictionary; `run()` returns it. See the module docstring for the phases."""

    def __init__(self, model, cfg: TrainConfig, out: str | Path, show_progress: bool = True, source=None, eval_source=None):
        self.model, self.cfg, self.out = model, cfg, Path(out)
        self.ranks = Ranks.from_environment()
        self.device = process_device(cfg.device)
        if cfg.batch_size % self.ranks.world:
            raise MechscopeError(f"batch_size={cfg.batch_size} does not split over {self.ranks.world} processes")
        if model is None and source is None:
            raise MechscopeError("training without a model needs the activations: pass source= (e.g. a TensorSource)")
        self.show = show_progress and self.ranks.main
        name = (lambda s: model.site(s).name) if model is not None else str
        self.read = [name(s) for s in cfg.sites]
        self.write = [name(s) for s in (cfg.write_sites or cfg.sites)]
        self.all_sites = list(dict.fromkeys(self.read + self.write))
        self.d = site_width(model, self.all_sites) if model is not None else source.d
        self.blocks = blocks = len(self.read) if cfg.kind == "clt" else 1
        self.latents = cfg.d_sae or cfg.expansion * self.d * blocks
        if self.latents % blocks:
            raise MechscopeError(f"d_sae={self.latents} does not split into {blocks} equal blocks, one per layer")
        per = self.latents // blocks
        if cfg.activation in ("topk", "batchtopk") and not 1 <= cfg.k <= per:  # before any forward pass
            where = "" if blocks == 1 else " per layer"
            raise MechscopeError(f"k={cfg.k} is invalid for {per} latents{where}: k must be 1..{per}")
        self.source, self.eval_source = self._sources(source, eval_source)

    def _sources(self, given=None, given_eval=None):
        """The training source and the held-out one (from the model over held-out documents, unless given)."""
        cfg = self.cfg
        for src in (given, given_eval):
            if src is not None and list(src.sites) != self.all_sites:
                raise MechscopeError(f"the activation source holds sites {list(src.sites)}, not {self.all_sites}")
        if self.model is None:
            return given, given_eval
        per_context = cfg.ctx_len - cfg.skip
        needed = max(-(-cfg.tokens // per_context), -(-cfg.batch_size // per_context))  # a short run reads no more
        spec = StreamSpec(tuple(self.all_sites), cfg.corpus, ctx_len=cfg.ctx_len, skip=cfg.skip, seed=cfg.seed,
                          chunk_contexts=min(cfg.chunk_contexts, needed))  # fmt: skip
        train_text, eval_text = held_out(corpus(cfg.corpus))
        eval_spec = dataclasses.replace(spec, chunk_contexts=-(-cfg.eval_tokens // spec.tokens_per_context))
        eval_source = given_eval or ModelSource(self.model, eval_spec, eval_text)
        if given is not None:
            return given, eval_source
        if cfg.store is None:
            return ModelSource(self.model, spec, train_text), eval_source
        return StoreSource(cfg.store, seed=cfg.seed, sites=self.all_sites), eval_source  # the sites it needs, of any store

    def _split(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """A batch [B, n_sites, d] as normalised (reads [B, R·d], writes [B, W·d])."""
        index = {s: i for i, s in enumerate(self.all_sites)}
        x_read = batch[:, [index[s] for s in self.read]].flatten(1) * self.dictionary.input_scale
        x_write = batch[:, [index[s] for s in self.write]].flatten(1) * self.dictionary.output_scale
        return x_read, x_write

    def _new_dictionary(self, sample: Tensor) -> Dictionary:
        cfg = self.cfg
        index = {s: i for i, s in enumerate(self.all_sites)}
        from mechscope.models.fingerprint import model_fingerprint

        dict_cfg = DictConfig(
            self.read, self.write, self.d, self.d, self.latents, cfg.activation, _activation_options(cfg),
            layered=cfg.kind == "clt", skip_connection=cfg.skip_connection, matryoshka=cfg.matryoshka,
            model=self.model.name if self.model else "", skip_positions=cfg.skip,
            model_fingerprint=model_fingerprint(self.model) if self.model else "",
            input_scale=mean_norm_scales(sample[:, [index[s] for s in self.read]]),
            output_scale=mean_norm_scales(sample[:, [index[s] for s in self.write]]),
        )  # fmt: skip
        dictionary = Dictionary(dict_cfg)
        self.dictionary = dictionary
        rows = torch.randperm(
            len(sample), generator=torch.Generator().manual_seed(cfg.seed)
        )  # a chunk's rows come in runs of one text
        inputs, targets = self._split(sample[rows[:16384]])
        initialise(dictionary, targets, cfg.seed, decoder_norm=0.1 if cfg.activation == "relu" else 1.0, inputs=inputs)
        if cfg.activation in ("jumprelu", "relu"):
            start_sparse(dictionary, *self._split(sample[rows[:4096]]), cfg.k * dictionary.blocks)  # k per layer for a clt
        return dictionary

    def _finished(self) -> Dictionary | None:
        """The dictionary of a run that already finished in `out` with this config (None if there is none).

        A finished run keeps no checkpoint; starting it again must not train afresh over its log and weights.
        """
        from mechscope.dictionaries.formats.own import load_dictionary, read_config

        if not (self.out / "dictionary" / "cfg.json").is_file():
            return None
        saved = read_config(self.out / "dictionary").get("training", {}).get("config")
        if (differ := self._differs(saved)) is not None:
            raise MechscopeError(
                f"{str(self.out)!r} holds a finished run with other settings ({', '.join(differ[:4])}): "
                "give another folder, or remove that one to train again"
            )
        return load_dictionary(self.out / "dictionary")

    def _differs(self, saved: dict | None) -> list[str] | None:
        """The options in which a saved run's config differs from this one (None: the same, or no config saved is
        compared as different: ["config"]). Checkpoint spacing, evaluation cadence and the device may change."""
        if saved is None:
            return ["config"]
        ignored = ("checkpoint_seconds", "eval_every", "device")
        want = json.loads(json.dumps(dataclasses.asdict(self.cfg)))
        saved = {**json.loads(json.dumps(dataclasses.asdict(TrainConfig()))), **saved}  # fields added since count at default
        differ = [k for k in want if k not in ignored and saved.get(k) != want[k]]
        return differ or None

    def run(self) -> Dictionary:
        cfg = self.cfg
        base_lr = cfg.lr or default_lr(cfg.activation, self.latents // self.blocks)
        state = checkpoint.load(self.out / "checkpoint")
        if state is None and (done := self._finished()) is not None:
            return done
        if state is None:  # initialised on the CPU, where the chunk is: the same start on every device
            dictionary = self._new_dictionary(next(self.source.chunks(0))[1]).to(self.device)
        else:
            if state.get("train_cfg") is not None and (differ := self._differs(state["train_cfg"])):
                shown = ", ".join(f"{k} {state['train_cfg'].get(k)!r} (now {getattr(cfg, k)!r})" for k in differ[:3])
                raise MechscopeError(
                    f"the checkpoint in {str(self.out)!r} is of a run with other settings: {shown}; run it with those to "
                    "continue, give another folder, or remove its checkpoint to start over"
                )
            self.dictionary = dictionary = Dictionary(DictConfig(**state["dict_cfg"])).to(self.device)
        unit_norm = cfg.unit_norm_decoder if cfg.unit_norm_decoder is not None else cfg.activation in ("topk", "batchtopk")
        loss_fn = _Loss(dictionary, cfg, self.d)
        ddp = loss_fn
        if self.ranks.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(loss_fn, device_ids=ids, find_unused_parameters=True)
        optimizer = torch.optim.Adam(dictionary.parameters(), lr=base_lr, betas=(0.9, 0.999), fused=True)
        since_fired = torch.zeros(dictionary.d_sae, dtype=torch.long, device=self.device)
        start = 0
        if state is not None:
            start = checkpoint.restore(state, dictionary, optimizer, since_fired)
            if self.show:
                from rich.console import Console

                said = f"resuming from the checkpoint in {str(self.out)!r} at step {start:,} of {cfg.steps:,}"
                Console(stderr=True).print(said, highlight=False, markup=False)
        eval_batch = (
            self._split(next(self.eval_source.chunks(0))[1][: cfg.eval_tokens].to(self.device)) if self.eval_source else None
        )
        metrics_file = self.out / "metrics.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        if self.ranks.main:  # the log as it was at the checkpoint (empty for a new run)
            lines = metrics_file.read_text().splitlines(keepends=True) if metrics_file.exists() and state else []
            metrics_file.write_text("".join(lines[: state["metrics_lines"]] if state else []))
        last_save, shown = time.monotonic(), {}
        local = cfg.batch_size // self.ranks.world
        fields = "loss {task.fields[loss]:.4f} L0 {task.fields[l0]:.1f} FVU {task.fields[fvu]:.3f} dead {task.fields[dead]:.1%}"
        started = time.perf_counter()
        with progress("train", fields, self.show) as bar:
            task = bar.add_task("train", total=cfg.steps, completed=start, loss=math.nan, l0=math.nan, fvu=math.nan, dead=0.0)
            for step, batch in batches(self.source, cfg.batch_size, cfg.seed, start):
                if step >= cfg.steps:
                    break
                x_read, x_write = self._split(batch[self.ranks.rank * local : (self.ranks.rank + 1) * local].to(self.device))
                for group in optimizer.param_groups:
                    group["lr"] = _lr(cfg, base_lr, step)
                dead = since_fired >= cfg.dead_tokens
                penalty_scale = min(1.0, (step + 1) / max(1.0, cfg.sparsity_warmup_fraction * cfg.steps))
                out = ddp(x_read, x_write, dead, penalty_scale)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                if dictionary.W_dec.grad is not None:  # a CLT's latents never write layers before their own
                    dictionary.mask_decoder_(dictionary.W_dec.grad)
                if unit_norm:
                    _remove_parallel_grad(dictionary.W_dec)
                optimizer.step()
                if unit_norm:
                    with torch.no_grad():
                        dictionary.W_dec /= dictionary.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                active: Active = out["active"]
                fired = torch.zeros_like(since_fired).index_fill_(0, active.cols[active.values > 0], 1)
                fired = self.ranks.all_reduce_max(fired).bool()
                since_fired = torch.where(fired, 0, since_fired + cfg.batch_size)
                dictionary.activation.observe(active)
                variance = (x_write - x_write.mean(0)).pow(2).sum(-1).mean()
                dead_now = float((since_fired >= cfg.dead_tokens).float().mean())
                shown = {"loss": float(out["loss"].detach()), "l0": float(active.l0().float().mean()),
                         "fvu": float(out["mse"] / variance), "dead": dead_now}  # fmt: skip
                bar.update(task, completed=step + 1, **shown)
                record = {"step": step + 1, "tokens": (step + 1) * cfg.batch_size, "lr": _lr(cfg, base_lr, step), **shown,
                          "aux": float(out["aux"]), "penalty": float(out["penalty"]),
                          "seconds": round(time.perf_counter() - started, 4)}  # fmt: skip
                if eval_batch is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                    record.update(evaluate_batch(dictionary, *eval_batch))
                if self.ranks.main:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                if time.monotonic() - last_save > cfg.checkpoint_seconds and step + 1 < cfg.steps:
                    self._checkpoint(optimizer, since_fired, step + 1, metrics_file)
                    last_save = time.monotonic()
        if self.ranks.main:
            save_dictionary(dictionary.eval(), self.out / "dictionary", extra={"config": dataclasses.asdict(cfg), "final": shown})
            checkpoint.remove(self.out / "checkpoint")
        self.ranks.barrier()
        return dictionary.eval()

    def _checkpoint(self, optimizer, since_fired: Tensor, step: int, metrics_file: Path) -> None:
        if self.ranks.main:
            lines = metrics_file.read_text().count("\n") if metrics_file.exists() else 0
            checkpoint.save(self.out / "checkpoint", self.dictionary, optimizer, since_fired, step, metrics_lines=lines,
                            train_cfg=json.loads(json.dumps(dataclasses.asdict(self.cfg))))  # fmt: skip
        self.ranks.barrier()


@torch.no_grad()
def evaluate_batch(dictionary: Dictionary, x_read: Tensor, x_write: Tensor) -> dict[str, float]:
    """FVU and L0 of the dictionary on a held-out batch (normalised reads and writes)."""
    training = dictionary.training
    out = dictionary.eval().forward_normalised(x_read)
    dictionary.train(training)
    fvu = (x_write - out.recon).pow(2).sum() / (x_write - x_write.mean(0)).pow(2).sum()
    return {"eval_fvu": float(fvu), "eval_l0": float(out.active.l0().float().mean())}


@torch.no_grad()
def _remove_parallel_grad(W_dec: nn.Parameter) -> None:
    """Remove from each decoder row's gradient its component along the (unit) row."""
    if W_dec.grad is not None:
        W_dec.grad.addcmul_(W_dec, torch.linalg.vecdot(W_dec.grad, W_dec)[:, None], value=-1)


def train_dictionary(
    model, cfg: TrainConfig, out: str | Path, show_progress: bool = True, source=None, eval_source=None
) -> Dictionary:
    """Train a dictionary on `model` as `cfg` says, checkpointing into `out` and saving it to `out/dictionary`.

    The activations come from `source` when one is given (e.g. `activations.TensorSource` over a tensor
    already in memory), else from `cfg.store`, else from the model as it runs over `cfg.corpus`; the
    held-out batch from `eval_source`, else from the model over held-out documents. With a source and
    no model (`model=None`), training runs on the tensors alone (evaluating only with an `eval_source`).

    A run killed at any moment continues from `out/checkpoint` when started again with the same config,
    and ends with the same weights as a run that never stopped. A run that has finished is not trained
    again: the same config returns its dictionary, another raises `MechscopeError`.

    >>> d = train_dictionary(model, TrainConfig(sites=["blocks.15.hook_resid_post"], k=64, tokens=5_000_000), "sae-l15")
    """
    return Trainer(model, cfg, out, show_progress, source, eval_source).run()
