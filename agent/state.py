"""What the replicator must remember across a restart, per disk, written atomically.

One small JSON file per disk (`<state_dir>/<disk_id>.json`). It records only facts the
receiver has acknowledged as durable: the highest acked sequence number and how far
the initial copy is durably done. A crash between an ACK and the write loses nothing:
the file lags, the next run re-reads (and re-sends) a little more, and the sequence
numbers continue after the receiver's own durable sequence (DISK_OPENED), never after
this file alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from agent.errors import StateCorrupt
from appliance.storage.atomic import atomic_write

VERSION = 1


@dataclass
class DiskState:
    disk_id: str
    size: int
    acked_seq: int = 0
    initial_offset: int = 0  # [0, initial_offset) of the initial copy is durable remotely
    initial_done: bool = False
    # What the disk is, beyond its kernel name (serial number, loop backing file): the
    # name can move to another disk across a reboot, and this state must not follow it.
    identity: str = ""

    def snapshot(self) -> DiskState:
        return replace(self)

    @property
    def initial_percent(self) -> float:
        if self.initial_done or self.size == 0:
            return 100.0
        return 100.0 * self.initial_offset / self.size


def state_path(state_dir: Path, disk_id: str) -> Path:
    return state_dir / f"{disk_id}.json"


def load(state_dir: Path, disk_id: str, size: int, identity: str = "") -> DiskState:
    """The saved state, or a fresh one. A disk whose size changed, or which is another
    disk now (its identity differs), starts over: its initial copy no longer describes
    what is there. A file that does not parse is StateCorrupt."""
    path = state_path(state_dir, disk_id)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return DiskState(disk_id, size, identity=identity)
    try:
        data = json.loads(raw)
        if data.get("version") != VERSION:
            raise ValueError(f"unknown version {data.get('version')!r}")
        state = DiskState(
            disk_id=str(data["disk_id"]),
            size=int(data["size"]),
            acked_seq=int(data["acked_seq"]),
            initial_offset=int(data["initial_offset"]),
            initial_done=bool(data["initial_done"]),
            identity=str(data.get("identity", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StateCorrupt(path, str(exc)) from exc
    if state.disk_id != disk_id:
        raise StateCorrupt(path, f"holds disk {state.disk_id!r}, not {disk_id!r}")
    if state.size != size or (identity and state.identity and state.identity != identity):
        # The sequence still continues after the receiver's; only the copy restarts.
        return DiskState(disk_id, size, acked_seq=state.acked_seq, identity=identity)
    state.identity = identity or state.identity
    if not 0 <= state.initial_offset <= size or state.acked_seq < 0:
        raise StateCorrupt(path, f"offset {state.initial_offset} or seq {state.acked_seq}")
    return state


def save(state_dir: Path, state: DiskState) -> None:
    body = {"version": VERSION, **asdict(state)}
    atomic_write(state_path(state_dir, state.disk_id), json.dumps(body, indent=1).encode())
