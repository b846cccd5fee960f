"""Corpora (built-in offline, local files, HF datasets), tokenised and packed into fixed-length contexts."""

from mechscope.data.corpus import Corpus, Document, corpus
from mechscope.data.packing import Contexts, pack, special_tokens

__all__ = ["Corpus", "Document", "corpus", "Contexts", "pack", "special_tokens"]
