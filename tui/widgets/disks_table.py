"""A machine's disks: size, initial-sync progress, backlog and rates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.text import Text

from appliance.ctl.render import fmt_bytes, fmt_percent, fmt_rate, progress_bar
from tui.widgets.fitted_table import Cell, Col, FittedTable

SYNC_BAR = 8


def disk_sync_cell(disk: Mapping[str, Any]) -> str:
    if disk.get("initial_done") is True:
        return "done"
    percent = disk.get("initial_percent")
    if not isinstance(percent, int | float):
        return "-"
    return f"{progress_bar(percent, SYNC_BAR)} {fmt_percent(percent):>4}"


def resync_cell(disk: Mapping[str, Any]) -> Cell:
    return Text("!yes", style="bold reverse") if disk.get("resync_required") is True else "no"


class DisksTable(FittedTable):
    COLUMNS = (
        Col("disk", "DISK", 24, shrink=True, min_width=14),
        Col("size", "SIZE", 9, right=True),
        Col("sync", "SYNC", SYNC_BAR + 5),
        Col("backlog", "BACKLOG", 8, right=True),
        Col("in", "IN", 10, drop=2, right=True),
        Col("out", "OUT", 10, drop=3, right=True),
        Col("resync", "RESYNC", 6, drop=1),
    )

    def update_disks(self, disks: Sequence[Mapping[str, Any]]) -> None:
        self.show(
            [
                (
                    str(d.get("disk_id", i)),
                    {
                        "disk": str(d.get("path") or d.get("disk_id") or "-"),
                        "size": fmt_bytes(d.get("size_bytes")),
                        "sync": disk_sync_cell(d),
                        "backlog": fmt_bytes(d.get("backlog_bytes")),
                        "in": fmt_rate(d.get("rate_in")),
                        "out": fmt_rate(d.get("rate_out")),
                        "resync": resync_cell(d),
                    },
                )
                for i, d in enumerate(disks)
            ]
        )
