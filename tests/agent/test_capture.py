"""capture_consistent on a real ext4 loop mount with the tracefs tracker: the extents it
returns, applied on a copy of the previous point, reproduce the device as it was while
frozen; when it gives up, what it drained comes back to the caller."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.capture import Capture, Untagged, capture_consistent
from agent.discovery import Disk
from agent.trackers import DirtyMap
from agent.trackers.tracefs import TracefsTracker
from tests.agent.helpers import find
from tests.agent.tracking import chunks_of, ensure_thawed, file_extents, read_direct, slow_reader
from tests.loopfs import loop_ext4

pytestmark = pytest.mark.root
MIB = 32


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[tuple[Disk, Path, TracefsTracker, int]]:
    with loop_ext4(tmp_path, MIB) as (device, mnt):
        disk = find(device)
        tracker = TracefsTracker(disk)
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        try:
            tracker.start()
            assert tracker.needs_resync() is not None  # fresh start; the test's baseline
            yield disk, mnt, tracker, fd
        finally:
            os.close(fd)
            tracker.stop()
            assert not ensure_thawed(mnt)


def churn(mnt: Path, round_: int) -> None:
    """New files, an overwrite in place, a delete, some left for the freeze to flush."""
    for i in range(6):
        with open(mnt / f"r{round_}-{i}", "wb") as f:
            f.write(os.urandom(50_000 * (i + 1)))
            if i % 2:
                os.fsync(f.fileno())
    if round_:
        with open(mnt / f"r{round_ - 1}-0", "r+b") as f:
            f.write(os.urandom(10_000))
        (mnt / f"r{round_ - 1}-1").unlink()


@pytest.mark.parametrize("lagging", [False, True], ids=["reader-keeps-up", "reader-lags"])
def test_extents_applied_on_the_last_point_give_the_frozen_device(
    fs: tuple[Disk, Path, TracefsTracker, int], monkeypatch: pytest.MonkeyPatch, lagging: bool
) -> None:
    disk, mnt, tracker, fd = fs
    if lagging:  # the barrier has to wait for the reader inside the freeze
        slow_reader(monkeypatch, 0.1)
    frozen: list[bytes] = []

    def snapshot() -> None:
        frozen.append(read_direct(disk.path, 0, disk.size))

    first = capture_consistent(tracker, fd, [mnt], timeout=5.0, on_frozen=snapshot)
    assert isinstance(first, Capture)
    replica = bytearray(frozen[-1])  # the replica at the first point
    for round_ in range(3):
        churn(mnt, round_)
        point = capture_consistent(tracker, fd, [mnt], timeout=5.0, on_frozen=snapshot)
        assert isinstance(point, Capture), point
        assert point.freeze_seconds < 5.0
        for offset, data in point.extents:
            assert data == frozen[-1][offset : offset + len(data)]
            replica[offset : offset + len(data)] = data
        assert replica == frozen[-1], f"round {round_}: the point is not the frozen device"
        written = chunks_of(file_extents(mnt / f"r{round_}-5"), tracker.chunk)
        assert written <= set(point.dirty.chunks())


def test_over_budget_gives_up_and_hands_back_the_drained_set(
    fs: tuple[Disk, Path, TracefsTracker, int],
) -> None:
    _, mnt, tracker, fd = fs
    tracker.drain()
    with open(mnt / "big", "wb") as f:
        f.write(os.urandom(4 << 20))
    result = capture_consistent(tracker, fd, [mnt], timeout=5.0, budget=1 << 20)
    assert isinstance(result, Untagged)
    assert "budget" in result.reason and result.resync is None
    assert chunks_of(file_extents(mnt / "big"), tracker.chunk) <= set(result.dirty.chunks())
    assert result.freeze_seconds is not None and result.freeze_seconds < 5.0


def test_a_copy_that_cannot_fit_the_bound_is_not_attempted(
    fs: tuple[Disk, Path, TracefsTracker, int],
) -> None:
    _, mnt, tracker, fd = fs
    with open(mnt / "f", "wb") as f:
        f.write(os.urandom(1 << 20))
    result = capture_consistent(tracker, fd, [mnt], timeout=1.0, read_rate=100_000)
    assert isinstance(result, Untagged) and "overrun the freeze bound" in result.reason
    assert result.dirty


def test_lost_events_mean_no_tag_and_a_resync(fs: tuple[Disk, Path, TracefsTracker, int]) -> None:
    disk, mnt, tracker, fd = fs
    # A tracker that restarted has no history: the same as a loss.
    tracker.stop()
    tracker.start()
    result = capture_consistent(tracker, fd, [mnt], timeout=5.0)
    assert isinstance(result, Untagged)
    assert result.resync == DirtyMap.full(disk.size)


def test_needs_a_direct_descriptor(fs: tuple[Disk, Path, TracefsTracker, int]) -> None:
    disk, mnt, tracker, _ = fs
    buffered = os.open(disk.path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="O_DIRECT"):
            capture_consistent(tracker, buffered, [mnt])
    finally:
        os.close(buffered)
