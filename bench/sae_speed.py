"""One SAE trainer timed on in-memory activations: `python bench/sae_speed.py TOOL ACTS STEPS OUT.json`.

Run by `bench_sae.py` in a fresh process per tool (mechscope's venv for `mechscope` and `peak`, the peers'
venv for `saelens` and `sparsify`), so that each peak RSS is that tool's alone. Every tool trains a TopK
SAE 576 -> 9,216 latents, k = 64, on batches of 4,096 tokens drawn in the same seeded order from the
same activations (ACTS, a safetensors file: "train" [n, 576] and "eval" [m, 576] float32), with its own
defaults otherwise (initialisation, optimiser and learning rate, auxiliary loss). Afterwards each SAE
encodes and decodes the held-out rows with the tool's own inference code, and FVU is computed here the
same way for all: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2.

  mechscope  mechscope's trainer (`train_dictionary` on a `TensorSource`, no model)
  saelens    SAELens's `SAETrainer` with a `TopKTrainingSAE`, fed the batches
  sparsify   sparsify's `SparseCoder` stepped as its `Trainer` steps it (its default optimiser: signum
             under a schedule-free wrapper; the decoder's parallel gradient removed, rows renormalised)
  peak       this machine's matmul peak: float32 and bfloat16 [4096, 576] x [576, 9216] products

Prints nothing; writes one JSON object to OUT.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import torch

D_IN, D_SAE, K, BATCH = 576, 9216, 64, 4096


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _load(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(path)
    return tensors["train"], tensors["eval"]


def _batch(train: torch.Tensor, i: int) -> torch.Tensor:
    """Batch i of the one seeded sequence every tool sees: passes over `train`, each in a new random order."""
    per_pass = len(train) // BATCH
    epoch, within = divmod(i, per_pass)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
    return train[order[within * BATCH : (within + 1) * BATCH]]


def _batches(train: torch.Tensor, steps: int):
    for i in range(steps):
        yield _batch(train, i)


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def _steady(stamps: list[float]) -> float:
    """Seconds per step: the median gap between steps, the first three (warm-up) left out."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][3:]
    return statistics.median(gaps)


def run_mechscope(train, held, steps):
    from mechscope.activations import TensorSource
    from mechscope.dictionaries import TrainConfig, train_dictionary

    class Timed(TensorSource):
        """Chunk i is batch i of `_batch` (so step i trains on it), with a time stamp per step."""

        def __init__(self):
            super().__init__(train[:BATCH, None], ["blocks.15.hook_resid_post"], BATCH)
            self.stamps = []

        def chunks(self, start=0):
            for number in range(start, steps):
                self.stamps.append(time.perf_counter())
                yield number, _batch(train, number)[:, None]

    source = Timed()
    cfg = TrainConfig(sites=["blocks.15.hook_resid_post"], d_sae=D_SAE, k=K, tokens=steps * BATCH, batch_size=BATCH,
                      eval_every=10**9, checkpoint_seconds=1e9, dead_tokens=10_000_000)  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        sae = train_dictionary(None, cfg, out, show_progress=False, source=source)
        seconds = time.perf_counter() - start
    source.stamps.append(time.perf_counter())
    with torch.no_grad():
        x_hat = sae(held).recon[:, 0]
    return seconds, source.stamps, x_hat


def run_saelens(train, held, steps):
    from sae_lens import LanguageModelSAERunnerConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig

    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K), hook_name="blocks.15.hook_resid_post",
        training_tokens=steps * BATCH, train_batch_size_tokens=BATCH, logger=LoggingConfig(log_to_wandb=False),
        output_path=None, checkpoint_path=tempfile.mkdtemp(),
    )  # fmt: skip
    stamps: list[float] = []

    def feed():
        for batch in _batches(train, steps):
            stamps.append(time.perf_counter())
            yield batch

    sae = TopKTrainingSAE(cfg.sae)
    trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=feed())
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    stamps.append(time.perf_counter())
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(held))
    return seconds, stamps, x_hat


def run_sparsify(train, held, steps):
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    sae = SparseCoder(D_IN, SparseCoderConfig(k=K, num_latents=D_SAE), device="cpu")
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (D_SAE / 2**14) ** 0.5}]), momentum=0.95)
    opt.train()
    since_fired = torch.zeros(D_SAE, dtype=torch.long)
    stamps: list[float] = []
    start = time.perf_counter()
    for batch in _batches(train, steps):
        stamps.append(time.perf_counter())
        out = sae(batch, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            since_fired += BATCH
            since_fired[out.latent_indices.flatten()] = 0
    seconds = time.perf_counter() - start
    stamps.append(time.perf_counter())
    opt.eval()
    with torch.no_grad():
        x_hat = sae(held).sae_out
    return seconds, stamps, x_hat


def run_peak():
    x, w = torch.randn(BATCH, D_IN), torch.randn(D_IN, D_SAE)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = x.to(dtype), w.to(dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(10):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        out[f"{name}_flops"] = 2 * BATCH * D_IN * D_SAE / min(times)
    return out


def main(tool: str, acts: str, steps: int, out_path: str) -> None:
    if tool == "peak":
        result = run_peak()
    else:
        train, held = _load(acts)
        seconds, stamps, x_hat = {"mechscope": run_mechscope, "saelens": run_saelens, "sparsify": run_sparsify}[tool](
            train, held, steps
        )
        per_step = _steady(stamps)
        result = {"tool": tool, "steps": steps, "tokens": steps * BATCH, "seconds": seconds, "step_s": per_step,
                  "tokens_per_s": BATCH / per_step, "eval_fvu": _fvu(held, x_hat), "peak_rss": _hwm(),
                  "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
