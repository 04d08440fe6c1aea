"""A machine's recovery points, newest first: crash- or app-consistent, usable or not."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from appliance.ctl.render import fmt_bool, fmt_text, fmt_time
from tui.widgets.fitted_table import Col, FittedTable


class PointsTable(FittedTable):
    COLUMNS = (
        Col("time", "TIME", 19),
        Col("kind", "KIND", 5),
        Col("usable", "USABLE", 6),
        Col("tag", "TAG", 40, shrink=True, min_width=12),
    )

    def update_points(self, points: Sequence[Mapping[str, Any]]) -> None:
        def newest(p: Mapping[str, Any]) -> float:
            t = p.get("time")
            return -float(t) if isinstance(t, int | float) else 0.0

        self.show(
            [
                (
                    str(p.get("tag", i)),
                    {
                        "time": fmt_time(p.get("time"), seconds=True),
                        "kind": fmt_text(p.get("kind")),
                        "usable": fmt_bool(p.get("usable")),
                        "tag": fmt_text(p.get("tag")),
                    },
                )
                for i, p in enumerate(sorted(points, key=newest))
            ]
        )
