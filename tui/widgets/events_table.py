"""The configuration server's events about one subject, newest first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from appliance.ctl.render import fmt_text, fmt_time
from tui.widgets.alerts_list import severity_cell
from tui.widgets.fitted_table import Col, FittedTable


class EventsTable(FittedTable):
    COLUMNS = (
        Col("time", "TIME", 19, drop=1),
        Col("severity", "SEV", 4),
        Col("kind", "KIND", 12, drop=2),
        Col("message", "MESSAGE", 60, shrink=True, min_width=20),
    )

    def update_events(self, events: Sequence[Mapping[str, Any]]) -> None:
        self.show(
            [
                (
                    str(e.get("id", i)),
                    {
                        "time": fmt_time(e.get("time"), seconds=True),
                        "severity": severity_cell(e.get("severity")),
                        "kind": fmt_text(e.get("kind")),
                        "message": fmt_text(e.get("message")),
                    },
                )
                for i, e in enumerate(events)
            ]
        )
