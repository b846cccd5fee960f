"""Text as every view shows it: each token distinguishable, nothing interpreted, nothing sent raw.

Token strings come from `Model.to_str_tokens`, which writes the bytes of a partial UTF-8 character
as `\\xNN` escapes (always 0x80..0xff). On top of that, every view shows:

- a newline as `↵` (still breaking the line where the view has lines), a tab as `→`, a carriage
  return as `␍`, an empty token as `∅`;
- any other character that would be invisible, look like another, or act on the terminal as an
  escape: `\\xNN` below 0x80 (ESC, BEL, ...: so never a byte piece), `\\uNNNN` above (zero-width
  characters, bidirectional controls, no-break and other unusual spaces, C1 controls);
- a combining mark that opens a token (nothing to sit on) after a dotted circle `◌`.

Terminal text is built as rich `Text` (never parsed as markup), so `[i]` or `[/]` shows as written;
HTML is escaped; PNG text is drawn with mathtext off, and characters the PNG's fonts cannot draw
are written `\\uNNNN` so that two such tokens never look alike.
"""

from __future__ import annotations

import functools
import unicodedata

from rich.text import Text

PNG_FONTS = ("DejaVu Sans Mono", "DejaVu Sans")
"""Font families PNG token text is drawn with, the second filling in glyphs the first lacks."""

_ARROWS = {"\n": "↵", "\t": "→", "\r": "␍"}
_HIDDEN = {"Cc", "Cf", "Co", "Cn", "Cs", "Zl", "Zp"}


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _hidden(ch: str) -> bool:
    category = unicodedata.category(ch)
    return category in _HIDDEN or (category == "Zs" and ch != " ") or 0xFE00 <= ord(ch) <= 0xFE0F


def shown_token(token: str, breaks: bool = False) -> str:
    """`token` as views draw it; with `breaks`, a newline is `↵` followed by a real line break."""
    if token == "":
        return "∅"
    out = []
    for ch in token:
        if ch in _ARROWS:
            out.append(_ARROWS[ch] + ("\n" if breaks and ch == "\n" else ""))
        else:
            out.append(_escape(ch) if _hidden(ch) else ch)
    shown = "".join(out)
    return "◌" + shown if unicodedata.combining(shown[0]) else shown


def token_label(token: str) -> str:
    """A token in quotes, on one line: for tables, axis labels and hover text."""
    return "'" + (shown_token(token) if token else "") + "'"


def position_label(pos: int, token: str, width: int | None = None) -> str:
    """`pos:'token'`, cut to `width` characters with `…` when longer."""
    label = f"{pos}:{token_label(token)}"
    return label if width is None or len(label) <= width else label[: width - 1] + "…"


def plain(text: str, style: str = "") -> Text:
    """User or corpus text for the terminal: never read as markup; escape codes made visible."""
    return Text("".join(_escape(ch) if ch not in "\n" and _hidden(ch) else ch for ch in str(text)), style=style)


@functools.cache
def _png_charmap() -> frozenset[int]:
    from matplotlib.font_manager import FontProperties, findfont
    from matplotlib.ft2font import FT2Font

    codes: set[int] = set()
    for family in PNG_FONTS:
        codes.update(FT2Font(findfont(FontProperties(family=family))).get_charmap())
    return frozenset(codes)


def for_png(shown: str) -> str:
    """Shown text with every character the PNG fonts cannot draw written `\\uNNNN` (no two look alike)."""
    have = _png_charmap()
    return "".join(ch if ch in "\n " or ord(ch) in have else _escape(ch) for ch in shown)
