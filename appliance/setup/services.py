"""Start, stop and restart the appliance's own units, and read their journal.

Only the units Secondsite installs for its roles are reachable (`ALLOWED`): the
console's operators are not root, and Setup1 must not become a way to stop sshd or
the setup service itself. Every other name is refused with NotAllowed before
systemd is asked anything. A job is followed to its end and the unit's state
afterwards decides: a start or restart that leaves the unit anything but active is
Failed, with systemd's state and result in the message.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from appliance.setup.errors import Failed, InvalidArgument, NotAllowed
from appliance.setup.journal import Journal, JournalLines
from appliance.setup.roles import Role

_log = logging.getLogger(__name__)

# Each role's target, then its daemon: the order GetUnits lists them in.
UNITS = tuple(unit for role in Role for unit in (role.unit, f"secondsite-{role.value}d.service"))
ALLOWED = frozenset(UNITS)
ACTIONS = {"start": "StartUnit", "stop": "StopUnit", "restart": "RestartUnit"}
RUNNING = frozenset({"active", "reloading"})
STOPPED = frozenset({"inactive", "failed"})


class JobRunner(Protocol):
    def run_job(self, method: str, unit: str) -> dict[str, str]: ...
    def unit_status(self, unit: str) -> dict[str, str]: ...


def check_unit(unit: str, allowed: frozenset[str] = ALLOWED) -> str:
    if unit not in allowed:
        names = ", ".join(sorted(allowed))
        raise NotAllowed(f"{unit!r} is not one of the appliance's units ({names})")
    return unit


class Services:
    def __init__(
        self, units: JobRunner | None, journal: Journal, allowed: frozenset[str] = ALLOWED
    ) -> None:
        self._units = units
        self._journal = journal
        self.allowed = allowed

    def _manager(self) -> JobRunner:
        if self._units is None:
            raise Failed("units are not managed here: setupd runs without systemd's bus")
        return self._units

    def control(self, action: str, unit: str) -> dict[str, Any]:
        """Run `action` (start, stop, restart) on `unit`; the unit's state after it."""
        method = ACTIONS.get(action)
        if method is None:
            known = ", ".join(ACTIONS)
            raise InvalidArgument(f"unknown unit action {action!r}; actions are {known}")
        check_unit(unit, self.allowed)
        status = self._manager().run_job(method, unit)
        state = status["active_state"]
        ok = state in STOPPED if action == "stop" else state in RUNNING
        if not ok:
            result = f", result {status['result']}" if status.get("result") else ""
            raise Failed(
                f"{action} {unit} failed: it is {state} ({status['sub_state']}{result}); "
                "its journal lines say why"
            )
        _log.info("%s %s: now %s", action, unit, state)
        return {"unit": unit, **status}

    def status(self, unit: str) -> dict[str, Any]:
        return {"unit": check_unit(unit, self.allowed), **self._manager().unit_status(unit)}

    def statuses(self) -> list[dict[str, Any]]:
        """Every allowed unit's state, in UNITS order (then any others, sorted)."""
        order = [u for u in UNITS if u in self.allowed] + sorted(self.allowed - set(UNITS))
        return [self.status(unit) for unit in order]

    def journal(self, unit: str, count: int) -> JournalLines:
        return self._journal.lines(check_unit(unit, self.allowed), count)
