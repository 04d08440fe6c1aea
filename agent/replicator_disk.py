"""One disk's share of the replicator: its state, counters and ACK bookkeeping.

Kept apart from the loop in `agent.replicator` so that file stays about control flow.
Everything here runs on the event loop thread except `close`, `live_drain` and the
reads through `reader` (called via asyncio.to_thread, one at a time per disk).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.digest import DeviceReader
from agent.discovery import Disk
from agent.errors import DeviceResized
from agent.extents import pread_extents
from agent.state import DiskState
from agent.trackers.base import DirtyMap, Tracker
from agent.trackers.tracefs import TracefsTracker


class AckRelay:
    """The StreamSender's `on_ack` (build it with `on_ack=relay`), handed to the
    Replicator afterwards: breaks the sender <-> replicator construction cycle, and
    remembers which disks the receiver has opened (their first ACK is DISK_OPENED's
    durable sequence)."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.listener: Callable[[str, int], None] | None = None

    def __call__(self, disk_id: str, seq: int) -> None:
        self.seen[disk_id] = seq
        if self.listener is not None:
            self.listener(disk_id, seq)


@dataclass(frozen=True)
class Progress:
    """Initial replication of one disk."""

    percent: float  # of the disk durably copied (acknowledged)
    read_bytes: int  # how far the copy has read
    total_bytes: int
    sent_bytes: int  # payload bytes submitted by this run (initial + deltas)
    eta_seconds: float | None  # at this run's read rate; None until measurable
    done: bool


