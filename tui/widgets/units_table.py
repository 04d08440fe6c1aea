"""The appliance's systemd units with what they are and their state."""

from __future__ import annotations

from tui.widgets.fitted_table import Col, FittedTable


class UnitsTable(FittedTable):
    COLUMNS = (
        Col("unit", "UNIT", 28, shrink=True, min_width=16),
        Col("role", "WHAT", 20, drop=1),
        Col("state", "STATE", 22),
    )
