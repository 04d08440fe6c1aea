"""STATE/status.json: written by `secondsite-agent run` every second, read by `status`.

Format (JSON object): ``pid``, ``time`` (Unix seconds of the write), ``machine_id``,
``phase`` (connecting, initial-sync, replicating, failed, stopped), ``connection``
(the stream to the process server), ``process_server``, and ``disks``: per disk id,
the replicator's status (device, size, tracker, ``initial`` progress with percent,
bytes and ETA, acked_seq, last_tag_time, tags, untagged_rounds, ...).
The agent counts as running while ``pid`` is alive and ``time`` is under
`FRESH_SECONDS` old.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from appliance.daemon.cli import OperatorError

STATUS_FILE = "status.json"
FRESH_SECONDS = 5.0
BAR_WIDTH = 30


class NotRunning(OperatorError):
    exit_code = 3  # type: ignore[assignment]  # LSB "program is not running"


class _Replicator(Protocol):
    phase: str
    app_interval: float | None
    last_app_tag_ns: int | None
    app_failure: str | None

    def status(self) -> dict[str, dict[str, Any]]: ...


def snapshot(rep: _Replicator, machine_id: str, connection: str, server: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "time": time.time(),
        "machine_id": machine_id,
        "phase": rep.phase,
        "connection": connection,
        "process_server": server,
        "disks": rep.status(),
        "app_consistent": {
            "interval_s": rep.app_interval,
            "last_ns": rep.last_app_tag_ns,
            "skipped_because": rep.app_failure,
        },
    }


def read(state_dir: Path) -> dict[str, Any]:
    path = state_dir / STATUS_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotRunning(
            f"no agent status at {path}: the agent is not running",
            "start it with `secondsite-agent run` (or pass --state-dir)",
        ) from None
    except (OSError, ValueError) as exc:
        raise NotRunning(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict):
        raise NotRunning(f"{path} is not a status object")
    return document


def pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def running(document: dict[str, Any], now: float | None = None) -> bool:
    age = (now if now is not None else time.time()) - float(document.get("time", 0))
    return pid_alive(document.get("pid")) and age < FRESH_SECONDS


def not_running(document: dict[str, Any], state_dir: Path) -> NotRunning:
    age = time.time() - float(document.get("time", 0))
    pid = document.get("pid")
    why = "not running" if not pid_alive(pid) else "alive but not updating its status"
    return NotRunning(
        f"agent status in {state_dir} is {age:.0f} s old (pid {pid} {why})",
        "check `journalctl -u secondsite-agent`, then restart it",
    )


def bar(percent: float, width: int = BAR_WIDTH) -> str:
    filled = int(width * max(0.0, min(percent, 100.0)) / 100)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def progress_line(document: dict[str, Any], width: int = 80) -> str | None:
    """One line for a terminal while the initial copy runs (None once every disk is
    synced): the whole machine's percent, a bar, and the slowest disk's ETA."""
    disks = [d for d in document.get("disks", {}).values() if isinstance(d, dict)]
    inits = [d.get("initial", {}) for d in disks]
    if not inits or all(i.get("done") for i in inits):
        return None
    sizes = [max(int(d.get("size", 0)), 1) for d in disks]
    percent = sum(float(i.get("percent", 0.0)) * s for i, s in zip(inits, sizes, strict=True))
    percent /= sum(sizes)
    etas = [i.get("eta_seconds") for i in inits if not i.get("done")]
    eta = "ETA unknown" if None in etas else "ETA " + _duration(max(etas))
    line = f"initial copy {bar(percent)} {percent:5.1f}%  {eta}  ({len(disks)} disks)"
    return line[: width - 1]


def render(document: dict[str, Any], now: float | None = None) -> str:
    now = now if now is not None else time.time()
    lines = [
        f"machine {document.get('machine_id')}: {document.get('phase')}, "
        f"{document.get('connection')} to {document.get('process_server')}, "
        f"pid {document.get('pid')}, updated {now - float(document.get('time', 0)):.1f} s ago"
    ]
    if document.get("connection_error"):
        lines.append(f"  connection: {document['connection_error']}")
    for disk_id, disk in sorted(document.get("disks", {}).items()):
        init = disk.get("initial", {})
        size_mib = int(disk.get("size", 0)) >> 20
        lines.append(
            f"  {disk_id}: {disk.get('device')}, {size_mib} MiB, "
            f"{disk.get('tracker') or 'no'} tracker, {disk.get('phase')}"
        )
        percent = float(init.get("percent", 0.0))
        if init.get("done"):
            eta = "done"
        elif init.get("eta_seconds") is not None:
            eta = "ETA " + _duration(init["eta_seconds"])
        else:
            eta = "ETA unknown"
        lines.append(f"    initial sync {bar(percent)} {percent:5.1f}%  {eta}")
        tag_time = disk.get("last_tag_time")
        tag = "none yet" if tag_time is None else f"{_duration(now - tag_time)} ago"
        lines.append(
            f"    acked seq {disk.get('acked_seq')}, last tag {tag} ({disk.get('tags', 0)} "
            f"this run), untagged rounds {disk.get('untagged_rounds', 0)}"
        )
        if disk.get("last_untagged_reason"):
            lines.append(f"    last untagged: {disk['last_untagged_reason']}")
    return "\n".join(lines)
