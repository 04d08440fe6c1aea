"""Process servers and master targets: reachable or not, load, capacity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.text import Text

from appliance.ctl.render import fmt_bool, fmt_bytes, fmt_count, fmt_percent
from tui.widgets.fitted_table import Cell, Col, FittedTable

_ROLES = {"process": "process", "target": "master-tgt"}


def capacity_cell(server: Mapping[str, Any]) -> str:
    free, total = server.get("free_bytes"), server.get("capacity_bytes")
    if not isinstance(total, int | float) or total <= 0 or not isinstance(free, int | float):
        return "-"
    return f"{fmt_percent((total - free) / total * 100)} of {fmt_bytes(total)}"


def up_cell(server: Mapping[str, Any]) -> Cell:
    # A server that stopped reporting is the thing to see: marked, not only coloured.
    if server.get("connected") is False:
        return Text("!no", style="bold reverse")
    return fmt_bool(server.get("connected"))


class ServersTable(FittedTable):
    COLUMNS = (
        Col("name", "SERVER", 24, shrink=True, min_width=10),
        Col("role", "ROLE", 10),
        Col("up", "UP", 3),
        Col("machines", "LOAD", 4, right=True),
        Col("backlog", "BACKLOG", 8, drop=2, right=True),
        Col("capacity", "USED", 15, drop=1),
        Col("address", "ADDRESS", 21, drop=3),
    )

    def update_servers(self, servers: Sequence[Mapping[str, Any]]) -> None:
        rows = []
        for s in servers:
            name = str(s.get("name", "?"))
            role = str(s.get("role", "-"))
            rows.append(
                (
                    name,
                    {
                        "name": name,
                        "role": _ROLES.get(role, role),
                        "up": up_cell(s),
                        "machines": fmt_count(s.get("machines")),
                        "backlog": fmt_bytes(s.get("backlog_bytes")),
                        "capacity": capacity_cell(s),
                        "address": str(s.get("address", "-")),
                    },
                )
            )
        self.show(rows)
