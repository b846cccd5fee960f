"""Text in every view is shown literally: tokens stay distinguishable, markup is not read, escape codes
are not sent, mathtext is off in PNGs."""

import unicodedata

import matplotlib
import numpy as np
import torch
from rich.console import Console

from mechscope.attribution.activations import AttentionPattern, TokenValues
from mechscope.index.query import Example, Histogram
from mechscope.viz import attention, index_views, token_heatmap
from mechscope.viz.shown import for_png, plain, shown_token, token_label

# Each would look like another (or like nothing) if printed as it is.
TRICKY = [
    "\u200b",  # zero-width space
    "\u200d",  # zero-width joiner
    "\ufeff",  # byte order mark
    "\u202e",  # right-to-left override: would reverse what follows
    "\u00a0",  # no-break space
    " ",
    "",
    "\x1b",  # ESC
    "\x07",  # BEL
    "\x85",  # a C1 control
    "\n",
    "\t",
    "\r",
    "\u0301",  # a combining acute accent with nothing to sit on
    "\ufe0f",  # a variation selector alone
    "\\xf0\\x9f",  # byte pieces of an emoji, as Model.to_str_tokens writes them
    "\\x98\\x80",
    "😀",
    "م",
    "ال",
    "e\u0301",
]


def test_every_token_is_distinguishable_and_visible():
    shown = [shown_token(t) for t in TRICKY]
    assert len(set(shown)) == len(TRICKY)
    for token, text in zip(TRICKY, shown, strict=True):
        assert text, repr(token)
        assert not any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text), (token, text)
        assert not unicodedata.combining(text[0]), (token, text)
    assert shown_token("\x1b") == "\\x1b" and shown_token("\u200b") == "\\u200b" and shown_token("\u0301") == "◌\u0301"
    assert shown_token("a\nb", breaks=True) == "a↵\nb" and token_label("") == "''"


def _terminal(*renderables, width=120) -> str:
    console = Console(record=True, width=width, color_system="truecolor", force_terminal=True)
    for r in renderables:
        console.print(r)
    return console.export_text(styles=True)


MARKUP = ["total", " +=", " arr", "[i]", " [bold]", "x", "[/]", " \x1b[31m", "red", "\x07"]


def test_heatmap_lines_show_markup_and_escape_codes_literally():
    tv = TokenValues(MARKUP, torch.arange(len(MARKUP), dtype=torch.float32), "[b]label[/b]")
    out = _terminal(token_heatmap.token_heatmap_text(tv), token_heatmap.token_stats_table(tv, title="[red]title"))
    for shown in ("[i]", "[bold]", "[/]", "[b]label[/b]", "[red]title", "\\x1b[31m", "\\x07"):
        assert shown in out, shown
    assert "\x07" not in out and "\x1b[31m" not in out  # rich's own colour codes are 24-bit: never this one
    assert "[bold]x[/]" in out  # the stats table's preview of the text


def test_plain_text_is_never_markup():
    assert plain("[bold]x[/] \x1b[2J").plain == "[bold]x[/] \\x1b[2J"


def test_tables_and_examples_show_tokens_literally():
    example = Example(0, 3.0, 7, 10, 5, [8, 9, 10], [1, 2, 5], ["[i]", " \x1b[0m", "[/]"], np.array([1.0, 2.0, 3.0], np.float32))
    out = _terminal(index_views.examples_text([example]))
    assert "[i]" in out and "\\x1b[0m" in out and "[/]" in out and "\x1b[0m[/]" not in out


def test_png_text_is_never_mathtext(monkeypatch, tmp_path):
    """Every text artist of every PNG has mathtext off; characters the fonts lack are written as escapes."""
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    tokens = ["$x$", " $\\alpha$", "中", "😀", " a", " b", " c"]
    tv = TokenValues(tokens, torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0, 1.0, 2.0]), "$label$")
    token_heatmap.token_heatmap_png(tv, tmp_path / "t.png", title="$t$")
    attention.attention_pattern_png(AttentionPattern(tokens, torch.tril(torch.ones(7, 7)) / 7, "$head$"), tmp_path / "a.png")
    hist = Histogram(np.array([-1.0, 0.0, 1.0]), np.array([3, 4]), 0)
    index_views.histogram_png(hist, tmp_path / "h.png", title="$unit$")
    assert len(figures) == 3
    for fig in figures:
        texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
        dollars = [t for t in texts if "$" in t.get_text() and "mathdefault" not in t.get_text()]  # not the log axis
        assert dollars and all(not t.get_parse_math() for t in dollars), [t.get_text() for t in dollars]
    assert for_png("中") == "\\u4e2d" and for_png("$x$") == "$x$"
