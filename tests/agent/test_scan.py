"""The scan tracker on a real loop device with a mounted ext4: what it reports, what it
persists, and what survives a crash between reporting and acknowledgement."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent.trackers.scan as scan_module
from agent.discovery import Disk
from agent.resync import compare
from agent.trackers import CHUNK, DirtyMap
from agent.trackers.scan import ScanTracker
from appliance.checksum import crc32c
from tests.agent.helpers import (
    chunk_diff,
    chunks_at,
    chunks_in,
    digests_of,
    find,
    read_all,
    write_file,
)
from tests.loopfs import loop_ext4

pytestmark = pytest.mark.root
MIB = 32
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[tuple[Disk, Path]]:
    with loop_ext4(tmp_path, MIB) as (device, mnt):
        yield find(device), mnt


def replicated(disk: Disk, state: Path) -> tuple[ScanTracker, bytes]:
    """A started tracker whose initial replication is done: everything committed.
    Returns it and the image the replica holds."""
    tracker = ScanTracker(disk, state)
    tracker.start()
    assert tracker.needs_resync() == DirtyMap.full(disk.size)  # no history: check it all
    image = read_all(disk.path, disk.size)
    tracker.commit(digests_of(image))
    assert not tracker.uncertain
    return tracker, image


def test_drain_reports_written_chunks_and_nothing_when_idle(
    fs: tuple[Disk, Path], tmp_path: Path
) -> None:
    disk, mnt = fs
    tracker, before = replicated(disk, tmp_path / "digests")
    assert not tracker.drain()  # idle: the baseline is the scan made by start()
    write_file(mnt, "a", 3 << 20)
    write_file(mnt, "b", 100_000)
    after = read_all(disk.path, disk.size)
    dirty = tracker.drain()
    changed = chunk_diff(before, after)
    assert len(changed) >= (3 << 20) // CHUNK
    assert changed <= chunks_at(dirty)
    assert not tracker.drain()  # drained: reset
    # Reported, not yet acknowledged: uncertain, and persisted as such.
    assert set(tracker.uncertain.chunks()) == chunks_at(dirty)


def test_commit_clears_only_what_the_replica_now_holds(
    fs: tuple[Disk, Path], tmp_path: Path
) -> None:
    disk, mnt = fs
    tracker, before = replicated(disk, tmp_path / "digests")
    write_file(mnt, "a", 1 << 20)
    dirty = tracker.drain()
    now = digests_of(read_all(disk.path, disk.size))
    old = digests_of(before)
    # An acknowledgement of older contents (sent before the change) clears nothing.
    tracker.commit({i: old[i] for i in chunks_at(dirty)})
    assert set(tracker.uncertain.chunks()) == chunks_at(dirty)
    tracker.commit({i: now[i] for i in chunks_at(dirty)})
    assert not tracker.uncertain
    with pytest.raises(ValueError):
        tracker.commit({0: b"short"})


def test_digests_survive_a_restart(fs: tuple[Disk, Path], tmp_path: Path) -> None:
    disk, mnt = fs
    state = tmp_path / "digests"
    first, before = replicated(disk, state)
    first.stop()
    write_file(mnt, "while-stopped", 1 << 20)  # written while no agent was running
    after = read_all(disk.path, disk.size)
    second = ScanTracker(disk, state)
    second.start()
    assert second.needs_resync() is None  # every chunk's replica digest is known
    assert chunk_diff(before, after) <= chunks_at(second.drain())
    assert not second.drain()


def test_kill_between_drain_and_commit_loses_nothing(fs: tuple[Disk, Path], tmp_path: Path) -> None:
    disk, mnt = fs
    state = tmp_path / "digests"
    tracker, before = replicated(disk, state)
    tracker.stop()
    write_file(mnt, "a", 2 << 20)
    after = read_all(disk.path, disk.size)
    # Another agent process drains, may have sent the data, and dies before the ack.
    child = f"""
