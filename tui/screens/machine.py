"""One machine: its state, disks, recovery points and events, and the actions on it.

Each action goes through ConfirmScreen (what will happen, which point), then calls
its Config1 method and follows the job on JobScreen. A refusal (the server's error
message) shows on this screen's error line. Removing the agent needs SSH credentials:
it goes through PushScreen's form instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.events import ScreenResume
from textual.screen import Screen
from textual.widgets import ContentSwitcher, Static

from appliance.ctl.render import fmt_duration, fmt_text, fmt_time
from tui.actions import ACTIONS, BY_KIND, Action, ActionKind
from tui.client import ConsoleClient, describe, record, records
from tui.screens.confirm import Confirmed, ConfirmScreen
from tui.screens.job import JobScreen
from tui.screens.push import PushScreen
from tui.widgets.disks_table import DisksTable
from tui.widgets.error_line import ErrorLine
from tui.widgets.events_table import EventsTable
from tui.widgets.machines_table import EXCEEDED, rpo_exceeded
from tui.widgets.points_table import PointsTable

EVENTS = 200  # the newest server events to search for this machine's
VIEWS = (("disks", "Disks"), ("points", "Recovery points"), ("events", "Events"))


def details(machine: dict[str, Any]) -> str:
    rpo = fmt_duration(machine.get("rpo_seconds"))
    if rpo_exceeded(machine):
        rpo = f"{EXCEEDED}{rpo} OVER"
    lines = [
        f"State {fmt_text(machine.get('state'))}   RPO {rpo} "
        f"(limit {fmt_duration(machine.get('rpo_threshold_s'))})   "
        f"policy {fmt_text(machine.get('policy'))}",
        f"Process server {fmt_text(machine.get('process_server'))}   "
        f"master target {fmt_text(machine.get('master_target'))}   "
        f"seen {fmt_time(machine.get('last_seen'))}",
    ]
    return "\n".join(lines)


class MachineScreen(Screen[None]):
    DEFAULT_CSS = """
    MachineScreen #title { height: 1; text-style: bold; }
    MachineScreen #details { height: 2; }
    MachineScreen #views { height: 1; margin-top: 1; }
    MachineScreen ContentSwitcher { height: 1fr; }
    MachineScreen ContentSwitcher > * { height: 1fr; }
    MachineScreen #keys { height: 2; dock: bottom; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("g", "refresh_now", "Refresh"),
        Binding("1", "view('disks')", "Disks"),
        Binding("2", "view('points')", "Points"),
        Binding("3", "view('events')", "Events"),
        *(Binding(a.key, f"run('{a.kind}')", a.title) for a in ACTIONS),
        Binding("a", "remove_agent", "Remove agent"),
    ]

    def __init__(
        self, client: ConsoleClient, machine: str, refresh_s: float, poll_s: float
    ) -> None:
        super().__init__()
        self.client = client
        self.machine = machine
        self.refresh_s = refresh_s
        self.poll_s = poll_s
        self._busy = False
        # A refused action stays said until the next action; refreshes come and go.
        self._action_error: str | None = None
        self._refresh_errors: list[str] = []
        self.hostname = machine  # the machine record's, once read: where its agent runs

    def compose(self) -> ComposeResult:
        yield Static(f"Machine {self.machine}", id="title", markup=False)
        yield Static("", id="details", markup=False)
        yield ErrorLine(id="error")
        yield Static("", id="views")
        with ContentSwitcher(initial="disks"):
            yield DisksTable(id="disks")
            yield PointsTable(id="points")
            yield EventsTable(id="events")
        actions = [f"{a.key} {a.title.lower()}" for a in ACTIONS]
        # The views line above numbers the views (1-3): no room for them here.
        yield Static(
            "  ".join(actions[:5]) + "\n" + "  ".join([*actions[5:], "a remove agent", "Esc back"]),
            id="keys",
        )

    def on_mount(self) -> None:
        self._show_view("disks")
        self.poll()
        self.set_interval(self.refresh_s, self.poll)

    @on(ScreenResume)
    def _resumed(self) -> None:
        self.poll()  # back from a job: show its effect at once

    def action_back(self) -> None:
        self.dismiss(None)

    def action_refresh_now(self) -> None:
        self.poll()

    def action_view(self, view: str) -> None:
        self._show_view(view)

    def _show_view(self, view: str) -> None:
        self.query_one(ContentSwitcher).current = view
        self.query_one(f"#{view}").focus()
        labels = [f">{title}<" if key == view else f" {title} " for key, title in VIEWS]
        self.query_one("#views", Static).update(
            "  ".join(f"{i}{label}" for i, label in enumerate(labels, 1))
        )

    def poll(self) -> None:
        if not self._busy:
            self._busy = True
            self.fetch()

    @work(group="refresh")
    async def fetch(self) -> None:
        try:
            self._refresh_errors = await self._fetch()
        finally:
            self._busy = False
        self._show_errors()

    def _show_errors(self) -> None:
        errors = [e for e in (self._action_error, *self._refresh_errors) if e]
        self.query_one(ErrorLine).show_error("; ".join(errors) if errors else None)

    async def _fetch(self) -> list[str]:
        """Each part on its own: an unreachable master target costs the points only."""
        errors: list[str] = []

        async def ask(method: str, *args: Any) -> Any:
            try:
                return await self.client.call(method, *args)
            except Exception as exc:
                text = describe(exc)
                if text is None:
                    raise
                errors.append(text)
                return None

        machine = await ask("GetMachine", self.machine)
        if machine is not None:
            self.query_one("#details", Static).update(details(record(machine)))
            self.hostname = str(record(machine).get("hostname") or self.machine)
        disks = await ask("ListDisks", self.machine)
        if disks is not None:
            self.query_one(DisksTable).update_disks(records(disks))
        points = await ask("ListPoints", self.machine)
        if points is not None:
            self.query_one(PointsTable).update_points(records(points))
        events = await ask("ListEvents", EVENTS)
        if events is not None:
            mine = [e for e in records(events) if e.get("subject") == self.machine]
            self.query_one(EventsTable).update_events(mine)
        return list(dict.fromkeys(errors))  # one unreachable server says so once

    def action_run(self, kind: str) -> None:
        action = BY_KIND[ActionKind(kind)]

        def confirmed(choice: Confirmed | None) -> None:
            if choice is not None:
                self.start(action, choice)

        self.app.push_screen(ConfirmScreen(action, self.machine), confirmed)

    def action_remove_agent(self) -> None:
        def closed(removed: bool | None) -> None:
            if removed:  # the machine is gone from the inventory: nothing left to show
                self.dismiss(None)

        remove = PushScreen(self.client, self.poll_s, install=False, host=self.hostname,
                            machine=self.machine)  # fmt: skip
        self.app.push_screen(remove, closed)

    @work(group="action")
    async def start(self, action: Action, choice: Confirmed) -> None:
        args = action.arguments(self.machine, choice.point, choice.mode)
        try:
            job = await self.client.call(action.method, *args)
        except Exception as exc:
            text = describe(exc)
            if text is None:
                raise
            self._action_error = f"{action.title} refused: {text}"
            self._show_errors()
            return
        self._action_error = None
        self._show_errors()
        self.app.push_screen(JobScreen(self.client, str(job), self.poll_s))
