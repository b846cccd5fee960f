"""Corpora (built-in offline, local files, HF datasets), tokenised and packed into fixed-length contexts."""

from mechscope.data.corpus import Corpus, Document, corpus, held_out
from mechscope.data.packing import SKIP_POSITIONS, Contexts, pack, special_tokens

__all__ = ["Corpus", "Document", "corpus", "held_out", "SKIP_POSITIONS", "Contexts", "pack", "special_tokens"]
