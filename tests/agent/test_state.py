"""The replicator's per-disk state: atomic, checked, and never carried to another disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.discovery import Disk, disk_identity
from agent.errors import StateCorrupt
from agent.state import DiskState, load, save, state_path

GIB = 1 << 30


def test_round_trip_and_the_identity_guard(tmp_path: Path) -> None:
    save(tmp_path, DiskState("m-sdb", GIB, acked_seq=42, initial_offset=GIB,
                             initial_done=True, identity="serial:ATA:X:1"))  # fmt: skip
    same = load(tmp_path, "m-sdb", GIB, "serial:ATA:X:1")
    assert (same.acked_seq, same.initial_done) == (42, True)
    # After a reboot the kernel name sdb is another disk: its copy starts over (the
    # sequence continues after what the receiver acknowledged).
    other = load(tmp_path, "m-sdb", GIB, "serial:ATA:X:2")
    assert (other.acked_seq, other.initial_offset, other.initial_done) == (42, 0, False)
    assert other.identity == "serial:ATA:X:2"
    # No identity known now (or recorded then): name and size are all there is.
    assert load(tmp_path, "m-sdb", GIB, "").initial_done is True
    resized = load(tmp_path, "m-sdb", 2 * GIB, "serial:ATA:X:1")
    assert resized.initial_done is False and resized.acked_seq == 42


def test_a_damaged_state_file_is_named(tmp_path: Path) -> None:
    state_path(tmp_path, "m-sdc").write_text(json.dumps({"version": 1, "disk_id": "m-sdc"}))
    with pytest.raises(StateCorrupt, match="m-sdc"):
        load(tmp_path, "m-sdc", GIB)


def test_identity_prefers_the_serial_then_a_loop_backing_file() -> None:
    def disk(**kw: object) -> Disk:
        base: dict[str, object] = {
            "name": "sdb", "path": Path("/dev/sdb"), "major": 8, "minor": 16, "size": GIB,
            "logical_sector_size": 512, "physical_sector_size": 512, "rotational": False,
            "read_only": False, "removable": False,
        }  # fmt: skip
        return Disk(**(base | kw))  # type: ignore[arg-type]

    assert disk_identity(disk(serial="S1", vendor="ATA", model="M")) == "serial:ATA:M:S1"
    assert disk_identity(disk(backing_file="/img/a.img (deleted)")) == "file:/img/a.img"
    assert disk_identity(disk()) == ""
