"""SAE training throughput of SAELens and sparsify (peers' venv): `python bench/peers/sae.py MODE FOLDER IN_DIR`.

Every run trains a TopK SAE (d_in 576 -> 9,216 latents, k = 64) on SmolLM2's layer-15 residual stream
(`blocks.15.hook_resid_post`, the output of decoder layer 15) from contexts of the built-in corpus written
by ours.py, on the CPU, in batches of 4,096 tokens, each tool with its own defaults otherwise
(optimiser, learning rate, auxiliary loss). MODEs:

  saelens_train   SAELens's `SAETrainer` fed activations read beforehand (IN_DIR/sae_acts.pt, 16,384
                  tokens, reshuffled each pass): the trainer alone
  saelens_e2e     SAELens's `LanguageModelSAETrainingRunner` on the token contexts: it runs the model
                  (a HookedTransformer stopping after layer 15) into its mixing buffer and trains
  sparsify_e2e    sparsify's `Trainer` on the token contexts: a full forward of the HF model per batch,
                  the SAE trained inside a hook on layer 15; also times the same forwards alone, so
                  the SAE's share can be derived

Prints one JSON line: tokens, seconds, tokens/s, and per-step times where the tool exposes steps.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import tools  # noqa: E402
import torch  # noqa: E402
from common import log  # noqa: E402

D_IN, D_SAE, K = 576, 9216, 64
LAYER = 15
BATCH_TOKENS = 4096
CONTEXTS_PER_BATCH = BATCH_TOKENS // common.SEQ  # 32 contexts of 128 tokens
# Run lengths, sized for about a minute or two each on 2 cores.
STEPS = {"saelens_train": 24, "saelens_e2e": 12, "sparsify_e2e": 12}
if tools.QUICK:
    STEPS = dict.fromkeys(STEPS, 3)


def _rate(tokens: int, seconds: float, stamps: list[float], per_step: int) -> dict:
    """Overall tokens/s, and the steady rate from the median gap between steps (first two dropped: warm-up)."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][2:]
    steady = per_step / statistics.median(gaps) if gaps else None
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "steady_tokens_per_s": steady}


def _timed(fn) -> tuple[float, float]:
    """(seconds, cores other processes used meanwhile)."""
    return common.timed(fn)


def saelens_train(folder: str, in_dir: Path) -> dict:
    from sae_lens import LanguageModelSAERunnerConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig

    acts = torch.load(in_dir / "sae_acts.pt", weights_only=True)
    steps = STEPS["saelens_train"]
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K),
        hook_name=f"blocks.{LAYER}.hook_resid_post",
        training_tokens=steps * BATCH_TOKENS,
        train_batch_size_tokens=BATCH_TOKENS,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=None,
        checkpoint_path=tempfile.mkdtemp(),
    )
    stamps: list[float] = []

    def batches():
        generator = torch.Generator().manual_seed(0)
        while True:
            order = torch.randperm(acts.shape[0], generator=generator)
            for start in range(0, acts.shape[0] - BATCH_TOKENS + 1, BATCH_TOKENS):
                stamps.append(time.perf_counter())
                yield acts[order[start : start + BATCH_TOKENS]]

    sae = TopKTrainingSAE(cfg.sae)
    trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=batches())
    seconds, busy = _timed(trainer.fit)
    stamps.append(time.perf_counter())
    return {**_rate(steps * BATCH_TOKENS, seconds, stamps, BATCH_TOKENS), "background_cores": busy, "steps": steps}


def _token_dataset(in_dir: Path, contexts: int):
    from datasets import Dataset

    tokens = torch.load(in_dir / "sae_tokens.pt", weights_only=True)[:contexts]
    if tokens.shape[0] < contexts:
        raise RuntimeError(f"need {contexts} contexts, IN_DIR has {tokens.shape[0]}")
    return Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch"), tokens


def saelens_e2e(folder: str, in_dir: Path) -> dict:
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig

    steps = STEPS["saelens_e2e"]
    dataset, _ = _token_dataset(in_dir, (steps + 8) * CONTEXTS_PER_BATCH)  # the buffer reads ahead of training
    model = tools.load("hooked", folder)
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K),
        model_name=folder,
        hook_name=f"blocks.{LAYER}.hook_resid_post",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=common.SEQ,
        prepend_bos=False,  # the contexts already open with the start token
        training_tokens=steps * BATCH_TOKENS,
        train_batch_size_tokens=BATCH_TOKENS,
        store_batch_size_prompts=16,
        n_batches_in_buffer=64,  # its buffer holds this many contexts: 8,192 tokens, two training batches
        logger=LoggingConfig(log_to_wandb=False),
        output_path=None,
        checkpoint_path=tempfile.mkdtemp(),
    )
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
    stamps: list[float] = []
    runner.model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    seconds, busy = _timed(runner.run)
    return {
        "tokens": steps * BATCH_TOKENS,
        "seconds": seconds,
        "tokens_per_s": steps * BATCH_TOKENS / seconds,
        "model_forwards": len(stamps),
        "background_cores": busy,
        "steps": steps,
    }


def sparsify_e2e(folder: str, in_dir: Path) -> dict:
    from sparsify import SaeConfig, TrainConfig, Trainer
    from transformers import AutoModelForCausalLM

    steps = STEPS["sparsify_e2e"]
    dataset, tokens = _token_dataset(in_dir, steps * CONTEXTS_PER_BATCH)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = TrainConfig(
        SaeConfig(num_latents=D_SAE, k=K),
        batch_size=CONTEXTS_PER_BATCH,
        layers=[LAYER],
        log_to_wandb=False,
        save_dir=tempfile.mkdtemp(),
    )
    trainer = Trainer(cfg, dataset, model)
    stamps: list[float] = []
    handle = model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    seconds, busy = _timed(trainer.fit)
    stamps.append(time.perf_counter())
    handle.remove()
    result = {**_rate(steps * BATCH_TOKENS, seconds, stamps, BATCH_TOKENS), "background_cores": busy, "steps": steps}
    result["forward_only"] = _forward_only(model, tokens)
    return result


def _forward_only(model, tokens, batches: int = 4) -> dict:
    """The same full forwards sparsify's trainer runs (frozen weights, autograd on), without the SAE."""
    model.requires_grad_(False)
    times = []
    for x in tokens.split(CONTEXTS_PER_BATCH)[: batches + 1]:
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    median = statistics.median(times[1:])
    return {"seconds_per_batch": median, "tokens_per_s": BATCH_TOKENS / median}


def main(mode: str, folder: str, in_dir: Path) -> None:
    fns = {"saelens_train": saelens_train, "saelens_e2e": saelens_e2e, "sparsify_e2e": sparsify_e2e}
    if mode not in fns:
        raise SystemExit(f"unknown mode {mode!r}: expected one of {', '.join(fns)}")
    log(f"SAE training: {mode}")
    common.wait_quiet(mode)
    print(json.dumps({"mode": mode, "threads": torch.get_num_threads(), **fns[mode](folder, in_dir)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
