"""The keys of the screen underneath and of the console as a whole."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static

INTRO = (
    "Secondsite console. Keyboard only: arrows move, Enter opens, Esc goes back.\n"
    "A '!' before a value marks what needs attention (RPO over its limit,\n"
    "a server not reporting, a critical alert, a refused call)."
)


_KEY_NAMES = {"question_mark": "?", "escape": "Esc", "enter": "Enter"}


def key_lines(bindings: list[Binding]) -> list[str]:
    lines = []
    for b in bindings:
        if b.description:
            keys = "/".join(_KEY_NAMES.get(k.strip(), k.strip()) for k in b.key.split(","))
            lines.append(f"  {keys:<14} {b.description}")
    return lines


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 76; max-width: 100%; height: auto; max-height: 100%;
        border: solid $accent; padding: 0 1; background: $surface;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "back", "Back")]

    def __init__(self, under: Screen[object], app_bindings: list[Binding]) -> None:
        super().__init__()
        self.under = under
        self.app_bindings = app_bindings

    def compose(self) -> ComposeResult:
        screen_bindings = [b for b in self.under.BINDINGS if isinstance(b, Binding)]
        lines = [INTRO, "", "This screen:", *key_lines(screen_bindings)]
        lines += ["", "Everywhere:", *key_lines(self.app_bindings), "", "Esc: close"]
        with VerticalScroll():
            yield Static("\n".join(lines), markup=False)

    def action_back(self) -> None:
        self.dismiss(None)