def split(offset: int, length: int, piece: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most `piece` bytes covering [offset, offset+length)."""
    end = offset + length
    while offset < end:
        size = min(piece, end - offset)
        yield offset, size
        offset += size


def batches(
    extents: Iterable[tuple[int, int]], piece: int, limit: int
) -> Iterator[list[tuple[int, int]]]:
    """`extents` split into pieces of at most `piece` bytes, grouped into lists of at
    most `limit` bytes (at least one piece each), in order."""
    batch: list[tuple[int, int]] = []
    total = 0
    for offset, length in extents:
        for at, size in split(offset, length, piece):
            if batch and total + size > limit:
                yield batch
                batch, total = [], 0
            batch.append((at, size))
            total += size
    if batch:
        yield batch


class DiskRun:
    def __init__(self, disk: Disk, disk_id: str, state: DiskState) -> None:
        self.disk = disk
        self.disk_id = disk_id
        self.state = state
        self.tracker: Tracker | None = None
        self.reader: DeviceReader | None = None
        self.fd = -1  # O_DIRECT, for the capture
        self.seq = 0  # last sequence number submitted
        self.unsaved = False
        self.read_offset = state.initial_offset
        self.resumed_from = state.initial_offset
        self.copy_started: float | None = None
        self.copy_read = 0
        self.bytes_sent = 0
        self._inflight: deque[tuple[int, int]] = deque()  # (seq, initial offset it completes)
        self._read_done = False
        self.gap: DirtyMap | None = None  # lost by a restart: resync before the first tag
        self._pending: DirtyMap | None = None  # to re-send with the next live drain
        self.resent_chunks = 0
        self.resync_checked = 0
        self.tags: dict[str, int] = {}
        self.last_tag: tuple[str, int, float] | None = None  # id, time_ns, freeze seconds
        self.untagged_rounds = 0
        self.last_untagged_reason: str | None = None

    # -- resources ---------------------------------------------------------------

    def open_device(self, read_size: int) -> None:
        self.reader = DeviceReader(self.disk.path, self.disk.size, read_size)
        self.fd = os.open(self.disk.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)

    def read_extents(self, extents: list[tuple[int, int]]) -> memoryview:
        """The device's bytes of each (offset, length), read now, back to back in one
        buffer, several reads at once (`agent.extents`) through the O_DIRECT descriptor
        (worker thread). The buffer is not copied: messages send slices of it, and it
        is unmapped once the last of them is dropped (acknowledged)."""
        total = sum(length for _, length in extents)
        buffer = mmap.mmap(-1, max(total, 1))
        view = memoryview(buffer)[:total]
        reason = pread_extents(self.fd, extents, view)
        if reason is not None:
            view.release()
            buffer.close()
            raise DeviceResized(str(self.disk.path), self.disk.size,
                                os.lseek(self.fd, 0, os.SEEK_END))  # fmt: skip
        return view

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.stop()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- initial copy bookkeeping ------------------------------------------------

    def initial_frame(self, seq: int, end: int) -> None:
        self._inflight.append((seq, end))

    def skipped(self, end: int) -> None:
        """A zero piece ending at `end` was not sent: it is done when what precedes is."""
        if self._inflight:
            seq, _ = self._inflight[-1]
            self._inflight[-1] = (seq, end)
        else:
            self.state.initial_offset = end
            self.unsaved = True

    def read_done(self) -> None:
        self._read_done = True
        self._settle()

    def acked(self, seq: int) -> None:
        if seq <= self.state.acked_seq:
            return
        self.state.acked_seq = seq
        while self._inflight and self._inflight[0][0] <= seq:
            self.state.initial_offset = self._inflight.popleft()[1]
        self._settle()
        self.unsaved = True

    def _settle(self) -> None:
        if self._read_done and not self._inflight and not self.state.initial_done:
            self.state.initial_offset = self.state.size
            self.state.initial_done = True
            self.unsaved = True

    def add_gap(self, lost: DirtyMap, done: int) -> None:
        """The chunks of `lost` below `done` (already copied by an earlier run)."""
        gap = DirtyMap(lost.size, lost.chunk)
        for offset, length in lost.extents():
            if offset < done:
                gap.mark(offset, min(length, done - offset))
        self.gap = gap

    # -- deltas ------------------------------------------------------------------

    def live_drain(self) -> DirtyMap | None:
        """A barrier-free drain where the tracker has one (tracefs); others wait for tags
        (a scan tracker's drain is a full read: once per tag is plenty)."""
        if isinstance(self.tracker, TracefsTracker):
            return self.tracker.drain(barrier=False)
        return None

    def pending_merge(self, dirty: DirtyMap) -> None:
        if self._pending is None:
            self._pending = dirty.copy()
        elif (self._pending.size, self._pending.chunk) == (dirty.size, dirty.chunk):
            self._pending.merge(dirty)
        else:  # a different granularity: mark byte ranges
            for offset, length in dirty.extents():
                self._pending.mark(offset, length)

    def take_pending(self, dirty: DirtyMap | None) -> DirtyMap | None:
        if self._pending is None:
            return dirty
        if dirty is not None:
            self.pending_merge(dirty)
        taken, self._pending = self._pending, None
        return taken

    def tagged(self, tag_id: str, seq: int, time_ns: int, freeze_seconds: float) -> None:
        self.tags[tag_id] = seq
        self.last_tag = (tag_id, time_ns, freeze_seconds)

    def untagged(self, reason: str) -> None:
        self.untagged_rounds += 1
        self.last_untagged_reason = reason

    # -- reporting ---------------------------------------------------------------

    def progress(self) -> Progress:
        size = self.state.size
        eta = None
        if self.state.initial_done:
            eta = 0.0
        elif self.copy_started is not None and self.copy_read:
            rate = self.copy_read / max(time.monotonic() - self.copy_started, 1e-6)
            eta = (size - self.read_offset) / rate
        return Progress(
            percent=self.state.initial_percent,
            read_bytes=self.read_offset,
            total_bytes=size,
            sent_bytes=self.bytes_sent,
            eta_seconds=eta,
            done=self.state.initial_done,
        )

    def status(self) -> dict[str, Any]:
        tag_id, tag_ns, freeze = self.last_tag if self.last_tag else (None, None, None)
        return {
            "device": str(self.disk.path),
            "size": self.state.size,
            "tracker": self.tracker.name if self.tracker is not None else None,
            "initial": dataclasses.asdict(self.progress()),
            "durable_offset": self.state.initial_offset,
            "resumed_from": self.resumed_from,
            "bytes_sent": self.bytes_sent,
            "submitted_seq": self.seq,
            "acked_seq": self.state.acked_seq,
            "last_tag_id": tag_id,
            "last_tag_time": None if tag_ns is None else tag_ns / 1e9,
            "last_freeze_seconds": freeze,
            "tags": len(self.tags),
            "untagged_rounds": self.untagged_rounds,
            "last_untagged_reason": self.last_untagged_reason,
            "resent_chunks": self.resent_chunks,
            "resync_checked_chunks": self.resync_checked,
        }
