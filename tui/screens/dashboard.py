"""The dashboard: machines, the hour's RPO and throughput, servers, open alerts.

Polled: every `refresh_s` one worker asks for Status (summary, servers, alerts),
ListMachines, and each machine's disks for its throughput (the machine record has
no rate). A refresh still running when the next is due makes the next one skip,
so a slow server never piles up calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Static

from appliance.ctl.render import fmt_count, fmt_duration, fmt_rate, fmt_text
from tui.client import ConsoleClient, describe, record, records
from tui.history import History
from tui.screens.machine import MachineScreen
from tui.screens.push import PushScreen
from tui.widgets.alerts_list import AlertsList
from tui.widgets.error_line import ErrorLine
from tui.widgets.machines_table import EXCEEDED, MachinesTable, rpo_exceeded
from tui.widgets.servers_table import ServersTable
from tui.widgets.trend import TrendLine


@dataclass
class Snapshot:
    status: dict[str, Any] = field(default_factory=dict)
    machines: list[dict[str, Any]] = field(default_factory=list)
    rates: dict[str, float] = field(default_factory=dict)  # machine -> bytes/s out
    at: float = 0.0

    @property
    def throughput(self) -> float:
        return sum(self.rates.values())

    @property
    def worst_rpo(self) -> float | None:
        worst = self.status.get("worst_rpo_seconds")
        return float(worst) if isinstance(worst, int | float) and worst >= 0 else None


def summary_line(snapshot: Snapshot) -> str:
    status = snapshot.status
    machines = record(status.get("machines"))
    by_state = record(machines.get("by_state"))
    jobs = records(status.get("jobs"))
    parts = [
        f"{fmt_count(machines.get('total'))} machines",
        f"{by_state.get('protected', 0)} protected",
        f"worst RPO {fmt_duration(snapshot.worst_rpo)}",
        f"{fmt_count(status.get('open_alerts'))} alerts",
        f"{len(jobs)} jobs",
    ]
    exceeded = sum(1 for m in snapshot.machines if rpo_exceeded(m))
    if exceeded:
        parts.insert(2, f"{EXCEEDED}{exceeded} over RPO")
    # The version goes last: on a narrow screen it is what may be cut.
    return ", ".join(parts) + f"   Secondsite {fmt_text(status.get('version'))}"


class DashboardScreen(Screen[None]):
    DEFAULT_CSS = """
    DashboardScreen #summary { height: 1; text-style: bold; }
    DashboardScreen MachinesTable { height: 1fr; min-height: 4; }
    DashboardScreen ServersTable { height: auto; max-height: 5; }
    DashboardScreen AlertsList { height: auto; max-height: 5; }
    DashboardScreen #keys { height: 1; dock: bottom; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("g", "refresh_now", "Refresh"),
        Binding("i", "install_agent", "Install agent"),
    ]

    @dataclass
    class Refreshed(Message):
        snapshot: Snapshot

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, DashboardScreen.Refreshed)

    @dataclass
    class RefreshFailed(Message):
        error: str

    def __init__(
        self,
        client: ConsoleClient,
        refresh_s: float,
        poll_s: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.client = client
        self.refresh_s = refresh_s
        self.poll_s = poll_s
        self.clock = clock
        self.rpo_history = History()
        self.rate_history = History()
        self.snapshot: Snapshot | None = None
        self._busy = False

    def compose(self) -> ComposeResult:
        yield Static("Secondsite: connecting to the configuration server", id="summary")
        yield ErrorLine(id="error")
        yield MachinesTable(id="machines")
        yield TrendLine("Worst RPO", self.rpo_history, fmt_duration, clock=self.clock, id="rpo")
        yield TrendLine("Throughput", self.rate_history, fmt_rate, clock=self.clock, id="rate")
        yield ServersTable(id="servers")
        yield AlertsList(id="alerts")
        yield Static(
            "Enter machine  i install agent  g refresh  s services  w setup  ? help  q quit",
            id="keys",
        )

    def on_mount(self) -> None:
        self.poll()
        self.set_interval(self.refresh_s, self.poll)

    def action_refresh_now(self) -> None:
        self.poll()

    def action_install_agent(self) -> None:
        self.app.push_screen(PushScreen(self.client, self.poll_s), lambda _: self.poll())

    def poll(self) -> None:
        if not self._busy:
            self._busy = True
            self.fetch()

    @work(group="refresh")
    async def fetch(self) -> None:
        try:
            snapshot = await self._snapshot()
        except Exception as exc:
            text = describe(exc)
            if text is None:
                raise  # a bug: the worker fails and the app shows it
            self.post_message(self.RefreshFailed(text))
        else:
            self.post_message(self.Refreshed(snapshot))
        finally:
            self._busy = False

    async def _snapshot(self) -> Snapshot:
        status = record(await self.client.call("Status"))
        machines = records(await self.client.call("ListMachines"))
        rates: dict[str, float] = {}
        for m in machines:
            name = m.get("name")
            if isinstance(name, str) and m.get("disks"):
                disks = records(await self.client.call("ListDisks", name))
                rates[name] = sum(float(d.get("rate_out") or 0) for d in disks)
        return Snapshot(status, machines, rates, self.clock())

    @on(Refreshed)
    def _refreshed(self, event: Refreshed) -> None:
        snap = event.snapshot
        self.snapshot = snap
        self.rpo_history.add(snap.at, snap.worst_rpo)
        self.rate_history.add(snap.at, snap.throughput if snap.machines else None)
        self.query_one("#summary", Static).update(summary_line(snap))
        self.query_one(ErrorLine).show_error(None)
        self.query_one(MachinesTable).update_machines(snap.machines, snap.rates)
        self.query_one(ServersTable).update_servers(records(snap.status.get("servers")))
        self.query_one(AlertsList).update_alerts(records(snap.status.get("alerts")), snap.at)
        for trend in self.query(TrendLine):
            trend.refresh()

    @on(MachinesTable.Opened)
    def _open(self, event: MachinesTable.Opened) -> None:
        self.app.push_screen(MachineScreen(self.client, event.machine, self.refresh_s, self.poll_s))

    @on(RefreshFailed)
    def _failed(self, event: RefreshFailed) -> None:
        # The last good values stay on screen; the line says they are not current.
        self.query_one(ErrorLine).show_error(event.error)
