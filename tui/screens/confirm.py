"""Asks before a machine action runs, saying what it will do; dismissed with the
operator's choices (point, mode) or None when they back out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from tui.actions import Action, FailoverMode
from tui.widgets.ascii_checkbox import AsciiCheckbox

POINT_HELP = "Recovery point: latest, latest-app, a tag, or a time (ISO 8601)"


@dataclass(frozen=True)
class Confirmed:
    point: str = "latest"
    mode: FailoverMode = FailoverMode.PLANNED


class ConfirmScreen(ModalScreen[Confirmed | None]):
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical {
        width: 72; max-width: 100%; height: auto; max-height: 100%;
        border: solid $accent; padding: 0 1; background: $surface;
    }
    ConfirmScreen #title { text-style: bold; margin-bottom: 1; }
    ConfirmScreen #effect { margin-bottom: 1; }
    ConfirmScreen Input, ConfirmScreen Input:focus {
        border: none; height: 1; padding: 0 1; background: $boost;
    }
    ConfirmScreen #keys { margin-top: 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "confirm", "Go ahead"),
        Binding("escape,n", "back", "Back"),
    ]

    def __init__(self, action: Action, machine: str) -> None:
        super().__init__()
        self.action_spec = action
        self.machine = machine

    def compose(self) -> ComposeResult:
        action = self.action_spec
        warn = "! " if action.danger else ""
        with Vertical():
            yield Static(f"{warn}{action.title} {self.machine}?", id="title", markup=False)
            yield Static(action.effect.format(m=self.machine), id="effect", markup=False)
            if action.takes_point:
                yield Static(POINT_HELP, markup=False)
                yield Input(value="latest", id="point")
            if action.takes_mode:
                yield AsciiCheckbox("Unplanned: the primary site is lost", id="unplanned")
            keys = "Enter in the point field or y: go ahead   Esc: back"
            yield Static(keys if action.takes_point else "y: go ahead   Esc or n: back", id="keys")

    def _choices(self) -> Confirmed:
        point = "latest"
        if self.action_spec.takes_point:
            point = self.query_one("#point", Input).value.strip() or "latest"
        mode = FailoverMode.PLANNED
        if self.action_spec.takes_mode and self.query_one("#unplanned", AsciiCheckbox).value:
            mode = FailoverMode.UNPLANNED
        return Confirmed(point, mode)

    def action_confirm(self) -> None:
        self.dismiss(self._choices())

    def action_back(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_confirm()
