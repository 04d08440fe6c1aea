"""What components report, validated, and the answers they get.

Agents report their disks, initial-sync progress and whether they replicate; process
servers their per-disk backlog and rates; master targets the newest recovery point
of each machine and their capacity. Reports come every few seconds from every
component, so they are taken into memory and written to the inventory in one
transaction per flush (`ReportBuffer.flush`), not one per report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from appliance.config.errors import InvalidArgument

MAX_DISKS = 64
MAX_FAILBACK_JSON = 16384  # an agent's failback figures: a few numbers per disk


def _num(value: Any, what: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise InvalidArgument(f"{what} must be a number >= {minimum:g}, not {value!r}")
    return float(value)


def _str(value: Any, what: str, limit: int = 256) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise InvalidArgument(f"{what} must be a non-empty string of at most {limit} chars")
    return value


@dataclass(frozen=True)
class DiskReport:
    disk_id: str
    path: str
    size_bytes: int
    sector_size: int
    initial_percent: float
    initial_done: bool


@dataclass(frozen=True)
class AgentReport:
    disks: tuple[DiskReport, ...]
    replicating: bool
    resync_done: int
    facts: dict[str, Any]
    failback_done: int = 0  # the newest failback generation the agent finished
    failback: dict[str, Any] = field(default_factory=dict)  # its figures, or its error

    @classmethod
    def parse(cls, params: dict[str, Any]) -> AgentReport:
        disks = params.get("disks", [])
        if not isinstance(disks, list) or len(disks) > MAX_DISKS:
            raise InvalidArgument(f"disks must be a list of at most {MAX_DISKS}")
        parsed = []
        for d in disks:
            if not isinstance(d, dict):
                raise InvalidArgument("each disk must be an object")
            parsed.append(
                DiskReport(
                    _str(d.get("disk_id"), "disk_id", 128),
                    _str(d.get("path"), "path"),
                    int(_num(d.get("size_bytes"), "size_bytes")),
                    int(_num(d.get("sector_size", 512), "sector_size", minimum=512)),
                    min(100.0, _num(d.get("initial_percent", 0.0), "initial_percent")),
                    bool(d.get("initial_done", False)),
                )
            )
        facts = params.get("facts", {})
        if not isinstance(facts, dict):
            raise InvalidArgument("facts must be an object")
        return cls(
            tuple(parsed),
            bool(params.get("replicating", False)),
            int(_num(params.get("resync_done", 0), "resync_done")),
            {str(k): v for k, v in facts.items() if isinstance(v, str | int | float | bool)},
            int(_num(params.get("failback_done", 0), "failback_done")),
            _failback(params.get("failback", {})),
        )


def _failback(value: Any) -> dict[str, Any]:
    """The figures are stored and shown as sent; only their shape and size are checked."""
    if not isinstance(value, dict):
        raise InvalidArgument("failback must be an object")
    if value:
        _num(value.get("generation"), "failback.generation")
        if len(json.dumps(value)) > MAX_FAILBACK_JSON:
            raise InvalidArgument(f"failback is larger than {MAX_FAILBACK_JSON} bytes of JSON")
    return value


@dataclass(frozen=True)
class NewestPoint:
    tag_id: str
    time: float
    kind: str
    newest_app_time: float | None


def parse_target_points(params: dict[str, Any]) -> dict[str, NewestPoint]:
    machines = params.get("machines", {})
    if not isinstance(machines, dict):
        raise InvalidArgument("machines must be an object")
    result = {}
    for name, p in machines.items():
        if not isinstance(p, dict):
            raise InvalidArgument(f"machines.{name} must be an object")
        app = p.get("newest_app_time")
        result[_str(name, "machine name", 128)] = NewestPoint(
            _str(p.get("tag_id"), "tag_id", 128),
            _num(p.get("time"), "time"),
            _str(p.get("kind", "crash"), "kind", 16),
            None if app is None else _num(app, "newest_app_time"),
        )
    return result


def parse_process_disks(params: dict[str, Any]) -> list[dict[str, Any]]:
    disks = params.get("disks", [])
    if not isinstance(disks, list):
        raise InvalidArgument("disks must be a list")
    out = []
    for d in disks:
        if not isinstance(d, dict):
            raise InvalidArgument("each disk must be an object")
        out.append(
            {
                "machine": _str(d.get("machine_id"), "machine_id", 128),
                "disk_id": _str(d.get("disk_id"), "disk_id", 128),
                "backlog_bytes": int(_num(d.get("backlog_bytes", 0), "backlog_bytes")),
                "rate_in": _num(d.get("rate_in_bytes_s", 0), "rate_in_bytes_s"),
                "rate_out": _num(d.get("rate_out_bytes_s", 0), "rate_out_bytes_s"),
            }
        )
    return out


@dataclass
class ReportBuffer:
    """Reports taken since the last flush, newest wins."""

    disks: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    machines: dict[str, dict[str, Any]] = field(default_factory=dict)

    def machine(self, name: str, **fields: Any) -> None:
        self.machines.setdefault(name, {}).update(fields)

    def disk(self, machine: str, disk_id: str, **fields: Any) -> None:
        self.disks.setdefault((machine, disk_id), {}).update(fields)

    def take(self) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], dict[str, Any]]]:
        machines, disks = self.machines, self.disks
        self.machines, self.disks = {}, {}
        return machines, disks
