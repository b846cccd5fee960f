"""Text a tokenizer cannot encode is refused here, in one line, before it reaches the tokenizer.

Control characters, NUL bytes and zero-width characters are valid text: they tokenise like any
other characters (byte-level tokenizers have a token for every byte). A lone surrogate (U+D800 to
U+DFFF on its own) is not: it has no UTF-8 encoding, and it is what undecodable bytes on a command
line become (Python's `surrogateescape`). Tokenizers then fail with an unrelated `TypeError`.
"""

from __future__ import annotations

from mechscope.errors import MechscopeError

SHOWN = 40
"""Characters of the bad text quoted in the error."""


def check_text(text: str, what: str = "text") -> str:
    """`text` unchanged if it is valid Unicode, else a one-line error naming the bad character.

    >>> check_text("caf\\u00e9")
    'café'
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        shown = text if len(text) <= SHOWN else text[:SHOWN] + "..."
        raise MechscopeError(
            f"{what} {shown!r} is not valid Unicode: character {err.start} is a lone surrogate "
            f"U+{ord(text[err.start]):04X} (undecodable bytes in the input?); give UTF-8 text"
        ) from None
    return text
