"""Low-level pieces of the spool's I/O: the space account shared by all streams, a
commit's batch write (chunked, rolling over, taken back on failure), and reading runs
of records back with preadv.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from appliance.process.errors import SpoolCorrupt, SpoolFull
from appliance.process.records import (
    RECORD_HEADER,
    PendingRecord,
    SpoolMessage,
    body_ok,
    decode_body,
    parse_header,
)
from appliance.storage.atomic import fsync_dir
from appliance.storage.faults import FaultPoint, fault_point
from appliance.storage.segments import SEGMENT_HEADER, Segment
from appliance.wire.framing import Buffer

WRITE_CHUNK = 4 << 20  # bytes per pwritev while a commit writes its batch
_IOV_MAX = 1024  # the kernel's limit on buffers per pwritev/preadv


RECENT_BYTES = 32 << 20  # committed records kept in memory for the forwarders, all streams


class SpaceAccount:
    """The spool's bytes on disk plus those promised to pending records, against the
    limit; and the memory that committed records kept for their first read may use
    (``recent_limit``). Shared by all streams of a spool; every method is thread-safe."""

    def __init__(self, limit: int, recent_limit: int = RECENT_BYTES) -> None:
        self.limit = limit
        self.recent_limit = recent_limit
        self._lock = threading.Lock()
        self._disk = 0
        self._pending = 0
        self._recent = 0

    def take_recent(self, nbytes: int) -> bool:
        """Claim ``nbytes`` of the in-memory budget; False (nothing claimed) if over it."""
        with self._lock:
            if self._recent + nbytes > self.recent_limit:
                return False
            self._recent += nbytes
            return True

    def give_recent(self, nbytes: int) -> None:
        with self._lock:
            self._recent -= nbytes

    @property
    def disk(self) -> int:
        return self._disk

    def full(self) -> bool:
        return self._disk >= self.limit

    def reserve(self, nbytes: int, disk_id: str) -> None:
        with self._lock:
            if self._disk + self._pending + nbytes > self.limit:
                raise SpoolFull(
                    f"spool limit of {self.limit} bytes reached ({self._disk} on disk, "
                    f"{self._pending} pending); not appending to {disk_id}"
                )
            self._pending += nbytes

    def settle(self, reserved: int, written: int) -> None:
        """``reserved`` pending bytes are gone; ``written`` bytes landed on disk."""
        with self._lock:
            self._pending -= reserved
            self._disk += written


class ChunkWriter:
    """Writes buffers back to back from ``offset`` in pwritev calls of at most
    WRITE_CHUNK bytes, with a fault point before each (so a crash can tear a record)."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd = fd
        self.start = self.offset = offset
        self._bufs: deque[memoryview] = deque()
        self._queued = 0

    def add(self, buf: Buffer) -> None:
        view = memoryview(buf)
        if view:
            self._bufs.append(view)
            self._queued += len(view)
            while self._queued >= WRITE_CHUNK:
                self._write(WRITE_CHUNK)

    def flush(self) -> None:
        if self._queued:
            self._write(self._queued)

    def sync(self, drop_cache: bool) -> None:
        """fdatasync; then, if ``drop_cache``, let the kernel drop the (now clean) pages
        written: a reader that will not read them back gains nothing from them, and
        fresh page cache is the dearest memory there is in a VM that hands free pages
        back to its host (2-8x the cost of the write itself)."""
        os.fdatasync(self.fd)
        if drop_cache and self.offset > self.start:
            os.posix_fadvise(self.fd, self.start, self.offset - self.start, os.POSIX_FADV_DONTNEED)

    def _write(self, n: int) -> None:
        chunk: list[memoryview] = []
        left = n
        while left:
            head = self._bufs[0]
            if len(head) <= left:
                chunk.append(self._bufs.popleft())
                left -= len(head)
            else:
                chunk.append(head[:left])
                self._bufs[0] = head[left:]
                left = 0
        self._queued -= n
        fault_point(FaultPoint.SPOOL_WRITE)
        while chunk:
            written = os.pwritev(self.fd, chunk[:_IOV_MAX], self.offset)
            self.offset += written
            while chunk and written >= len(chunk[0]):
                written -= len(chunk.pop(0))
            if written:
                chunk[0] = chunk[0][written:]


@dataclass
class Fresh:
    """A segment a commit created by rolling over, not yet published."""

    segment: Segment
    fd: int
    first_seq: int


