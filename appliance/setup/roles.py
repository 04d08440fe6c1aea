"""Which roles this appliance runs: the role targets, enabled and started by systemd.

A role is switched on and off as a whole through its target (`secondsite-<role>.target`,
whose [Install] section pulls in the role's daemon with Also=). `SetRoles` names the
complete wanted set: those targets are enabled and started, the others disabled and
stopped. The calls go to systemd's own D-Bus API through a `UnitManager`
(`systemd.SystemdClient` on the appliance).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any, Protocol

from appliance.setup.errors import InvalidArgument

_log = logging.getLogger(__name__)

ENABLED_STATES = frozenset({"enabled", "enabled-runtime"})


class Role(StrEnum):
    CONFIG = "config"
    PROCESS = "process"
    TARGET = "target"

    @property
    def unit(self) -> str:
        return f"secondsite-{self.value}.target"


class UnitManager(Protocol):
    def enable(self, units: list[str]) -> Any: ...
    def disable(self, units: list[str]) -> Any: ...
    def start(self, unit: str) -> Any: ...
    def stop(self, unit: str) -> Any: ...
    def unit_file_state(self, unit: str) -> str: ...
    def active_state(self, unit: str) -> str: ...


def parse_roles(names: list[str]) -> set[Role]:
    roles: set[Role] = set()
    for name in names:
        try:
            roles.add(Role(name))
        except ValueError:
            known = ", ".join(r.value for r in Role)
            raise InvalidArgument(f"unknown role {name!r}; roles are {known}") from None
    return roles


class Roles:
    def __init__(self, units: UnitManager) -> None:
        self._units = units

    def get(self) -> dict[str, dict[str, Any]]:
        """role -> {unit, enabled, active, unit_file_state, active_state}."""
        out: dict[str, dict[str, Any]] = {}
        for role in Role:
            file_state = self._units.unit_file_state(role.unit)
            active_state = self._units.active_state(role.unit)
            out[role.value] = {
                "unit": role.unit,
                "enabled": file_state in ENABLED_STATES,
                "active": active_state in ("active", "reloading"),
                "unit_file_state": file_state,
                "active_state": active_state,
            }
        return out

    def set(self, names: list[str]) -> dict[str, dict[str, Any]]:
        wanted = parse_roles(names)
        current = self.get()
        enable = [r.unit for r in Role if r in wanted and not current[r.value]["enabled"]]
        disable = [r.unit for r in Role if r not in wanted and current[r.value]["enabled"]]
        # Enable before starting and stop after disabling: a boot in between keeps the
        # choice, whichever step it interrupts.
        if enable:
            self._units.enable(enable)
        if disable:
            self._units.disable(disable)
        for role in Role:
            if role in wanted and not current[role.value]["active"]:
                self._units.start(role.unit)
            elif role not in wanted and current[role.value]["active_state"] != "inactive":
                self._units.stop(role.unit)
        _log.info("roles set to %s", sorted(r.value for r in wanted) or "none")
        return self.get()
