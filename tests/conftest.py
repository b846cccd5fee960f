"""Fixtures: tiny random-weight models of every supported family, and the embedded SmolLM2.

Tiny models are built here from HF configs (nothing is downloaded), seeded, in eval mode and in
float64, so that identities that hold exactly in real arithmetic hold to ~1e-12 in the tests. Their
weights are re-drawn larger than HF's default initialisation (std 0.02) so that attention patterns
are far from uniform and the soft caps of Gemma 2 actually bite.

Each `Case` carries the mechscope `Model` and, for the independent checks, a pristine HF copy of
the same weights that mechscope never touched (`reference`), and a copy running HF's own eager
attention (`eager`), whose `output_attentions=True` gives attention probabilities to compare with.
"""

from __future__ import annotations

import copy
import functools
import sys
from dataclasses import dataclass

import pytest
import torch
import transformers as tf

import mechscope

VOCAB = 100
SEQ = 8  # longer than the sliding window (4), so the sliding mask matters
SLIDING_WINDOW = 4

SMOLLM2_PROMPTS = (
    "The reliability of Wikipedia is very",
    "The committee postponed its final decision until the researchers had finished analysing every sample.",
)


def _common(**overrides) -> dict:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return {**kw, **overrides}


def _configs() -> dict[str, tf.PretrainedConfig]:
    gqa = dict(num_key_value_heads=2)
    return {
        "llama": tf.LlamaConfig(**_common(**gqa)),
        "mistral": tf.MistralConfig(**_common(**gqa, sliding_window=SLIDING_WINDOW)),
        "qwen2": tf.Qwen2Config(**_common(**gqa)),
        "qwen3": tf.Qwen3Config(**_common(**gqa, head_dim=8)),
        "gemma": tf.GemmaConfig(**_common(**gqa, head_dim=8)),
        # Gemma 2 runs HF's eager attention by default; its attention soft cap is set low so it bites.
        "gemma2": tf.Gemma2Config(
            **_common(**gqa, head_dim=8),
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
            query_pre_attn_scalar=8,
        ),
        "gemma3": tf.Gemma3TextConfig(
            **_common(**gqa, head_dim=8),
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=8,
        ),
        "gpt2": tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_inner=48, n_positions=64, bos_token_id=1, eos_token_id=2
        ),
        "neox_parallel": tf.GPTNeoXConfig(**_common(use_parallel_residual=True)),
        "neox_sequential": tf.GPTNeoXConfig(**_common(use_parallel_residual=False)),
        "phi3": tf.Phi3Config(**_common(**gqa)),
    }


FAMILIES = tuple(_configs())
SLIDING = {"mistral": (0, 1, 2), "gemma2": (0, 2), "gemma3": (0, 2)}
"""Layers of each tiny model that use a sliding window of SLIDING_WINDOW tokens."""


def tiny_hf(family: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A freshly built tiny HF causal LM of `family` with seeded random weights, in eval mode."""
    config = _configs()[family]
    torch.manual_seed(seed)
    hf = tf.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if p.ndim >= 2:
                p.copy_(0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:  # norm scales (Gemma's are stored as an offset from 1, so either way this stays near 1 or 2)
                p.copy_(1.0 + 0.1 * noise)
    return hf.requires_grad_(False)


@dataclass
class Case:
    """One model under test."""

    name: str
    family: str
    """Key of the test-side module table (`config.model_type`, with NeoX split by residual style)."""
    model: mechscope.Model
    ids: torch.Tensor
    reference: torch.nn.Module
    """Same weights, plain HF, never wrapped by mechscope."""
    eager: torch.nn.Module
    """Same weights, plain HF with `attn_implementation="eager"`."""
    tiny: bool = True

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.hf.parameters()).dtype


@functools.cache
def tiny_case(family: str) -> Case:
    reference = tiny_hf(family)
    model = mechscope.load(copy.deepcopy(reference), dtype=torch.float64)
    eager = copy.deepcopy(reference)
    eager.set_attn_implementation("eager")
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    return Case(family, family, model, ids, reference, eager)


@functools.cache
def smollm2_model() -> mechscope.Model:
    return mechscope.load()


@functools.cache
def smollm2_case() -> Case:
    model = smollm2_model()
    reference = copy.deepcopy(model.hf)
    reference.set_attn_implementation("sdpa")  # undo mechscope's routing on this copy
    eager = copy.deepcopy(model.hf)
    eager.set_attn_implementation("eager")
    return Case("smollm2", "llama", model, model.to_ids(SMOLLM2_PROMPTS[0]), reference, eager, tiny=False)


CASES = [*FAMILIES, pytest.param("smollm2", marks=pytest.mark.slow)]


@pytest.fixture(params=CASES)
def case(request) -> Case:
    """Every tiny family, and the embedded SmolLM2."""
    return smollm2_case() if request.param == "smollm2" else tiny_case(request.param)


@pytest.fixture(params=FAMILIES)
def tiny(request) -> Case:
    """Every tiny family."""
    return tiny_case(request.param)


@pytest.fixture
def tiny_model():
    """Factory: `tiny_model("gemma2")` is the mechscope `Model` of that tiny family (shared within the session)."""
    return lambda family: tiny_case(family).model


@pytest.fixture(scope="session")
def smollm2() -> mechscope.Model:
    return smollm2_model()


@pytest.fixture(scope="session")
def prompts() -> tuple[str, ...]:
    return SMOLLM2_PROMPTS


def index_for_another_model(db, folder):
    """A copy of the index database `db` that claims to be built for another model (OtherLM-1B, fingerprint feedfacefeedface)."""
    import shutil

    import duckdb

    other = folder / "other-model.duckdb"
    shutil.copy(db, other)
    con = duckdb.connect(str(other))
    con.execute("UPDATE meta SET value = '\"feedfacefeedface\"' WHERE key = 'model_fingerprint'")
    con.execute("UPDATE meta SET value = '\"OtherLM-1B\"' WHERE key = 'model'")
    con.close()
    return other


@functools.cache
def tiny_lm(family: str = "llama", seed: int = 0) -> mechscope.Model:
    """A tiny random-weight model of `family` with a real byte-level BPE tokenizer trained here on the
    built-in corpus (so corpora can be packed and run through it), in float32 like a real model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mechscope.data import corpus

    texts = [d.text for _, d in zip(range(60), corpus().documents(), strict=False)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = _configs()[family]
    config.vocab_size = len(fast)
    config.bos_token_id = config.eos_token_id = fast.eos_token_id
    torch.manual_seed(seed)
    hf = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return mechscope.load(hf, tokenizer=fast)


def invoke_cli(monkeypatch, capsys, *argv, load=None, width: int = 2000, consoles=()) -> tuple[int, str, str]:
    """Run the `mechscope` command in-process through its entry point: (exit code, stdout, stderr).

    `load` replaces `cli._load` (the model loader), `width` is the width of the consoles of `cli` and of
    the modules in `consoles` (wide enough not to wrap, by default).
    """
    from rich.console import Console

    from mechscope import cli

    monkeypatch.setattr(sys, "argv", ["mechscope", *map(str, argv)])
    if load is not None:
        monkeypatch.setattr(cli, "_load", load)
    for module in (cli, *consoles):
        monkeypatch.setattr(module, "console", Console(width=width))
    try:
        cli.main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    out, err = capsys.readouterr()
    return code, out, err
