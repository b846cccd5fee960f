"""Terminal output that keeps its information wherever it goes.

- `ColourText`: text drawn in colour where the console shows colour; elsewhere (a pipe, a file,
  `NO_COLOR`) it draws its `piped` form instead, which writes as characters what the colours
  and underlines said (each token's value, the example's own token).
- `FittedTable`: a table with one column per position that draws as many columns as the console's
  width holds, chosen by a priority (the last positions, or the largest values), and says which
  it left out, instead of squeezing every column to nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


def shows_colour(console: Console) -> bool:
    return console.color_system is not None and not console.no_color


class ColourText:
    """Text with two forms: `coloured` where the console shows colour, `piped` where it does not.

    Not a `Text` itself: rich joins `Text` objects it is given before drawing them, which would
    lose the choice. `plain` is the coloured form's text.
    """

    def __init__(self, coloured: Text, piped: Text):
        self.coloured, self.piped = coloured, piped

    @property
    def plain(self) -> str:
        return self.coloured.plain

    def __str__(self) -> str:
        return self.coloured.plain

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        yield self.coloured if shows_colour(console) else self.piped

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.coloured if shows_colour(console) else self.piped)


class Column(NamedTuple):
    header: Text
    cells: list[Text]
    """One cell per row."""


class FittedTable:
    """Rows x many columns, drawn with the columns that fit the console's width.

    `priority` lists column indices, most wanted first; the columns drawn keep their own order. When
    some are left out, a note after the table says how many, what chose the others (`chosen`), and how to
    see them all (`remedy`: the options of the command that prints it).
    """

    def __init__(
        self, title: Text, corner: str, rows: Sequence[str], columns: Sequence[Column], priority: Sequence[int], chosen: str,
        remedy: str = "choose positions, or write the HTML or PNG for all of them",
    ):  # fmt: skip
        self.title, self.corner, self.rows, self.columns = title, corner, list(rows), list(columns)
        self.priority, self.chosen, self.remedy = list(priority), chosen, remedy

    def _width(self, column: Column) -> int:
        cells = max((c.cell_len for c in column.cells), default=1)
        header = max(cell_len(line) for line in column.header.plain.split("\n"))
        return max(cells, min(header, max(cells + 3, 10)))

    def fitting(self, max_width: int) -> list[int]:
        """The column indices drawn at this width (at least one), in their own order."""
        used = 1 + max([len(self.corner), *(len(r) for r in self.rows)]) + 3
        keep: list[int] = []
        for c in self.priority:
            width = self._width(self.columns[c]) + 3  # padding on both sides and a border
            if keep and used + width > max_width:
                break
            used += width
            keep.append(c)
        return sorted(keep)

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        keep = self.fitting(options.max_width)
        table = Table(title=self.title, title_justify="left")
        table.add_column(self.corner, justify="right", no_wrap=True)
        for c in keep:
            table.add_column(self.columns[c].header, justify="right", no_wrap=True, width=self._width(self.columns[c]))
        for r, label in enumerate(self.rows):
            table.add_row(Text(label), *(self.columns[c].cells[r] for c in keep))
        yield table
        if len(keep) < len(self.columns):
            yield Text(
                f"showing {len(keep)} of {len(self.columns)} columns ({self.chosen}): the others do not fit "
                f"{options.max_width} characters; {self.remedy}",
                style="dim",
            )
