"""A small byte-level BPE tokenizer for the tiny models, trained on a corpus's training documents.

Byte-level (every string has tokens, no unknown token), GPT-2's pre-tokenisation, one special token
`<|endoftext|>` that is both BOS and EOS. The tokenizer puts it in front of every text, so a text run
through `mechscope` starts the way each training context does (`data.packing` opens contexts with BOS
when the tokenizer adds it, and separates documents with EOS). BPE training is deterministic: the same
documents and vocabulary size give the same tokenizer.

Saved as `tokenizer.json` + `tokenizer_config.json`, which `AutoTokenizer.from_pretrained` reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mechscope.errors import MechscopeError

SPECIAL = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A `PreTrainedTokenizerFast` of at most `vocab_size` tokens (fewer when the texts run out of merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    special = tok.token_to_id(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL} $A", pair=f"{SPECIAL} $A {SPECIAL} $B", special_tokens=[(SPECIAL, special)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL)


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in `folder` (its tokenizer.json); one line naming the folder if it has none."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise MechscopeError(f"{str(folder)!r} has no tokenizer.json: give a folder holding one (e.g. another tiny model)")
    return PreTrainedTokenizerFast.from_pretrained(folder)