import json, os, signal
from pathlib import Path
from agent.discovery import discover
from agent.trackers.scan import ScanTracker
from appliance.checksum import crc32c
disk = next(d for d in discover() if str(d.path) == {str(disk.path)!r})
tracker = ScanTracker(disk, Path({str(state)!r}))
tracker.start()
print(json.dumps(list(tracker.drain().extents())), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    run = subprocess.run(
        [sys.executable, "-c", child],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == -9, run.stderr
    reported = chunks_in(json.loads(run.stdout))
    changed = chunk_diff(before, after)
    assert changed <= reported
    # The master target may or may not hold them: they come back as a checksum resync,
    # and against a replica that never got them, every changed chunk differs.
    restarted = ScanTracker(disk, state)
    restarted.start()
    gap = restarted.needs_resync()
    assert gap is not None and reported <= set(gap.chunks())
    remote = digests_of(before)
    result = compare(disk.path, gap, lambda chunks: {i: remote[i] for i in chunks})
    assert set(result.differ.chunks()) == changed
    restarted.commit(result.matched)
    assert set(restarted.uncertain.chunks()) == changed


class Crash(BaseException):
    """Stands in for kill -9 at one exact step (nothing below it runs)."""


def test_crash_before_the_drain_is_persisted_reports_again(
    fs: tuple[Disk, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk, mnt = fs
    state = tmp_path / "digests"
    tracker, before = replicated(disk, state)
    write_file(mnt, "a", 1 << 20)
    after = read_all(disk.path, disk.size)

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(scan_module, "atomic_write", crash)
        with pytest.raises(Crash):
            tracker.drain()  # scanned, about to persist "uncertain": nothing was sent
    restarted = ScanTracker(disk, state)
    restarted.start()
    assert restarted.needs_resync() is None
    assert chunk_diff(before, after) <= chunks_at(restarted.drain())


def header_fields(path: Path) -> list[int | bytes]:
    return list(struct.unpack_from("<8sHHIIQIQI", path.read_bytes()))


@pytest.mark.parametrize(
    "damage", ["flip", "truncate", "magic", "version", "foreign-devno", "foreign-chunk"]
)
def test_foreign_or_corrupt_digests_mean_a_full_checksum_resync(
    fs: tuple[Disk, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    disk, _ = fs
    state = tmp_path / "digests"
    replicated(disk, state)[0].stop()
    data = bytearray(state.read_bytes())
    chunk = CHUNK
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[-5:]
    elif damage == "magic":
        data[:8] = b"NOTMINE!"
    elif damage == "version":
        data[8] = 99
    elif damage == "foreign-devno":
        # A valid file (CRC recomputed) for another device: must not be trusted.
        struct.pack_into("<I", data, 16, disk.minor + 1)
        struct.pack_into("<I", data, 40, crc32c(data[44:], crc32c(data[:40])))
    else:
        chunk = 2 * CHUNK  # the same disk tracked at another granularity
    state.write_bytes(bytes(data))
    tracker = ScanTracker(disk, state, chunk=chunk)
    with caplog.at_level(logging.WARNING, logger="agent.trackers.scan"):
        tracker.start()
    assert tracker.needs_resync() == DirtyMap.full(disk.size, chunk)
    assert any(str(state) in r.getMessage() for r in caplog.records)
    # Still a working tracker: the next commit replaces the bad file with a good one.
    tracker.commit(digests_of(read_all(disk.path, disk.size), chunk))
    again = ScanTracker(disk, state, chunk=chunk)
    again.start()
    assert again.needs_resync() is None


def test_state_file_layout_is_the_documented_one(fs: tuple[Disk, Path], tmp_path: Path) -> None:
    disk, _ = fs
    state = tmp_path / "digests"
    replicated(disk, state)
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    assert [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".digests")
    ] == []  # no temp left
    nchunks = disk.size // CHUNK
    assert len(state.read_bytes()) == 44 + 16 * nchunks + nchunks // 8
    assert header_fields(state)[:8] == [
        b"SSDIGST\n",
        1,
        1,
        disk.major,
        disk.minor,
        disk.size,
        CHUNK,
        nchunks,
    ]
