"""A stand-in for the configuration server with Config1's record shapes: the console's
screens are under test here, the real server is in test_console_configd.py."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

from appliance.dbus.client import DBusCallError

CONFLICT = "org.secondsite.Config1.Error.Conflict"
SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"

NOW = time.time()


def machine(name: str, state: str = "protected", rpo: float = 4.0, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "hostname": name,
        "state": state,
        "policy": "default",
        "process_server": "ps1",
        "master_target": "mt1",
        "protection_enabled": True,
        "rpo_seconds": rpo,
        "rpo_threshold_s": 900.0,
        "initial_percent": 100.0,
        "backlog_bytes": 3 << 20,
        "disks": 1,
        "last_seen": NOW - 2,
        **extra,
    }


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: dict[str, DBusCallError] = {}
        self.machines = [
            machine("web1"),
            machine("db1", state="rpo-exceeded", rpo=1000.0),
            machine("app1", state="initial-sync", rpo=-1, initial_percent=42.0),
        ]
        self.servers = [
            {"name": "ps1", "role": "process", "address": "10.0.0.5:7443", "connected": True,
             "machines": 3, "backlog_bytes": 9 << 20},
            {"name": "mt1", "role": "target", "address": "10.1.0.5:7444", "connected": False,
             "machines": 3, "capacity_bytes": 100 << 30, "free_bytes": 40 << 30},
        ]  # fmt: skip
        self.alerts = [
            {"id": 7, "subject": "db1", "kind": "rpo-exceeded", "severity": "critical",
             "message": "RPO 16m40s exceeds the threshold 15m00s", "raised_at": NOW - 60},
        ]  # fmt: skip
        self.rate = 2.0 * (1 << 20)
        self.job_states: list[dict[str, Any]] = [
            {"state": "running", "step": "place", "percent": 30.0},
            {"state": "running", "step": "initial-sync", "percent": 60.0},
            {"state": "succeeded", "step": "done", "percent": 100.0},
        ]
        self.job_kind = "protect"
        self.job_subject = "web1"
        self._job_iter: Iterator[dict[str, Any]] | None = None
        self.closed = False

    async def call(self, method: str, *args: Any) -> Any:
        self.calls.append((method, copy.deepcopy(args)))  # as sent: the caller may clear them
        if method in self.fail:
            raise self.fail[method]
        return getattr(self, f"_{method}")(*args)

    def close(self) -> None:
        self.closed = True

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    # -- Config1 ---------------------------------------------------------------------

    def _Status(self) -> dict[str, Any]:
        rpos = [m["rpo_seconds"] for m in self.machines if m["rpo_seconds"] >= 0]
        by_state: dict[str, int] = {}
        for m in self.machines:
            by_state[m["state"]] = by_state.get(m["state"], 0) + 1
        return {
            "version": "0.1.0",
            "machines": {"total": len(self.machines), "by_state": by_state},
            "worst_rpo_seconds": max(rpos) if rpos else -1.0,
            "open_alerts": len(self.alerts),
            "alerts": self.alerts,
            "servers": self.servers,
            "jobs": [],
        }

    def _ListMachines(self) -> list[dict[str, Any]]:
        return self.machines

    def _GetMachine(self, name: str) -> dict[str, Any]:
        for m in self.machines:
            if m["name"] == name:
                return m
        raise DBusCallError("org.secondsite.Config1.Error.NotFound", f"no machine {name!r}")

    def _ListDisks(self, name: str) -> list[dict[str, Any]]:
        return [
            {"disk_id": "sda", "path": "/dev/sda", "size_bytes": 20 << 30, "sector_size": 512,
             "initial_percent": 100.0, "initial_done": True, "backlog_bytes": 3 << 20,
             "rate_in": self.rate, "rate_out": self.rate, "resync_required": False},
        ]  # fmt: skip

    def _ListPoints(self, name: str) -> list[dict[str, Any]]:
        return [
            {"tag": f"{name}-crash-0001", "time": NOW - 10, "kind": "crash", "usable": True},
            {"tag": f"{name}-app-0001", "time": NOW - 300, "kind": "app", "usable": True},
        ]

    def _ListEvents(self, limit: int) -> list[dict[str, Any]]:
        return [
            {"id": 2, "time": NOW - 5, "severity": "info", "subject": "web1", "kind": "state",
             "message": "web1 is protected"},
            {"id": 1, "time": NOW - 9, "severity": "info", "subject": "db1", "kind": "state",
             "message": "db1 is rpo-exceeded"},
        ]  # fmt: skip

    def _job(self, *args: Any) -> str:
        self._job_iter = iter(self.job_states)
        return "job-42"

    _Protect = _Unprotect = _Resync = _TestFailover = _Cleanup = _job
    _Failover = _Commit = _Cancel = _job

    def _PushInstall(self, host: str, options: dict[str, Any]) -> str:
        self.job_kind, self.job_subject = "push-install", f"push:{host}"
        return self._job()

    def _PushUninstall(self, host: str, options: dict[str, Any]) -> str:
        self.job_kind, self.job_subject = "push-uninstall", f"push:{host}"
        return self._job()

    def _GetJob(self, job: str) -> dict[str, Any]:
        assert self._job_iter is not None, "GetJob before any job was started"
        step = next(self._job_iter, self.job_states[-1])
        return {"id": job, "kind": self.job_kind, "subject": self.job_subject, **step}
