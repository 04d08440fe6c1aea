"""A password Input masked with "*": the stock one draws U+2022, which not every
Linux VT console font has."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Input


class AsciiPassword(Input):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(password=True, id=id)

    @property
    def _value(self) -> Text:
        return Text("*" * len(self.value), no_wrap=True, overflow="ignore", end="")
