"""Train a tiny GELU, SoLU or TopK transformer (`tiny_model`) from scratch on the CPU: `train_tiny(cfg, out)`.

Phases:
1. Tokenizer: a byte-level BPE trained on the corpus's training documents (every document but each
   20th, `data.held_out`), or one reused from another folder, so several runs read the same tokens.
2. Data: the training documents, packed into contexts (`data.pack`, shuffled from the seed) until the
   run's token budget is met (another shuffled pass when one is not enough); step i reads contexts
   i*batch .. (i+1)*batch - 1, so every architecture trained with one seed reads the same tokens in
   the same order. A fixed slice of held-out contexts measures the held-out loss.
3. Train: next-token cross-entropy, AdamW (decay on matrices and embeddings only), the learning rate
   warmed up linearly, then decayed along a cosine to `min_lr_fraction` of its peak; gradients
   clipped to norm `grad_clip`. The starting weights are drawn from the seed (`init_weights`).
4. Every `checkpoint_every` steps, write `OUT.training/checkpoint` atomically (weights, Adam's
   moments, the step, which fixes the schedule and the data position, the RNG state, and how many
   lines of the metrics log it covers). A run started again with the same settings resumes there and
   ends with the same weights, bit for bit, as a run that never stopped; other settings are refused.
5. At the end, write OUT in one rename: config.json, model.safetensors, the tokenizer files,
   metrics.jsonl, curves.png (train and held-out loss) and train.json (the settings and the result).
   `mechscope.load(OUT)` then reads it like any HF folder.

>>> run = train_tiny(TinyTrainConfig(act="solu"), "tiny-solu")
>>> run.held_out_loss, run.params
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.runtime import atomic_folder, progress
from mechscope.toys.tiny_shape import check_shape

DEFAULT_TOKENS = 1_000_000
"""Training tokens by default: 488 steps of 16 x 128 tokens, which a 2-layer, d_model 256 model with a
4,096-token vocabulary trains in about 11 to 13 minutes on 2 shared CPU cores (docs/tiny.md, "Speed")."""
NOT_SETTINGS = ("checkpoint_every", "threads")
"""Fields a resumed run may change: they change neither the weights nor the log."""


@dataclass
class TinyTrainConfig:
    """How a tiny model is trained. `mechscope train-tiny` has one option per field."""

    act: str = "gelu"
    """MLP activation: gelu (the baseline), solu (x * softmax(x), then a LayerNorm) or topk (GELU of the k largest units)."""
    layers: int = 2
    """Transformer blocks: 1 or 2."""
    d_model: int = 256
    """Width of the residual stream (at most 256)."""
    n_heads: int = 4
    """Attention heads (d_head = d_model / n_heads)."""
    d_mlp: int | None = None
    """MLP neurons per layer; unset: 4 * d_model."""
    k: int = 32
    """Neurons kept per token by topk (1..d_mlp); other activations ignore it."""
    vocab: int = 4096
    """BPE vocabulary size (4,096 to 8,192 suit the built-in corpus; 512 and up is allowed); a reused tokenizer keeps its own."""
    ctx_len: int = 128
    """Tokens per context, the start token included (the model's context length)."""
    batch: int = 16
    """Contexts per step (16 learned as much from 150 k tokens as 32 from 300 k, at 2/3 of the speed per token)."""
    tokens: int = DEFAULT_TOKENS
    """Training tokens (whole steps of batch x ctx_len tokens)."""
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    warmup_steps: int = 30
    """Steps over which the learning rate rises linearly to its peak."""
    min_lr_fraction: float = 0.1
    """The learning rate decays along a cosine to this fraction of its peak at the last step."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices and embeddings (not on biases or LayerNorms)."""
    grad_clip: float = 1.0
    """Largest gradient norm; larger gradients are scaled down to it."""
    seed: int = 0
    """Seeds the starting weights and the order of the training contexts."""
    corpus: str = "builtin:all"
    """Training text: builtin, builtin:source, builtin:all, a file or folder (every 20th document is held out)."""
    tokenizer: str | None = None
    """A folder holding a tokenizer.json to reuse (another tiny model's); unset: train one on the training documents."""
    eval_every: int = 40
    """Steps between held-out losses (the last step always has one)."""
    eval_contexts: int = 64
    """Held-out contexts in each held-out loss (the same ones every time)."""
    checkpoint_every: int = 100
    """Steps between checkpoints."""
    threads: int | None = None
    """CPU threads for torch during training; unset: the cores this process may run on."""

    def __post_init__(self):
        for name in ("vocab", "ctx_len", "batch", "tokens", "eval_every", "eval_contexts", "checkpoint_every", "warmup_steps"):
            value = getattr(self, name)
            low = 0 if name == "warmup_steps" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise MechscopeError(f"{name}={value!r} is invalid: it must be an integer of at least {low}")
        check_shape(self.act, self.layers, self.d_model, self.n_heads, self.d_mlp_or_default, self.k)  # with the valid ranges
        if not 512 <= self.vocab <= 8192:
            raise MechscopeError(f"vocab={self.vocab} is out of range: valid values are 512..8192")
        if not 8 <= self.ctx_len <= 2048:
            raise MechscopeError(f"ctx_len={self.ctx_len} is out of range: valid values are 8..2048")
        if self.tokens < self.batch * self.ctx_len:
            raise MechscopeError(
                f"tokens={self.tokens} is less than one step of batch x ctx_len = {self.batch * self.ctx_len} tokens"
            )
        for name, ok, valid in (("lr", self.lr > 0, "a positive number"), ("grad_clip", self.grad_clip > 0, "a positive number"),
                                ("min_lr_fraction", 0 <= self.min_lr_fraction <= 1, "a number in [0, 1]"),
                                ("weight_decay", self.weight_decay >= 0, "a number of at least 0")):  # fmt: skip
            if not ok:
                raise MechscopeError(f"{name}={getattr(self, name)!r} is invalid: give {valid}")
        if self.threads is not None and self.threads < 1:
            raise MechscopeError(f"threads={self.threads} is invalid: give at least 1, or leave it unset for every core")

    @property
    def d_mlp_or_default(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch * self.ctx_len)

    def settings(self) -> dict:
        """The fields that decide the weights and the log (everything but `NOT_SETTINGS`), JSON-ready."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_SETTINGS}


class TinyRun(NamedTuple):
    """What a finished run reports (also in OUT/train.json)."""

    folder: Path
    """The saved model: `mechscope.load(folder)`."""
    params: int
    """Parameters of the model."""
    tokens: int
    """Tokens trained on."""
    held_out_loss: float
    """Cross-entropy (nats per token) on the held-out contexts at the end."""
    seconds: float
    """Seconds spent in training steps and held-out losses, over every resumed part of the run."""
    tokens_per_second: float
    """Training tokens per second of `seconds`."""


def lr_at(cfg: TinyTrainConfig, step: int) -> float:
    """The learning rate of step `step` (0-based): linear warm-up, then a cosine down to min_lr_fraction."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress_ = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_fraction
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))


