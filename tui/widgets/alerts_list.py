"""Open alerts, the most severe first; severity spelt out, not only coloured."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.text import Text

from appliance.ctl.render import fmt_text, fmt_time
from tui.widgets.fitted_table import Cell, Col, FittedTable

_RANK = {"critical": 0, "warning": 1, "info": 2}
_LABEL = {"critical": "CRIT", "warning": "WARN", "info": "info"}


def severity_cell(severity: object) -> Cell:
    label = _LABEL.get(str(severity), fmt_text(severity))
    return Text(label, style="bold reverse") if severity == "critical" else label


class AlertsList(FittedTable):
    COLUMNS = (
        Col("severity", "SEV", 4),
        Col("subject", "SUBJECT", 12),
        Col("raised", "RAISED", 16, drop=1),
        Col("message", "MESSAGE", 60, shrink=True, min_width=20),
    )

    def update_alerts(self, alerts: Sequence[Mapping[str, Any]], now: float | None = None) -> None:
        now = time.time() if now is None else now
        ordered = sorted(
            alerts,
            key=lambda a: (_RANK.get(str(a.get("severity")), 3), -float(a.get("raised_at") or 0)),
        )
        self.show(
            [
                (
                    str(a.get("id", i)),
                    {
                        "severity": severity_cell(a.get("severity")),
                        "subject": fmt_text(a.get("subject")),
                        "raised": fmt_time(a.get("raised_at"), now),
                        "message": fmt_text(a.get("message")),
                    },
                )
                for i, a in enumerate(ordered)
            ]
        )