def write_batch(
    active: Segment, fd: int, end: int, batch: list[PendingRecord], *,
    segment_bytes: int, create: Callable[[int], Segment], drop_cache: bool = False,
) -> tuple[int, list[Fresh], int]:  # fmt: skip
    """Write ``batch`` at log position ``end`` (the end of ``active``, open as ``fd``),
    rolling over to segments made by ``create`` as needed, and fdatasync (dropping the
    pages written from the page cache if ``drop_cache``: the caller keeps the records).

    Returns the active segment's new length, the segments created, the new end. On any
    error everything written is taken back (see _cut_back) and the error re-raised.
    """
    active_length = length = active.length
    pos = end
    fresh: list[Fresh] = []
    writer = ChunkWriter(fd, SEGMENT_HEADER.size + length)
    try:
        for rec in batch:
            if length and length + rec.size > segment_bytes:
                writer.flush()
                writer.sync(drop_cache)  # every segment but the last is whole and synced
                fault_point(FaultPoint.SPOOL_ROLLOVER)
                if fresh:
                    fresh[-1].segment.length = length
                else:
                    active_length = length
                fresh.append(Fresh(create(pos), -1, rec.seq))
                fresh[-1].fd = os.open(fresh[-1].segment.path, os.O_WRONLY | os.O_CLOEXEC)
                writer = ChunkWriter(fresh[-1].fd, SEGMENT_HEADER.size)
                length = 0
            writer.add(rec.header(pos))
            for part in rec.parts:
                writer.add(part)
            pos += rec.size
            length += rec.size
        writer.flush()
        fault_point(FaultPoint.SPOOL_WRITTEN)
        writer.sync(drop_cache)
        fault_point(FaultPoint.SPOOL_SYNCED)
    except BaseException:
        _cut_back(active, fd, fresh)
        raise
    if fresh:
        fresh[-1].segment.length = length
    else:
        active_length = length
    return active_length, fresh, pos


def _cut_back(active: Segment, fd: int, fresh: list[Fresh]) -> None:
    """Undo an unpublished write: new segments go (newest first, and for good before
    the old tail is cut, so the chain of segments holds at every step), then the
    active segment is cut to its published length."""
    for f in reversed(fresh):
        if f.fd >= 0:
            os.close(f.fd)
        f.segment.path.unlink(missing_ok=True)
    if fresh:
        fsync_dir(active.path.parent)
    os.ftruncate(fd, SEGMENT_HEADER.size + active.length)
    os.fsync(fd)


def preadv_all(fd: int, bufs: list[bytearray], offset: int) -> int:
    """Fill ``bufs`` from ``offset`` on; returns the bytes read (fewer only at EOF)."""
    views = [memoryview(b) for b in bufs]
    total = 0
    while views:
        n = os.preadv(fd, views[:_IOV_MAX], offset + total)
        if n == 0:
            break
        total += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    return total


def read_run(
    segment: Segment, first_seq: int, positions: list[int], sizes: list[int], disk_id: str
) -> tuple[list[SpoolMessage], SpoolCorrupt | None]:
    """Read consecutive records of one segment (one preadv per batch of them) and verify
    them. Returns those read, and the damage that stopped it early, if any."""
    out: list[SpoolMessage] = []
    try:
        fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return out, SpoolCorrupt(f"{segment.path} is missing", first_seq)
    try:
        for k in range(0, len(positions), _IOV_MAX // 2):
            pos, size = positions[k : k + _IOV_MAX // 2], sizes[k : k + _IOV_MAX // 2]
            bufs: list[bytearray] = []
            for n in size:
                body_len = max(0, n - RECORD_HEADER.size)
                bufs += [bytearray(RECORD_HEADER.size), bytearray(body_len)]
            offset = SEGMENT_HEADER.size + pos[0] - segment.start
            got = preadv_all(fd, bufs, offset)
            # Read once on the way out (a resend comes from the sender's window): the
            # pages may go, and the next commit's writes reuse them.
            if got:
                os.posix_fadvise(fd, offset, got, os.POSIX_FADV_DONTNEED)
            for j in range(len(pos)):
                seq = first_seq + k + j
                head, body = bufs[2 * j], bufs[2 * j + 1]
                whole = got >= pos[j] + size[j] - pos[0]
                header = parse_header(head, pos[j]) if whole else None
                if header is None or header.seq != seq or header.size != size[j]:
                    return out, SpoolCorrupt(f"stream {disk_id}: damaged record header", seq)
                if not body_ok(head, body):
                    return out, SpoolCorrupt(f"stream {disk_id}: record CRC mismatch", seq)
                try:
                    out.append(decode_body(header, body, disk_id))
                except SpoolCorrupt as exc:
                    return out, exc
    finally:
        os.close(fd)
    return out, None
