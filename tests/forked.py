"""Crash tests' child processes: run a body in a fork that a fault hook can end like
kill -9 (`os._exit`, no cleanup, nothing flushed), and report how the child ended."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable

from appliance.storage.faults import FaultPoint, set_fault_hook

CRASHED, FINISHED = 77, 0  # exit codes: killed at a fault point, body returned


def crash_where(crash: Callable[[FaultPoint], bool]) -> None:
    """From now on, end this (child) process at the first fault point `crash` picks."""

    def hook(point: FaultPoint) -> None:
        if crash(point):
            os._exit(CRASHED)

    set_fault_hook(hook)


def in_child(body: Callable[[], None]) -> int:
    """Fork and run `body` in the child; its exit code: FINISHED when `body` returned,
    CRASHED when a `crash_where` hook ended it, 1 (traceback printed) on an exception."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        code = 1
        try:
            body()
            code = FINISHED
        except BaseException:  # noqa: BLE001 - the child reports any failure, then exits
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
