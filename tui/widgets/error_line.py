"""The line where a screen says what went wrong (a refused call, no server), marked
with "!" so it stands out without colour; hidden while all is well."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

MARK = "! "


class ErrorLine(Static):
    DEFAULT_CSS = """
    ErrorLine { height: auto; max-height: 3; display: none; text-style: bold; }
    ErrorLine.shown { display: block; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id, markup=False)
        self.message: str | None = None

    def show_error(self, message: str | None) -> None:
        """Show `message`, or hide the line when None."""
        self.message = message
        self.set_class(message is not None, "shown")
        self.update(Text(MARK + message, style="bold reverse") if message else "")
