"""The appliance's roles: each role's target unit, enabled or not, and its state."""

from __future__ import annotations

from tui.widgets.fitted_table import Col, FittedTable


class RolesTable(FittedTable):
    COLUMNS = (
        Col("role", "ROLE", 20),
        Col("unit", "UNIT", 25, shrink=True, min_width=12),
        Col("enabled", "ENABLED", 9),
        Col("active", "ACTIVE", 12),
    )