def training_contexts(cfg: TinyTrainConfig, tokenizer, train_text) -> Tensor:
    """The [steps * batch, ctx_len] int32 contexts the run reads, in order; another shuffled pass over the
    documents (seeded from the seed and the pass) follows when one does not hold enough."""
    from mechscope.data import pack

    needed, parts, have, epoch = cfg.steps * cfg.batch, [], 0, 0
    while have < needed:
        seed = cfg.seed * 1009 + epoch
        for chunk in pack(train_text, tokenizer, cfg.ctx_len, seed=seed, batch_size=1024, max_contexts=needed - have):
            parts.append(chunk.tokens.to(torch.int32))
            have += len(chunk.tokens)
        epoch += 1
    return torch.cat(parts)


def batches(contexts: Tensor, batch: int, start: int) -> Iterator[tuple[int, Tensor]]:
    """(step, [batch, ctx_len] int64 token ids) from step `start` on."""
    for step in range(start, len(contexts) // batch):
        yield step, contexts[step * batch : (step + 1) * batch].long()


def next_token_loss(model, ids: Tensor) -> Tensor:
    """Mean cross-entropy of each next token of `ids` [batch, ctx_len] (nats)."""
    logits = model(ids, use_cache=False).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def held_out_loss(model, contexts: Tensor) -> float:
    """Mean next-token cross-entropy over `contexts` [n, ctx_len], in eval mode, 32 contexts at a time."""
    training = model.training
    model.eval()
    total = sum(float(next_token_loss(model, part.long())) * len(part) for part in contexts.split(32))
    model.train(training)
    return total / len(contexts)


# -- the run ----------------------------------------------------------------------------------------


def _refuse_other_settings(saved: dict, cfg: TinyTrainConfig, where: str, what: str) -> None:
    want = json.loads(json.dumps(cfg.settings()))
    saved = {**want, **saved}  # fields added since count as equal
    differ = [k for k in want if saved[k] != want[k]]
    if differ:
        shown = ", ".join(f"{k} {saved[k]!r} (now {want[k]!r})" for k in differ[:3])
        raise MechscopeError(f"{where!r} holds {what} with other settings: {shown}; run it with those, or give another folder")


def finished_run(cfg: TinyTrainConfig, out: Path) -> TinyRun | None:
    """The result of a run already saved in `out` with these settings; None if `out` is new or empty."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / "train.json").is_file():
        raise MechscopeError(f"{str(out)!r} exists and is not a tiny-model run (it has no train.json): give a new folder")
    saved = json.loads((out / "train.json").read_text())
    _refuse_other_settings(saved.get("settings", {}), cfg, str(out), "a finished run")
    return TinyRun(out, **{k: saved[k] for k in TinyRun._fields if k != "folder"})


def _tokenizer(cfg: TinyTrainConfig, work: Path, train_text):
    """The run's tokenizer: the one saved in `work`, else the one `cfg.tokenizer` names, else one trained
    on the training documents; saved in `work` so a resumed run reads the same tokens."""
    from mechscope.toys.tiny_tokenizer import load_tokenizer, train_tokenizer

    if (work / "tokenizer" / "tokenizer.json").is_file():
        return load_tokenizer(work / "tokenizer")
    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        tokenizer = train_tokenizer((d.text for d in train_text.documents()), cfg.vocab)
    tokenizer.save_pretrained(work / "tokenizer")
    return tokenizer


def _model(cfg: TinyTrainConfig, tokenizer):
    from mechscope.toys.tiny_model import TinyConfig, TinyForCausalLM, init_weights

    config = TinyConfig(
        act=cfg.act, k=cfg.k, vocab_size=len(tokenizer), max_position_embeddings=cfg.ctx_len, hidden_size=cfg.d_model,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_mlp_or_default,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return init_weights(TinyForCausalLM(config), cfg.seed).train()


def _optimizer(cfg: TinyTrainConfig, model) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices and embeddings
    rest = [p for p in model.parameters() if p.ndim < 2]  # biases and LayerNorm weights
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


class _Trainer:
    """One run in the working folder `work`: set up (or resume), train, save to `out`."""

    def __init__(self, cfg: TinyTrainConfig, out: Path, work: Path, show: bool):
        from mechscope.data import corpus, held_out, pack

        self.cfg, self.out, self.work, self.show = cfg, out, work, show
        train_text, held_text = held_out(corpus(cfg.corpus))  # a bad corpus is refused before any folder is made
        if (work / "settings.json").is_file():  # a run started here before, perhaps killed before its first checkpoint
            _refuse_other_settings(json.loads((work / "settings.json").read_text()), cfg, str(work), "a run")
        work.mkdir(parents=True, exist_ok=True)
        (work / "settings.json").write_text(json.dumps(cfg.settings()))
        self.tokenizer = _tokenizer(cfg, work, train_text)
        self.contexts = training_contexts(cfg, self.tokenizer, train_text)
        n = cfg.eval_contexts
        self.held = next(pack(held_text, self.tokenizer, cfg.ctx_len, seed=0, batch_size=n, max_contexts=n)).tokens
        self.model = _model(cfg, self.tokenizer)
        self.optimizer = _optimizer(cfg, self.model)

    def run(self) -> TinyRun:
        from mechscope.toys import tiny_checkpoint as checkpoint

        cfg, metrics = self.cfg, self.work / "metrics.jsonl"
        state = checkpoint.load(self.work / "checkpoint")
        start, seconds = 0, 0.0
        if state is not None:
            checkpoint.restore(state, self.model, self.optimizer)
            start, seconds = state["step"], state["seconds"]
            if self.show:
                said = f"resuming the run in {str(self.work)!r} at step {start:,} of {cfg.steps:,}"
                Console(stderr=True).print(said, highlight=False, markup=False)
        lines = metrics.read_text().splitlines(keepends=True) if metrics.exists() else []
        metrics.write_text("".join(lines[:start]))  # one line per step: the log as it was at the checkpoint
        fields = "loss {task.fields[loss]:.3f} · held-out {task.fields[held]:.3f}"
        with progress(f"train-tiny {cfg.act}", fields, self.show) as bar, metrics.open("a") as log:
            task = bar.add_task("train", total=cfg.steps, completed=start, loss=math.nan, held=math.nan)
            began = time.perf_counter()
            for step, ids in batches(self.contexts, cfg.batch, start):
                record = self.step(step, ids)
                log.write(json.dumps(record) + "\n")
                log.flush()
                held = {"held": record["held_out_loss"]} if "held_out_loss" in record else {}  # else the last one stays
                bar.update(task, completed=step + 1, loss=record["loss"], **held)
                if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                    meta = {"step": step + 1, "seconds": seconds + time.perf_counter() - began, "settings": cfg.settings()}
                    checkpoint.save(self.work / "checkpoint", self.model, self.optimizer, meta)
            seconds += time.perf_counter() - began
        return _save(cfg, self.out, self.work, self.model.eval(), self.tokenizer, seconds)

    def step(self, step: int, ids: Tensor) -> dict:
        """One optimiser step on `ids` [batch, ctx_len]; its line of the metrics log."""
        cfg, lr = self.cfg, lr_at(self.cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = next_token_loss(self.model, ids)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        record = {"step": step + 1, "tokens": (step + 1) * cfg.batch * cfg.ctx_len, "loss": float(loss.detach()), "lr": lr}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["held_out_loss"] = held_out_loss(self.model, self.held)
        return record


def _save(cfg: TinyTrainConfig, out: Path, work: Path, model, tokenizer, seconds: float) -> TinyRun:
    """Write the finished model's folder in one rename, then remove the working folder."""
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    tokens = cfg.steps * cfg.batch * cfg.ctx_len
    params = sum(p.numel() for p in model.parameters())
    run = TinyRun(out, params, tokens, records[-1]["held_out_loss"], seconds, tokens / seconds)
    with atomic_folder(out) as tmp, _quiet_saving():
        model.save_pretrained(tmp)  # safetensors: the only format transformers 5 writes
        tokenizer.save_pretrained(tmp)
        shutil.copy(work / "metrics.jsonl", tmp / "metrics.jsonl")
        title = (
            f"{cfg.act}, {cfg.layers} layer{'s' * (cfg.layers > 1)}, d_model {cfg.d_model}: held-out loss {run.held_out_loss:.3f}"
        )
        loss_curves_png(records, tmp / "curves.png", title)
        summary = {k: v for k, v in run._asdict().items() if k != "folder"}
        summary |= {"steps": cfg.steps, "vocab": len(tokenizer), "settings": cfg.settings()}
        (tmp / "train.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return run


@contextlib.contextmanager
def _quiet_saving():
    """Keep transformers' progress bar for writing weights off the terminal (the run has its own)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def loss_curves_png(records: list[dict], path: Path, title: str) -> None:
    """Train loss at every step and held-out loss where measured, against training tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.plot([r["tokens"] / 1e6 for r in records], [r["loss"] for r in records], lw=1, label="train")
    held = [(r["tokens"] / 1e6, r["held_out_loss"]) for r in records if "held_out_loss" in r]
    ax.plot(*zip(*held, strict=True), "o-", ms=3, lw=1, label="held-out")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    try:
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def train_tiny(cfg: TinyTrainConfig, out: str | Path, show_progress: bool = True) -> TinyRun:
    """Train a tiny model as `cfg` says and save it to the folder `out` (see the module docstring).

    A run killed at any moment continues from `OUT.training/checkpoint` when started again with the same
    settings; a finished run is not trained again (the same settings return its result, others are refused).
    """
    out = Path(out)
    if cfg.tokenizer is not None and not (Path(cfg.tokenizer) / "tokenizer.json").is_file():
        raise MechscopeError(
            f"tokenizer={cfg.tokenizer!r} has no tokenizer.json: give a folder holding one (another tiny model's)"
        )
    if (done := finished_run(cfg, out)) is not None:
        return done
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or available_cores())
    try:
        return _Trainer(cfg, out, out.with_name(out.name + ".training"), show_progress).run()
    finally:
        torch.set_num_threads(previous)
