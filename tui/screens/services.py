"""The role units. Their state, start/stop/restart and journal lines come through the
setup service (org.secondsite.Setup1, systemd's D-Bus API), which does not exist yet:
until then the screen names the units and says it cannot show them, rather than
guessing at a state it cannot read."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Static

from tui.widgets.fitted_table import Cell
from tui.widgets.units_table import UnitsTable

# (role target, its daemon, what it is): the units under units/.
ROLE_UNITS = (
    ("secondsite-config.target", "secondsite-configd.service", "configuration server"),
    ("secondsite-process.target", "secondsite-processd.service", "process server"),
    ("secondsite-target.target", "secondsite-targetd.service", "master target"),
)
NOT_AVAILABLE = "not available"


class ServicesScreen(Screen[None]):
    DEFAULT_CSS = """
    ServicesScreen > Vertical { padding: 0 1; }
    ServicesScreen #title { text-style: bold; }
    ServicesScreen UnitsTable { height: auto; margin: 1 0; }
    ServicesScreen #keys { dock: bottom; height: 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "back", "Back")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("Services: the appliance's role units", id="title")
            yield UnitsTable(id="units")
            yield Static(
                "Unit states, start/stop/restart and journal lines need the setup "
                "service (org.secondsite.Setup1), which is not installed yet. "
                "Meanwhile, from a shell: systemctl status secondsite-configd.service, "
                "journalctl -u secondsite-configd.service.",
                id="note",
                markup=False,
            )
        yield Static("Esc: back", id="keys")

    def on_mount(self) -> None:
        rows: list[tuple[str, dict[str, Cell]]] = []
        for target, service, role in ROLE_UNITS:
            for unit in (target, service):
                rows.append((unit, {"unit": unit, "role": role, "state": NOT_AVAILABLE}))
        self.query_one(UnitsTable).show(rows)

    def action_back(self) -> None:
        self.dismiss(None)
