"""Health conditions of a process server, raised and cleared with a log line each."""

from __future__ import annotations

import logging
import time
from enum import StrEnum

log = logging.getLogger(__name__)


class Condition(StrEnum):
    SPOOL_FULL = "spool-full"  # the configured spool limit is reached: agents paused
    DISK_FULL = "disk-full"  # the spool's filesystem is full: agents paused
    TARGET_UNREACHABLE = "target-unreachable"  # forwarding stalled, the spool grows
    SPOOL_CORRUPT = "spool-corrupt"  # a spool record failed its CRC: the disk needs a resync
    NO_TARGET = "no-target"  # no master target assigned: caching only


class Health:
    """The active conditions and since when; `raise_`/`clear` are idempotent."""

    def __init__(self) -> None:
        self._since: dict[Condition, float] = {}

    def raise_(self, condition: Condition, detail: str = "") -> None:
        if condition not in self._since:
            self._since[condition] = time.time()
            log.warning("health: %s%s", condition, f": {detail}" if detail else "")

    def clear(self, condition: Condition) -> None:
        if self._since.pop(condition, None) is not None:
            log.info("health: %s cleared", condition)

    def active(self, condition: Condition) -> bool:
        return condition in self._since

    def snapshot(self) -> dict[str, float]:
        return {str(c): round(time.time() - t, 1) for c, t in sorted(self._since.items())}
