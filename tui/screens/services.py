"""The appliance's units: their state, start/stop/restart, and the selected unit's
recent journal lines — all through the setup service (Setup1 GetUnits, StartUnit,
StopUnit, RestartUnit, GetUnitJournal), which only touches Secondsite's own units.

Each action asks first (the same review box as the setup wizard) and runs in a
worker; the unit's state after the job, or systemd's refusal, is shown. Roles are
switched on and off as a whole in the setup wizard (w, step Roles).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Static

from tui.client import ConsoleClient, describe_setup, record, records
from tui.screens.setup import ReviewScreen
from tui.widgets.error_line import ErrorLine
from tui.widgets.fitted_table import Cell, clip
from tui.widgets.units_table import UnitsTable

# unit -> what it is (units/ and appliance/setup/services.py UNITS).
WHAT = {
    "secondsite-config.target": "config role",
    "secondsite-configd.service": "configuration server",
    "secondsite-process.target": "process role",
    "secondsite-processd.service": "process server",
    "secondsite-target.target": "target role",
    "secondsite-targetd.service": "master target",
}
JOURNAL_LINES = 8
# action -> (Setup1 method, what the box says it does, while, after)
ACTIONS = {
    "start": ("StartUnit", "systemd starts the unit and what it needs.", "Starting", "started"),
    "stop": ("StopUnit", "The unit stops; what it serves is unavailable until started.",
             "Stopping", "stopped"),
    "restart": ("RestartUnit", "The unit stops and starts again; connections drop briefly.",
                "Restarting", "restarted"),
}  # fmt: skip
READ_FAILED = "cannot read the units"
KEYS = "t: start  x: stop  r: restart  g: refresh  Esc: back"


def state_text(unit: dict[str, Any]) -> str:
    """ "active (running)", "!failed (exit-code)": "!" marks a failure without colour."""
    active = str(unit.get("active_state") or "?")
    sub = str(unit.get("sub_state") or "")
    result = str(unit.get("result") or "")
    detail = result if active == "failed" and result and result != "success" else sub
    text = f"{active} ({detail})" if detail and detail != active else active
    return f"!{text}" if active == "failed" else text


def unit_rows(units: list[dict[str, Any]]) -> list[tuple[str, dict[str, Cell]]]:
    rows: list[tuple[str, dict[str, Cell]]] = []
    for unit in units:
        name = str(unit.get("unit", ""))
        if name:
            rows.append((name, {"unit": name, "role": WHAT.get(name, ""),
                                "state": state_text(unit)}))  # fmt: skip
    return rows


def _clock(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return "--:--:--"


def journal_text(journal: dict[str, Any], width: int) -> str:
    """The lines as "HH:MM:SS message" (local time), "!" before errors; or the note."""
    lines = records(journal.get("lines"))
    if not lines:
        return str(journal.get("note") or "no journal entries")
    out = []
    for line in lines[-JOURNAL_LINES:]:
        mark = "!" if int(line.get("priority", 6)) <= 3 else " "
        text = str(line.get("message", "")).replace("\t", " ").splitlines() or [""]
        out.append(clip(f"{_clock(str(line.get('time', '')))}{mark}{text[0]}", width))
    return "\n".join(out)


class ServicesScreen(Screen[None]):
    DEFAULT_CSS = """
    ServicesScreen > Vertical { padding: 0 1; }
    ServicesScreen #title { text-style: bold; }
    ServicesScreen UnitsTable { height: auto; max-height: 8; margin: 1 0 0 0; }
    ServicesScreen #journal-title { text-style: bold; margin-top: 1; }
    ServicesScreen #journal { height: 8; }
    ServicesScreen #keys { dock: bottom; height: 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("t", "control('start')", "Start the unit"),
        Binding("x", "control('stop')", "Stop the unit"),
        Binding("r", "control('restart')", "Restart the unit"),
        Binding("g", "refresh", "Refresh"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, setup: ConsoleClient) -> None:
        super().__init__()
        self.setup = setup
        self.status = ""  # the last action's outcome, for the status line

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("Services: the appliance's units", id="title")
            yield UnitsTable(id="units")
            yield ErrorLine(id="error")
            yield Static("", id="status", markup=False)
            yield Static("Journal", id="journal-title", markup=False)
            yield Static("", id="journal", markup=False)
        yield Static(KEYS, id="keys", markup=False)

    def on_mount(self) -> None:
        self.query_one(UnitsTable).show(unit_rows([{"unit": u} for u in WHAT]))
        self.query_one(UnitsTable).focus()
        self.action_refresh()

    def selected(self) -> str | None:
        table = self.query_one(UnitsTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return str(key) if key is not None else None

    def _failed(self, what: str, exc: Exception) -> bool:
        """Show a refused or unreachable call; False when it is a bug (re-raise)."""
        message = describe_setup(exc)
        if message is None:
            return False
        self.query_one(ErrorLine).show_error(f"{what}: {message}" if what else message)
        return True

    @work(exclusive=True, group="units")
    async def action_refresh(self) -> None:
        error = self.query_one(ErrorLine)
        try:
            units = await self.setup.call("GetUnits")
        except Exception as exc:
            if not self._failed(READ_FAILED, exc):
                raise
            return
        if (error.message or "").startswith(READ_FAILED):  # an action's refusal stays
            error.show_error(None)
        self.query_one(UnitsTable).show(unit_rows(records(units)))
        self.show_journal()

    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_journal()

    @work(exclusive=True, group="journal")
    async def show_journal(self) -> None:
        unit = self.selected()
        if unit is None:
            return
        title, body = self.query_one("#journal-title", Static), self.query_one("#journal", Static)
        title.update(f"Journal of {unit} (last {JOURNAL_LINES} lines)")
        try:
            journal = await self.setup.call("GetUnitJournal", unit, JOURNAL_LINES)
        except Exception as exc:
            message = describe_setup(exc)
            if message is None:
                raise
            body.update(f"! cannot read the journal: {message}")
            return
        body.update(journal_text(record(journal), max(body.size.width, 40)))

    def action_control(self, action: str) -> None:
        unit = self.selected()
        if unit is None:
            return
        effect = ACTIONS[action][1]
        title = f"{action.capitalize()} {unit}?"

        def answered(yes: bool | None) -> None:
            if yes:
                self.control_unit(action, unit)

        self.app.push_screen(ReviewScreen(title, (effect,), go=action), answered)

    @work(exclusive=True, group="control")
    async def control_unit(self, action: str, unit: str) -> None:
        method, _, doing, done = ACTIONS[action]
        status = self.query_one("#status", Static)
        self.status = f"{doing} {unit}..."
        status.update(self.status)
        try:
            state = await self.setup.call(method, unit)
        except Exception as exc:
            self.status = f"{unit} not {done}"
            status.update(self.status)
            if not self._failed("", exc):  # Setup1's refusal names the action and unit
                raise
        else:
            self.query_one(ErrorLine).show_error(None)
            self.status = f"{unit} {done}: now {state_text(record(state))}"
            status.update(self.status)
        self.action_refresh()

    def action_back(self) -> None:
        self.dismiss(None)
