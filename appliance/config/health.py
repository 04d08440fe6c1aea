"""Machine health: RPO, state, and alerts that do not flap.

RPO is `now - newest recovery point` (the point every disk of the machine applied, as
the master target reports it). The state is a pure function of what the inventory
holds; alerts are raised when a condition holds and cleared only when it has clearly
gone (a band below the threshold for RPO), so a machine hovering at its threshold
does not raise and clear an alert every few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.config.model import AlertKind, MachineState, Severity

#: RPO must fall below this fraction of the threshold before its alert clears.
RPO_CLEAR_FRACTION = 0.8


@dataclass(frozen=True)
class HealthSettings:
    agent_timeout: float = 60.0  # no agent report for this long: disconnected
    server_timeout: float = 60.0


@dataclass(frozen=True)
class Alerting:
    """What `assess` says about one alert condition: raise it, clear it, or leave it."""

    kind: AlertKind
    active: bool | None  # None: inside the hysteresis band, keep what is there
    severity: Severity
    message: str


def rpo_seconds(now: float, newest_point_time: float | None) -> float | None:
    return None if newest_point_time is None else max(0.0, now - newest_point_time)


def machine_state(
    machine: dict[str, Any],
    disks: list[dict[str, Any]],
    threshold: float,
    now: float,
    settings: HealthSettings,
) -> MachineState:
    # A failover's own state outranks replication health: the monitor must not turn a
    # failed-over machine back into "paused" (protection is off on purpose).
    failover_state = ((machine.get("failover") or {}).get("failover") or {}).get("state")
    if failover_state == "failed-over":
        return MachineState.FAILED_OVER
    if failover_state == "committed":
        return MachineState.FAILOVER_COMMITTED
    if not machine["protection_enabled"]:
        return (
            MachineState.PAUSED
            if machine.get("newest_point_time") is not None
            else MachineState.REGISTERED
        )
    last_seen = machine.get("last_seen")
    if last_seen is None or now - last_seen > settings.agent_timeout:
        return MachineState.DISCONNECTED
    if any(d["resync_required"] for d in disks):
        return MachineState.RESYNC_REQUIRED
    if not disks or not all(d["initial_done"] for d in disks):
        return MachineState.INITIAL_SYNC
    rpo = rpo_seconds(now, machine.get("newest_point_time"))
    if rpo is None:
        return MachineState.INITIAL_SYNC  # synced, the first tag not applied yet
    return MachineState.RPO_EXCEEDED if rpo > threshold else MachineState.PROTECTED


def assess(
    machine: dict[str, Any], state: MachineState, threshold: float, now: float
) -> list[Alerting]:
    """The alert conditions of one machine in its current state."""
    name = machine["name"]
    rpo = rpo_seconds(now, machine.get("newest_point_time"))
    enabled = bool(machine["protection_enabled"])
    result = []
    if not enabled or rpo is None:
        rpo_active: bool | None = False
    elif rpo > threshold:
        rpo_active = True
    elif rpo < threshold * RPO_CLEAR_FRACTION:
        rpo_active = False
    else:
        rpo_active = None
    result.append(
        Alerting(
            AlertKind.RPO_EXCEEDED,
            rpo_active,
            Severity.CRITICAL,
            f"{name}: RPO {_duration(rpo)} exceeds the threshold {_duration(threshold)}"
            if rpo_active
            else f"{name}: RPO back under {_duration(threshold)}",
        )
    )
    gone = state is MachineState.DISCONNECTED
    result.append(
        Alerting(
            AlertKind.AGENT_DISCONNECTED,
            gone,
            Severity.WARNING,
            f"{name}: the agent has not reported since {_ago(machine.get('last_seen'), now)}"
            if gone
            else f"{name}: the agent reports again",
        )
    )
    resync = state is MachineState.RESYNC_REQUIRED
    result.append(
        Alerting(
            AlertKind.RESYNC_REQUIRED,
            resync,
            Severity.WARNING,
            f"{name}: a disk needs a checksum resync" if resync else f"{name}: resync finished",
        )
    )
    return result


def server_alert(server: dict[str, Any], now: float, settings: HealthSettings) -> Alerting:
    last_seen = server.get("last_seen")
    gone = last_seen is None or now - last_seen > settings.server_timeout
    return Alerting(
        AlertKind.SERVER_DISCONNECTED,
        gone,
        Severity.CRITICAL,
        f"{server['role']} server {server['name']} has not reported since {_ago(last_seen, now)}"
        if gone
        else f"{server['name']} reports again",
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _ago(when: float | None, now: float) -> str:
    return "it enrolled" if when is None else f"{_duration(now - when)} ago"
