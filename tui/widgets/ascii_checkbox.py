"""A Checkbox drawn as [X] / [ ]: the stock one always draws its X and tells on from
off by colour alone, which a monochrome console (or a screen dump) cannot show."""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Checkbox


class AsciiCheckbox(Checkbox):
    DEFAULT_CSS = """
    AsciiCheckbox { border: none; padding: 0 1; height: 1; }
    AsciiCheckbox:focus { text-style: reverse; }
    """

    def render(self) -> Content:
        mark = "X" if self.value else " "
        return Content.assemble(f"[{mark}] ", self.label)
