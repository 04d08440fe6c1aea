"""The protected machines: state, RPO against its threshold, throughput, backlog, sync.

An RPO over its threshold is marked with "!" before the value (and drawn reversed),
so it reads on a monochrome console as well as in colour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on
from textual.message import Message
from textual.widgets import DataTable

from appliance.ctl.render import fmt_bytes, fmt_duration, fmt_percent, fmt_rate, progress_bar
from tui.widgets.fitted_table import Cell, Col, FittedTable

EXCEEDED = "!"
SYNC_BAR = 8
# The one state too long for its column, shortened rather than cut.
_SHORT_STATES = {"failover-committed": "fo-committed"}


def rpo_exceeded(machine: Mapping[str, Any]) -> bool:
    rpo, limit = machine.get("rpo_seconds"), machine.get("rpo_threshold_s")
    if not isinstance(rpo, int | float) or not isinstance(limit, int | float):
        return False
    return limit > 0 and rpo > limit


def rpo_cell(machine: Mapping[str, Any]) -> Cell:
    text = fmt_duration(machine.get("rpo_seconds"))
    if rpo_exceeded(machine):
        return Text(EXCEEDED + text, style="bold reverse")
    return text


def sync_cell(machine: Mapping[str, Any]) -> str:
    percent = machine.get("initial_percent")
    if not isinstance(percent, int | float) or not machine.get("disks"):
        return "-"
    if percent >= 100:
        return "done"
    return f"{progress_bar(percent, SYNC_BAR)} {fmt_percent(percent):>4}"


class MachinesTable(FittedTable):
    COLUMNS = (
        Col("name", "MACHINE", 24, shrink=True, min_width=10),
        Col("state", "STATE", 15),
        Col("rpo", "RPO", 7, right=True),
        Col("limit", "LIMIT", 6, drop=4, right=True),
        Col("rate", "RATE", 10, drop=2, right=True),
        Col("backlog", "BACKLOG", 8, drop=1, right=True),
        Col("sync", "SYNC", SYNC_BAR + 5, drop=3),
    )

    @dataclass
    class Opened(Message):
        """The operator chose a machine (Enter on its row)."""

        machine: str

    def update_machines(
        self, machines: Sequence[Mapping[str, Any]], rates: Mapping[str, float]
    ) -> None:
        rows = []
        for m in machines:
            name = str(m.get("name", "?"))
            state = str(m.get("state", "-"))
            rows.append(
                (
                    name,
                    {
                        "name": name,
                        "state": _SHORT_STATES.get(state, state),
                        "rpo": rpo_cell(m),
                        "limit": fmt_duration(m.get("rpo_threshold_s")),
                        "rate": fmt_rate(rates.get(name)),
                        "backlog": fmt_bytes(m.get("backlog_bytes")),
                        "sync": sync_cell(m),
                    },
                )
            )
        self.show(rows)

    @on(DataTable.RowSelected)
    def _opened(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.Opened(event.row_key.value))
