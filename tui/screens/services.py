"""The role units and their state, read from the setup service (Setup1 GetRoles).

Setup1 enables and starts roles as a whole (SetRoles) and offers no restart or stop
of single units, so this view shows state only and points to the wizard's roles step.
"""

from __future__ import annotations

from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Static

from tui.client import ConsoleClient, describe_setup, record
from tui.widgets.error_line import ErrorLine
from tui.widgets.fitted_table import Cell
from tui.widgets.roles_table import RolesTable

# role -> (what it is, its daemon): the units under units/.
ROLES = {
    "config": ("configuration server", "secondsite-configd.service"),
    "process": ("process server", "secondsite-processd.service"),
    "target": ("master target", "secondsite-targetd.service"),
}
UNKNOWN = "?"
NOTE = (
    "Each role's target starts its daemon ({daemons}). To change the roles: "
    "w (Appliance setup), step Roles. Logs: journalctl -u <daemon>."
)


def role_rows(roles: dict[str, Any]) -> list[tuple[str, dict[str, Cell]]]:
    """A row per known role (state "?" when Setup1 did not say), then any new ones."""
    rows: list[tuple[str, dict[str, Cell]]] = []
    for name in [*ROLES, *sorted(set(roles) - set(ROLES))]:
        state = record(roles.get(name))
        what = ROLES.get(name, (name, ""))[0]
        rows.append(
            (
                name,
                {
                    "role": what,
                    "unit": str(state.get("unit", f"secondsite-{name}.target")),
                    "enabled": str(state.get("unit_file_state", UNKNOWN)),
                    "active": str(state.get("active_state", UNKNOWN)),
                },
            )
        )
    return rows


class ServicesScreen(Screen[None]):
    DEFAULT_CSS = """
    ServicesScreen > Vertical { padding: 0 1; }
    ServicesScreen #title { text-style: bold; }
    ServicesScreen RolesTable { height: auto; margin: 1 0; }
    ServicesScreen #keys { dock: bottom; height: 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("g", "refresh", "Refresh"),
    ]

    def __init__(self, setup: ConsoleClient) -> None:
        super().__init__()
        self.setup = setup

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("Services: the appliance's roles", id="title")
            yield RolesTable(id="roles")
            yield ErrorLine(id="error")
            daemons = ", ".join(d for _, d in ROLES.values())
            yield Static(NOTE.format(daemons=daemons), id="note", markup=False)
        yield Static("g: refresh   Esc: back", id="keys")

    def on_mount(self) -> None:
        self.query_one(RolesTable).show(role_rows({}))
        self.action_refresh()

    @work(exclusive=True, group="roles")
    async def action_refresh(self) -> None:
        error = self.query_one(ErrorLine)
        try:
            roles = await self.setup.call("GetRoles")
        except Exception as exc:
            message = describe_setup(exc)
            if message is None:
                raise
            error.show_error(f"cannot read the roles: {message}")
            return
        error.show_error(None)
        self.query_one(RolesTable).show(role_rows(record(roles)))

    def action_back(self) -> None:
        self.dismiss(None)
