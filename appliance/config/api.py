"""What the D-Bus front end (and tests) may call on the configuration server's core.

Records are plain JSON-able dicts (str keys; str, int, float, bool, list of records
values; None means unknown and is left out on D-Bus). Every method may raise a leaf
of `appliance.config.errors.ConfigServerError`; anything else is a bug. The core runs
on the asyncio loop; these coroutines are called there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

Record = dict[str, Any]


@dataclass(frozen=True)
class JobProgress:
    job: str
    state: str
    step: str
    percent: float


@dataclass(frozen=True)
class AlertChanged:
    alert: str
    subject: str
    kind: str
    active: bool
    message: str


@dataclass(frozen=True)
class MachineStateChanged:
    machine: str
    state: str


Signal = JobProgress | AlertChanged | MachineStateChanged


@dataclass(frozen=True)
class Summary:
    """The D-Bus properties."""

    version: str
    machines: int
    protected_machines: int
    open_alerts: int
    running_jobs: int
    worst_rpo_seconds: float  # -1: no machine has a recovery point yet


class ConfigApi(Protocol):
    async def status(self) -> Record: ...
    async def machines(self) -> list[Record]: ...
    async def machine(self, machine: str) -> Record: ...
    async def disks(self, machine: str) -> list[Record]: ...
    async def points(self, machine: str) -> list[Record]: ...
    async def servers(self) -> list[Record]: ...
    async def jobs(self, include_finished: bool) -> list[Record]: ...
    async def job(self, job: str) -> Record: ...
    async def alerts(self, include_cleared: bool) -> list[Record]: ...
    async def events(self, limit: int) -> list[Record]: ...
    async def policies(self) -> list[Record]: ...
    async def set_policy(self, name: str, settings: Record) -> Record: ...
    async def assign_policy(self, machine: str, policy: str) -> None: ...
    async def protect(self, machine: str, policy: str | None) -> str: ...
    async def unprotect(self, machine: str) -> str: ...
    async def resync(self, machine: str) -> str: ...
    async def passphrase(self, rotate: bool) -> Record: ...
    async def revoke(self, name: str) -> None: ...
    def summary(self) -> Summary: ...
    def subscribe(self, listener: Callable[[Signal], None]) -> Callable[[], None]:
        """Call `listener` (on the loop) for every signal; returns the unsubscribe."""
        ...
