"""Which disk id each disk replicates under: bound to what the disk is, not its name.

A disk id names the replica at the master target, the process server's stream and the
agent's saved state (`STATE/DISK_ID.json`). Kernel names are not stable: after a
reboot sdb may be sdc, and two disks may swap names. So the agent keeps
`STATE/disk-ids.json`, a map from each disk's identity (`discovery.disk_identity`:
serial with vendor and model, or a loop device's backing file) to its disk id, and:

- a known disk keeps its id (and with it its replica and replication state) under
  whatever kernel name it has now;
- a new disk gets `<machine>-<kernel name>`, the format of every existing install,
  unless another disk's identity holds that id already: then `<machine>-<name>-<n>`
  with the smallest free n >= 2;
- a disk without an identity (no serial, not a loop device) can only be told apart by
  its name: it gets `<machine>-<name>` (or a suffixed id when that is taken) and is
  not recorded.

Installs from before this map existed are read from the per-disk state files, which
record the identity (and an old file without one adopts the disk now behind its
name, as it did before). Ids of disks absent now stay reserved: a disk that comes
back gets its own id, never another's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from agent.discovery import Disk, disk_identity
from agent.errors import StateCorrupt
from agent.state import VERSION as STATE_VERSION
from appliance.storage.atomic import atomic_write

log = logging.getLogger(__name__)

FILE = "disk-ids.json"
VERSION = 1


def assign(state_dir: Path, machine_id: str, disks: Sequence[Disk]) -> dict[str, str]:
    """{kernel name: disk id} for `disks`, persisted atomically before it is returned
    (so the same disks get the same ids on every later call). A map file that does
    not parse is logged and rebuilt from the per-disk state files, which record the
    identity too."""
    path = state_dir / FILE
    try:
        known = _load(path)
    except StateCorrupt as exc:
        log.warning("%s; rebuilding it from the disk state files", exc)
        known = {}
    recorded = dict(known)
    for identity, disk_id in _from_state_files(state_dir).items():
        if identity not in known and disk_id not in known.values():
            known[identity] = disk_id
    taken = set(known.values())
    ids: dict[str, str] = {}
    # Known disks first: they reserve their ids before any new disk picks one.
    for disk in sorted(disks, key=lambda d: d.name):
        mine = known.get(disk_identity(disk))
        # Two loop devices on one backing file share an identity: the first keeps it.
        if mine is not None and mine not in ids.values():
            ids[disk.name] = mine
    for disk in sorted(disks, key=lambda d: d.name):
        if disk.name in ids:
            continue
        disk_id = _free_id(f"{machine_id}-{disk.name}", taken)
        taken.add(disk_id)
        ids[disk.name] = disk_id
        identity = disk_identity(disk)
        if identity and identity not in known:
            known[identity] = disk_id
    if known != recorded:
        state_dir.mkdir(parents=True, exist_ok=True)
        body = {"version": VERSION, "disks": dict(sorted(known.items()))}
        atomic_write(path, json.dumps(body, indent=1).encode() + b"\n")
    return ids


def _free_id(wanted: str, taken: set[str]) -> str:
    if wanted not in taken:
        return wanted
    n = 2
    while f"{wanted}-{n}" in taken:
        n += 1
    return f"{wanted}-{n}"


def _load(path: Path) -> dict[str, str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(raw)
        if data.get("version") != VERSION:
            raise ValueError(f"unknown version {data.get('version')!r}")
        disks = data["disks"]
        if not isinstance(disks, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in disks.items()
        ):
            raise ValueError("'disks' is not a map of identity to disk id")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateCorrupt(path, str(exc)) from exc
    if len(set(disks.values())) != len(disks):
        raise StateCorrupt(path, "two disks share one disk id")
    return dict(disks)


def _from_state_files(state_dir: Path) -> dict[str, str]:
    """{identity: disk id} recorded in the per-disk state files (`agent.state`); files
    that are not disk states (status.json, this map) or record no identity are skipped.
    Sorted by name so that the result does not depend on directory order."""
    found: dict[str, str] = {}
    if not state_dir.is_dir():
        return found
    for path in sorted(state_dir.glob("*.json")):
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            continue
        disk_id, identity = data.get("disk_id"), data.get("identity")
        if disk_id == path.stem and isinstance(identity, str) and identity:
            found.setdefault(identity, disk_id)
    return found
