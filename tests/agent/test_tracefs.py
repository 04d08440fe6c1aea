"""The tracefs tracker on a real loop device with a mounted ext4: what it marks, the
marker barrier after FIFREEZE, overruns, and its private instance's lifecycle."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.discovery import Disk
from agent.errors import TrackerUnavailable
from agent.quiesce import freeze
from agent.trackers import CHUNK, DirtyMap, Tracker
from agent.trackers.tracefs import TracefsTracker
from agent.trackers.tracefs_instance import DEFAULT_TRACEFS, process_start_time
from tests.agent.helpers import find
from tests.agent.tracking import chunks_of, device_offset, ensure_thawed, file_extents, slow_reader
from tests.loopfs import loop_ext4

pytestmark = pytest.mark.root
MIB = 64
REPO = Path(__file__).resolve().parents[2]
INSTANCES = DEFAULT_TRACEFS / "instances"


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[tuple[Disk, Path]]:
    with loop_ext4(tmp_path, MIB) as (device, mnt):
        try:
            yield find(device), mnt
        finally:
            ensure_thawed(mnt)


@pytest.fixture
def tracker(fs: tuple[Disk, Path]) -> Iterator[TracefsTracker]:
    tracker = TracefsTracker(fs[0])
    tracker.start()
    try:
        yield tracker
    finally:
        tracker.stop()


def write(path: Path, size: int, *, fsync: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        if fsync:
            os.fsync(f.fileno())


def test_is_a_tracker_and_fresh_start_needs_full_resync(tracker: TracefsTracker) -> None:
    assert isinstance(tracker, Tracker)
    assert tracker.needs_resync() == DirtyMap.full(tracker.size)  # no history before start
    assert tracker.needs_resync() is None


def test_written_file_blocks_are_exactly_the_dirty_data_chunks(
    fs: tuple[Disk, Path], tracker: TracefsTracker
) -> None:
    _, mnt = fs
    tracker.needs_resync()
    tracker.drain()
    files = {"a": 3 << 20, "b": 100_000, "c": 4096}
    for name, size in files.items():
        write(mnt / name, size)
    dirty = set(tracker.drain().chunks())
    data = set().union(*(chunks_of(file_extents(mnt / name), tracker.chunk) for name in files))
    assert len(data) >= (3 << 20) // tracker.chunk
    assert data <= dirty
    # The rest is filesystem metadata (journal, inode table, bitmaps, directory): a
    # handful of chunks, not a stray region of the disk.
    assert len(dirty - data) * tracker.chunk <= 8 * CHUNK, sorted(dirty - data)
    stats = tracker.stats()
    assert stats.events > 0 and stats.unparsed == stats.lost_lines == stats.lost_counters == 0
    assert tracker.needs_resync() is None


def test_queue_and_completion_both_mark(fs: tuple[Disk, Path], tracker: TracefsTracker) -> None:
    """Race 1: a chunk is marked again when its write completes. Direct 4 KiB writes
    into an allocated file are one bio and one request each: two events per write."""
    _, mnt = fs
    write(mnt / "f", 1 << 20)
    tracker.drain()
    before = tracker.stats().events
    buffer = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT wants
    buffer.write(os.urandom(4096))
    fd = os.open(mnt / "f", os.O_WRONLY | os.O_DIRECT)
    try:
        for i in range(16):
            os.pwrite(fd, buffer, i * CHUNK)
    finally:
        os.close(fd)
    dirty = set(tracker.drain().chunks())
    written = {device_offset(mnt / "f", i * CHUNK) // tracker.chunk for i in range(16)}
    assert written <= dirty
    assert tracker.stats().events - before >= 2 * 16


def test_on_dirty_fires_once_per_drain_when_writes_come(
    fs: tuple[Disk, Path], tracker: TracefsTracker
) -> None:
    """The reader calls `on_dirty` when the set goes from empty to not empty, once until
    the next drain, and not at all while nothing is written: the agent drains on it
    instead of polling an idle disk."""
    _, mnt = fs
    write(mnt / "f", 1 << 20)
    tracker.drain()
    calls: list[float] = []
    tracker.on_dirty = lambda: calls.append(time.monotonic())
    time.sleep(0.3)
    assert calls == []  # idle: no call
    for round_ in (1, 2):
        for _ in range(3):
            write(mnt / "f", 64 << 10)
        deadline = time.monotonic() + 5.0
        while len(calls) < round_ and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # more writes' events were read meanwhile: still one call
        assert len(calls) == round_, calls
        assert tracker.drain()  # and the drain re-arms it


@pytest.mark.parametrize("barrier", [True, False])
def test_barrier_after_fifreeze_returns_every_write_before_it(
    fs: tuple[Disk, Path], tracker: TracefsTracker, monkeypatch: pytest.MonkeyPatch, barrier: bool
) -> None:
    """Race 2: buffered writes reach the disk in the freeze's own sync, a moment before
    drain. With the marker barrier drain waits for all of their events even from a
    lagging reader; without it (the control case) it returns too early."""
    _, mnt = fs
    slow_reader(monkeypatch)
    tracker.drain()
    names = [f"f{i}" for i in range(40)]
    for name in names:
        write(mnt / name, 200_000, fsync=False)
    with freeze([mnt], timeout=10.0):
        dirty = set(tracker.drain(barrier=barrier).chunks())
        expected = set().union(*(chunks_of(file_extents(mnt / n), tracker.chunk) for n in names))
    assert len(expected) >= 40
    if barrier:
        assert expected <= dirty
    else:
        assert not expected <= dirty, "the control case should have missed late events"


def test_lost_events_turn_into_a_whole_disk_resync(fs: tuple[Disk, Path]) -> None:
    """A 4 KiB ring buffer per CPU and a reader that stalls (as on a CPU-starved host:
    here it blocks on the tracker's lock) during a burst of direct writes: the loss must
    be reported, never silently ignored."""
    disk, mnt = fs
    tracker = TracefsTracker(disk, buffer_size_kb=4)
    tracker.start()
    try:
        assert tracker.needs_resync() is not None
        with tracker._lock:
            subprocess.run(
                [
                    "dd",
                    "if=/dev/zero",
                    f"of={mnt / 'burst'}",
                    "bs=4k",
                    "count=2000",
                    "oflag=direct",
                ],
                check=True,
                capture_output=True,
            )
        dirty = tracker.drain()
        assert dirty  # what did survive is still reported
        assert tracker.needs_resync() == DirtyMap.full(disk.size)
        stats = tracker.stats()
        assert stats.lost_counters + stats.lost_lines > 0
        assert tracker.needs_resync() is None  # reported once, then forgotten
    finally:
        tracker.stop()


def test_stale_instances_removed_live_ones_kept(fs: tuple[Disk, Path]) -> None:
    disk, _ = fs
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(dead.stdout)
    me, started = os.getpid(), process_start_time(os.getpid())
    stale = [
        INSTANCES / f"secondsite-{dead_pid}-123-7_0-1",  # crashed agent
        INSTANCES / f"secondsite-{me}-{(started or 0) + 1}-7_0-1",  # pid reused since
    ]
    unrelated = INSTANCES / "someone-elses"
    for path in [*stale, unrelated]:
        path.mkdir()
    first = TracefsTracker(disk)
    second = TracefsTracker(disk)
    try:
        first.start()
        assert not any(path.exists() for path in stale)
        assert unrelated.exists()
        second.start()  # its stale sweep must leave the live `first` alone
        assert first.instance_path is not None and first.instance_path.exists()
        assert first.instance_path != second.instance_path
    finally:
        first.stop()
        second.stop()
        unrelated.rmdir()
        for path in stale:
            if path.exists():
                path.rmdir()


def test_stop_removes_the_instance_and_is_idempotent(fs: tuple[Disk, Path]) -> None:
    tracker = TracefsTracker(fs[0])
    tracker.start()
    path = tracker.instance_path
    assert path is not None and path.is_dir()
    tracker.stop()
    assert not path.exists()
    tracker.stop()


def test_unusable_tracefs_names_the_fallback(fs: tuple[Disk, Path], tmp_path: Path) -> None:
    tracker = TracefsTracker(fs[0], tracefs=tmp_path / "no-tracefs")
    with pytest.raises(TrackerUnavailable) as caught:
        tracker.start()
    assert caught.value.fallback == "scan"
    assert "falling back to the scan tracker" in caught.value.hint
    assert tracker.instance_path is None


def test_non_root_is_refused_with_the_fallback(fs: tuple[Disk, Path]) -> None:
    disk, _ = fs
    # Everything imported as root first (the interpreter itself may live under a
    # root-only directory), then the privileges dropped before start().
    code = (
        "import os, sys\n"
        "from agent.errors import TrackerUnavailable\n"
        "from agent.trackers.tracefs import TracefsTracker\n"
        "from agent.discovery import discover\n"
        f"disk = [d for d in discover() if str(d.path) == {str(disk.path)!r}][0]\n"
        "tracker = TracefsTracker(disk)\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n    tracker.start()\n"
        "except TrackerUnavailable as err:\n    print(err.message, '|', err.hint); sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 3, result.stderr
    assert "root-only" in result.stdout and "falling back to the scan tracker" in result.stdout


def test_partition_writes_map_to_whole_disk_offsets(tmp_path: Path) -> None:
    """On this kernel the queue event of a bio to a partition already carries the whole
    disk's dev_t and sectors: the filter on the disk sees them, at disk offsets."""
    image = tmp_path / "parted.img"
    with open(image, "wb") as f:
        f.truncate(MIB << 20)
    start = 1 << 20
    subprocess.run(
        ["sfdisk", "-q", str(image)],
        input=f"start={start // 512}, type=83\n",
        text=True,
        check=True,
    )
    device = Path(
        subprocess.run(
            ["losetup", "-f", "--show", "-P", str(image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    mnt = tmp_path / "pmnt"
    mnt.mkdir()
    mounted = False
    try:
        subprocess.run(["partx", "-a", str(device)], capture_output=True, check=False)
        part = Path(f"{device}p1")
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(part)],
            check=True,
        )
        subprocess.run(["mount", str(part), str(mnt)], check=True)
        mounted = True
        with TracefsTracker(find(device)) as tracker:
            tracker.drain()
            write(mnt / "x", 300_000)
            dirty = set(tracker.drain().chunks())
            on_disk = [(start + offset, length) for offset, length in file_extents(mnt / "x")]
            assert chunks_of(on_disk, tracker.chunk) <= dirty
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
        subprocess.run(["losetup", "-d", str(device)], check=True)
