"""Disk ids follow the disk (its serial, or a loop device's backing file), not the kernel
name: renamed and swapped loop devices keep their ids and their saved state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.discovery import Disk, disk_identity
from agent.disk_ids import FILE, assign
from agent.state import DiskState, load, save
from tests.agent.helpers import find

MIB = 1 << 20


def fake(name: str, **kw: object) -> Disk:
    base: dict[str, object] = {
        "name": name, "path": Path(f"/dev/{name}"), "major": 8, "minor": 16, "size": MIB,
        "logical_sector_size": 512, "physical_sector_size": 512, "rotational": False,
        "read_only": False, "removable": False,
    }  # fmt: skip
    return Disk(**(base | kw))  # type: ignore[arg-type]


def test_new_disks_get_the_existing_format_and_keep_it_under_another_name(
    tmp_path: Path,
) -> None:
    a, b = fake("sdb", serial="A"), fake("sdc", serial="B")
    assert assign(tmp_path, "m", [a, b]) == {"sdb": "m-sdb", "sdc": "m-sdc"}
    # Reboot: the names swap, and a third disk without identity shows up as sdd.
    swapped = [fake("sdc", serial="A"), fake("sdb", serial="B"), fake("sdd")]
    assert assign(tmp_path, "m", swapped) == {"sdc": "m-sdb", "sdb": "m-sdc", "sdd": "m-sdd"}
    # A new disk under a name whose id belongs to an absent disk gets its own id.
    assert assign(tmp_path, "m", [fake("sdb", serial="C")]) == {"sdb": "m-sdb-2"}
    assert assign(tmp_path, "m", [fake("sdb", serial="D")]) == {"sdb": "m-sdb-3"}
    recorded = json.loads((tmp_path / FILE).read_text())["disks"]
    assert recorded == {"serial:::A": "m-sdb", "serial:::B": "m-sdc",
                        "serial:::C": "m-sdb-2", "serial:::D": "m-sdb-3"}  # fmt: skip


def test_an_install_without_the_map_is_read_from_its_state_files(tmp_path: Path) -> None:
    # Before the map: ids were <machine>-<name>, the state files record the identity.
    save(tmp_path, DiskState("m-sdb", MIB, initial_done=True, identity="serial:::A"))
    save(tmp_path, DiskState("m-sdc", MIB, initial_done=True, identity="serial:::B"))
    save(tmp_path, DiskState("m-sdd", MIB, initial_done=True))  # older: no identity
    (tmp_path / "status.json").write_text("{}")
    disks = [fake("sdb", serial="B"), fake("sdc", serial="A"), fake("sdd", serial="E")]
    assert assign(tmp_path, "m", disks) == {"sdb": "m-sdc", "sdc": "m-sdb", "sdd": "m-sdd"}


def test_a_damaged_map_is_rebuilt_from_the_state_files(tmp_path: Path) -> None:
    save(tmp_path, DiskState("m-sdb", MIB, identity="serial:::A"))
    (tmp_path / FILE).write_text('{"version": 1, "disks": {"serial:::A": 3}}')
    assert assign(tmp_path, "m", [fake("sdc", serial="A")]) == {"sdc": "m-sdb"}
    assert json.loads((tmp_path / FILE).read_text())["disks"] == {"serial:::A": "m-sdb"}


def test_two_devices_on_one_backing_file_get_two_ids(tmp_path: Path) -> None:
    same = {"backing_file": "/img/a.img"}
    ids = assign(tmp_path, "m", [fake("loop0", **same), fake("loop1", **same)])
    assert ids == {"loop0": "m-loop0", "loop1": "m-loop1"}
    assert assign(tmp_path, "m", [fake("loop1", **same), fake("loop0", **same)]) == ids


# -- real loop devices ---------------------------------------------------------------


def losetup(*args: str) -> str:
    return subprocess.run(["losetup", *args], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


@contextmanager
def attached(images: list[Path], spare: list[Path]) -> Iterator[list[Path]]:
    """`images` attached; afterwards every device on them or on `spare` is detached,
    wherever the test moved them."""
    devices = [Path(losetup("-f", "--show", str(image))) for image in images]
    try:
        yield devices
    finally:
        for image in images + spare:
            for line in losetup("-j", str(image)).splitlines():
                subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)


def reattach(device: Path, image: Path) -> None:
    """`image` on exactly `device` (free since we detached it; another user of the
    machine may have taken it in between, which only this test's premise can't survive)."""
    try:
        losetup(str(device), str(image))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"{device} was taken by someone else meanwhile: {exc.stderr}")


@pytest.mark.root
def test_loop_devices_keep_their_ids_and_state_across_detach_and_swap(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    images = [tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"]
    for image in images:
        image.write_bytes(bytes(MIB))
    state_dir = tmp_path / "state"
    with attached(images[:2], images[2:]) as (dev_a, dev_b):
        first = [find(dev_a), find(dev_b)]
        ids = assign(state_dir, "m", first)
        id_a, id_b = ids[dev_a.name], ids[dev_b.name]
        assert (id_a, id_b) == (f"m-{dev_a.name}", f"m-{dev_b.name}")
        save(state_dir, DiskState(id_a, MIB, acked_seq=7, initial_offset=MIB,
                                  initial_done=True, identity=disk_identity(first[0])))  # fmt: skip
        # Detach both and re-attach swapped: each kernel name is now the other disk.
        losetup("-d", str(dev_a))
        losetup("-d", str(dev_b))
        reattach(dev_a, images[1])
        reattach(dev_b, images[0])
        swapped = [find(dev_a), find(dev_b)]
        again = assign(state_dir, "m", swapped)
        assert again == {dev_a.name: id_b, dev_b.name: id_a}
        # a.img, now behind dev_b, finds its own state: its copy does not start over.
        state = load(state_dir, again[dev_b.name], MIB, disk_identity(find(dev_b)))
        assert (state.acked_seq, state.initial_done) == (7, True)
        # A new disk behind b's first name (whose id b keeps) gets an id of its own,
        # and a.img attached wherever the kernel puts it still gets a's.
        losetup("-d", str(dev_b))
        reattach(dev_b, images[2])
        dev_moved = Path(losetup("-f", "--show", str(images[0])))
        now = assign(state_dir, "m", [find(dev_b), find(dev_a), find(dev_moved)])
        assert now == {dev_b.name: f"{id_b}-2", dev_a.name: id_b, dev_moved.name: id_a}
