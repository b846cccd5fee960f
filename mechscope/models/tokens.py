"""Tokens as users need to see them, and the token ids a target string stands for.

Two things go wrong when each token is handled on its own:

- **Token strings.** Decoding one id at a time drops the leading space of SentencePiece-style tokens
  (a decoder strips the space it added at the start of a text), so `'▁Paris'` and `'Paris'` both
  print as `'Paris'`; and a byte-level piece of a multi-byte character decodes to `'\ufffd'`.
  `TokenText` reads each token's own bytes from the vocabulary instead (byte-level BPE maps each
  byte to one printable character; SentencePiece writes a space as `▁` and a raw byte as `<0xNN>`),
  and shows bytes that are not whole UTF-8 characters as `\\xNN` escapes.
- **Targets.** A target is the continuation of a prompt, so its tokens are those the prompt + target
  text has after the prompt's own tokens. Tokenised alone, `" Paris"` becomes `['▁', '▁Paris']` under
  tokenizers that prepend `▁` to a text.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mechscope.errors import MechscopeError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ANCHOR = "\n"
"""Text put before a target when there is no prompt text: a line break rarely merges with what follows."""


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's alphabet: each of the 256 bytes as one printable character, and back.

    Printable Latin-1 bytes stand for themselves; the others are moved, in order, to the characters
    from U+0100 up. This is the fixed table byte-level tokenizers share.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _decoder_kind(tokenizer) -> str:
    """`byte_level`, `metaspace` (`▁` for a space, `<0xNN>` for raw bytes) or `other`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "other"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
    if "ByteLevel" in kinds:
        return "byte_level"
    if "Metaspace" in kinds or any(d.get("type") == "Replace" and d.get("content") == " " for d in decoder.get("decoders", [])):
        return "metaspace"
    return "other"


def show_bytes(data: bytes) -> str:
    """Bytes as text: whole UTF-8 characters as themselves, any other byte as a `\\xNN` escape."""
    return data.decode("utf-8", errors="backslashreplace")


class TokenText:
    """Each token id of a tokenizer as the text it stands for, leading space included.

    >>> TokenText(tokenizer)(ids)   # ['The', ' capital', ' of', ' France', ' is', ' Paris']
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.kind = _decoder_kind(tokenizer)
        self.special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
        self.added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
        self._cache: dict[int, str] = {}

    def __call__(self, ids) -> list[str]:
        return [self.one(int(i)) for i in ids]

    def one(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._text(token_id)
        return text

    def _text(self, token_id: int) -> str:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        byte = _BYTE_PIECE.fullmatch(piece or "")
        if byte and self.kind != "byte_level":
            return show_bytes(bytes([int(byte.group(1), 16)]))
        if piece is None or token_id in self.special or token_id in self.added or self.kind == "other":
            return self.tokenizer.decode([token_id])
        if self.kind == "byte_level":
            table = _byte_level_table()
            return show_bytes(bytes(table[c] for c in piece)) if all(c in table for c in piece) else piece
        return piece.replace("▁", " ")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def continuation_ids(tokenizer, target: str, prompt: str | None = None) -> list[int]:
    """The token ids `target` has when it follows `prompt` (or any text, when no prompt text is known).

    The prompt + target text is tokenised, and the tokens after the prompt's own are the target's.
    Where the target merges into the prompt's last token (the prompt's tokens are not a prefix), or
    there is no prompt text, it is taken after a line break instead; where even that merges, from
    the target alone, without a lone `▁` that a tokenizer prepends to a text.

    Raises `MechscopeError` when the target gives no token.
    """
    for context in ([prompt] if prompt else []) + [_ANCHOR]:
        base = _encode(tokenizer, context)
        full = _encode(tokenizer, context + target)
        if full[: len(base)] == base and len(full) > len(base):
            return full[len(base) :]
    ids = _encode(tokenizer, target)
    if len(ids) > 1 and tokenizer.convert_ids_to_tokens(ids[0]) == "▁":
        ids = ids[1:]
    if not ids:
        raise MechscopeError(f"target {target!r} tokenises to nothing: give at least one character")
    return ids


class Tokens(NamedTuple):
    """A batch of token sequences of any lengths, padded to one length."""

    ids: Tensor
    """[batch, pos] token ids; padding holds the pad id."""
    mask: Tensor
    """[batch, pos] bool: True at real tokens, False at padding."""

    @property
    def lengths(self) -> list[int]:
        """Real tokens in each sequence."""
        return [int(n) for n in self.mask.sum(-1)]

    @property
    def padded(self) -> bool:
        return not bool(self.mask.all())

    @property
    def right_padded(self) -> bool:
        """Whether every sequence's real tokens come first (no padding, or padding only after them)."""
        positions = torch.arange(self.mask.shape[1], device=self.mask.device)
        return bool((self.mask == (positions < self.mask.sum(-1, keepdim=True))).all())

    def row(self, i: int) -> Tensor:
        """The real token ids [pos_i] of sequence `i`."""
        return self.ids[i][self.mask[i]]

    def last(self) -> Tensor:
        """[batch] the index of each sequence's last real token."""
        positions = torch.arange(self.mask.shape[1], device=self.mask.device)
        return torch.where(self.mask, positions, -1).amax(-1)

    def position_ids(self) -> Tensor:
        """[batch, pos] each token's position in its own sequence (0 at its first real token; 0 at padding before it)."""
        return (self.mask.long().cumsum(-1) - 1).clamp(min=0)


def pad(sequences: Sequence[Sequence[int] | Tensor], pad_id: int, side: str = "right") -> Tokens:
    """Sequences of token ids of any lengths as one `Tokens` batch, padded on `side` ("right" or "left")."""
    rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, cols], mask[i, cols] = r, True
    return Tokens(ids, mask)
