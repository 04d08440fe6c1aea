"""secondsite-lab end to end: up with churn, status, points, materialize (fsck), down."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.integration, pytest.mark.slow]


def lab(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "appliance.lab", "--state-dir", str(state), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not check or done.returncode == 0, f"lab {args[0]}: {done.stderr}"
    return done


def lab_json(state: Path, *args: str) -> Any:
    return json.loads(lab(state, *args, "--json").stdout)


def test_lab_up_points_materialize_down(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("losetup") or not shutil.which("e2fsck"):
        pytest.skip("needs root, losetup and e2fsck")
    state = tmp_path / "lab"
    try:
        lab(state, "up", "--size", "64M", "--churn", "2")
        deadline = time.monotonic() + 45
        while True:
            st = lab_json(state, "status")
            disk = st["disks"][0]
            if disk["initial_percent"] == 100.0 and disk["points"] >= 1:
                break
            assert time.monotonic() < deadline, st
            time.sleep(1)
        assert disk["device"].startswith("/dev/loop")
        assert disk["rpo_seconds"] is not None
        points = lab_json(state, "points")
        assert points and {"tag_id", "time_ns", "kind"} <= points[-1].keys()
        out = tmp_path / "out"
        lab(state, "materialize", points[-1]["tag_id"], "--out", str(out))
        image = out / "disk0.img"
        assert image.stat().st_size == 64 << 20
        subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
        again = lab(state, "up", "--size", "64M", check=False)
        assert again.returncode != 0 and "already up" in again.stderr
    finally:
        lab(state, "down")
    lab(state, "down")  # twice is fine
    assert (
        str(state)
        not in subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    )
    assert str(state) not in Path("/proc/mounts").read_text()
    pids = [p.pid for p in __import__("appliance.lab.state", fromlist=["LabState"])
            .LabState.load(state).procs.values()]  # fmt: skip
    assert pids == []
    assert survivors(state) == []


def test_status_without_lab_is_one_line(tmp_path: Path) -> None:
    done = lab(tmp_path, "status", check=False)
    assert done.returncode != 0
    assert done.stderr.startswith("secondsite-lab: error: no lab in") and "hint" in done.stderr


def test_two_disks_one_machine_share_every_point(tmp_path: Path) -> None:
    """A recovery point exists only when both disks applied its tag, and it materialises
    to two filesystems from the same instant (both fsck clean)."""
    if os.geteuid() != 0 or not shutil.which("losetup") or not shutil.which("e2fsck"):
        pytest.skip("needs root, losetup and e2fsck")
    state = tmp_path / "lab"
    try:
        lab(state, "up", "--size", "32M", "--disks", "2", "--churn", "2")
        deadline = time.monotonic() + 60
        while True:
            st = lab_json(state, "status")
            if len(st["disks"]) == 2 and all(
                d["initial_percent"] == 100.0 and d["points"] >= 1 for d in st["disks"]
            ):
                break
            assert time.monotonic() < deadline, st
            time.sleep(1)
        points = lab_json(state, "points")
        assert points
        out = tmp_path / "out"
        lab(state, "materialize", points[-1]["tag_id"], "--out", str(out))
        images = sorted(out.glob("*.img"))
        assert [p.name for p in images] == ["disk0.img", "disk1.img"]
        for image in images:
            subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
    finally:
        lab(state, "down")


def survivors(state: Path) -> list[str]:
    """Lab processes (by command line) still running for this state directory."""
    from appliance.lab.procs import strays

    return [" ".join(p.argv) for p in strays(str(state.resolve()) + "/")]


def test_down_after_a_crash_mid_up_stops_unrecorded_processes(tmp_path: Path) -> None:
    """`up` died after starting processd but before lab.json recorded it: down still
    stops it (found by the state directory in its command line)."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    from appliance.lab.state import LabState

    state = tmp_path / "lab"
    try:
        lab(state, "up", "--size", "32M")
        recorded = LabState.load(state.resolve())
        assert recorded is not None
        lost = recorded.procs.pop("processd")
        recorded.save()  # as if the crash came before this record was written
        assert " ".join(lost.argv) in survivors(state)  # still running, unrecorded
        lab(state, "down")
        assert survivors(state) == []
    finally:
        lab(state, "down")
