"""A DataTable whose columns fit the width it has: never a horizontal scroll.

80 columns is the VM console's width, so each subclass lists its columns with a drop
rank (as secondsitectl's tables do): the least useful go first when the table is too
narrow, then the one `shrink` column gives up cells and its cells are cut with an
ellipsis. Rows are kept as plain cells so a resize can lay them out again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from rich.text import Text
from textual.events import Resize
from textual.widgets import DataTable

Cell = str | Text


@dataclass(frozen=True)
class Col:
    key: str
    header: str
    width: int  # what its values need
    drop: int = 0  # highest goes first when too narrow; 0 never
    right: bool = False
    shrink: bool = False  # takes what is left over (names), cut with an ellipsis
    min_width: int = 8


PADDING = 1  # DataTable's cell padding, each side
CUT = "~"  # render.truncate's "..." glyph (U+2026) is not in every VT console font


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + CUT[: max(width, 0)]


def fit(columns: Sequence[Col], width: int) -> list[tuple[Col, int]]:
    """The columns shown and their widths for `width` cells."""
    shown = list(columns)

    def need(cols: list[Col]) -> int:
        return sum((c.min_width if c.shrink else c.width) + 2 * PADDING for c in cols)

    while need(shown) > width:
        droppable = [c for c in shown if c.drop > 0]
        if not droppable:
            break
        shown.remove(max(droppable, key=lambda c: c.drop))
    spare = width - need(shown)
    out = []
    for col in shown:
        w = col.width
        if col.shrink:
            w = max(col.min_width, min(col.width, col.min_width + max(spare, 0)))
        out.append((col, w))
    return out


def _plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else cell


class FittedTable(DataTable[Cell]):
    """Subclasses set COLUMNS and call `show(rows)` with {column key: cell} per row."""

    DEFAULT_CSS = """
    FittedTable { scrollbar-size-vertical: 1; overflow-x: hidden; }
    """

    COLUMNS: Sequence[Col] = ()

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self._rows: list[tuple[str, dict[str, Cell]]] = []
        self._layout: list[tuple[Col, int]] = []

    def show(self, rows: Sequence[tuple[str, dict[str, Cell]]]) -> None:
        """Replace the rows (key, cells), keeping the cursor on the same row key."""
        self._rows = list(rows)
        self._draw()

    def on_resize(self, event: Resize) -> None:
        self._draw()

    def _draw(self) -> None:
        # One cell for the vertical scrollbar, so a long list never pushes sideways.
        layout = fit(self._sized_columns(), max(self.size.width - 1, 20))
        selected = self._selected_key()
        if layout != self._layout:
            self.clear(columns=True)
            for col, width in layout:
                self.add_column(col.header, width=width, key=col.key)
            self._layout = layout
        else:
            self.clear()
        for key, cells in self._rows:
            self.add_row(*(self._cell(cells.get(c.key, "-"), c, w) for c, w in layout), key=key)
        keys = [key for key, _ in self._rows]
        if selected in keys:
            self.move_cursor(row=keys.index(selected), animate=False)

    def _sized_columns(self) -> list[Col]:
        """The shrink columns as wide as their longest value (up to their width), so
        short names leave room for another column."""
        out = []
        for col in self.COLUMNS:
            sized = col
            if col.shrink:
                values = [_plain(cells.get(col.key, "")) for _, cells in self._rows]
                longest = max([len(col.header), *(len(v) for v in values)])
                width = min(col.width, longest)
                sized = replace(col, width=width, min_width=min(col.min_width, width))
            out.append(sized)
        return out

    def _selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except LookupError:
            return None
        return key.value

    @staticmethod
    def _cell(value: Cell, col: Col, width: int) -> Cell:
        # Padded here: DataTable does not honour a Text's justify.
        text = value if isinstance(value, Text) else Text(value)
        core = clip(text.plain, width)
        pad = " " * (width - len(core)) if col.right else ""
        if not text.style:
            return pad + core
        out = Text(pad)  # the padding stays unstyled: only the value is marked
        out.append(core, style=text.style)
        return out

    def selected_key(self) -> str | None:
        """The key of the row under the cursor, if any."""
        return self._selected_key()
