"""The per-disk undo journal: old contents of replica blocks, written before they change.

On-disk format, directory ``<state>/journal/<disk_id>/``::

    <start_lsn:016x>.undo      one segment; segments chain without gaps or overlaps

    segment  = SEGMENT_HEADER record*
    SEGMENT_HEADER             see appliance.storage.segments: magic b"SSUNDOSG",
                               version 1, start = LSN of its first record, owner = disk id

    record   = RECORD_HEADER stored_bytes
    RECORD_HEADER (48 bytes, little endian)
        magic        u32  0x554E444F ("ODNU" on disk)
        kind         u8   RecordKind.UNDO
        encoding     u8   Encoding: RAW 0, ZSTD 1, ZEROS 2 (no stored bytes)
        reserved     u16  0
        lsn          u64  this record's own LSN (lets a scan resynchronise after damage)
        seq          u64  sequence number of the write that overwrote these bytes
        offset       u64  byte offset on the replica disk
        raw_len      u32  length of the old contents (<= MAX_RECORD)
        stored_len   u32  bytes that follow the header
        crc          u32  CRC-32C over the stored bytes, continued over the 40 header
                          bytes before it (so workers can checksum before the LSN is known)
        hcrc         u32  CRC-32C over the 44 header bytes before it (header-only checks)

An LSN is the position of a record byte in the concatenation of all segments' record
areas (headers excluded): a record at LSN ``l`` in the segment starting at ``s`` is at
file offset ``88 + l - s``. LSNs only grow; :meth:`Journal.truncate` cuts the end back.
A record holds what ``[offset, offset + raw_len)`` contained just before the batch with
write ``seq`` changed it; the disk at LSN ``l`` is the replica with every record at or
after ``l`` restored, newest first (see :mod:`points`).

A segment rolls over when the next record would take it past ``segment_bytes`` (a
record larger than that gets a segment of its own).

Durability: a batch of records is written and fdatasync'ed once, and only then does
:attr:`Journal.end_lsn` move (readers never see unsynced records). A segment is
fdatasync'ed before the next one is created (atomic_write), so every segment but the
last is complete. On open, the last segment is scanned and a torn or corrupt tail after
the last good record is cut, unless it lies below ``durable_lsn`` (the last committed
checkpoint, known to have been synced): damage there is mid-journal corruption, which is
skipped and left for :meth:`Journal.scan_corruption` to report.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from appliance.checksum import crc32c
from appliance.storage.atomic import fsync_dir
from appliance.storage.compress import compress, decompress
from appliance.storage.faults import FaultPoint, fault_point
from appliance.storage.fileio import pwritev_all
from appliance.storage.segments import (
    SEGMENT_HEADER,
    Segment,
    SegmentCorrupt,
    SegmentReader,
    create_segment,
    cut_segment,
    load_segments,
)
from appliance.target.errors import JournalCorrupt

SEGMENT_MAGIC = b"SSUNDOSG"
SEGMENT_VERSION = 1
RECORD_MAGIC = 0x554E444F
RECORD_HEADER = struct.Struct("<IBBHQQQIIII")
assert RECORD_HEADER.size == 48
_CRC_AT = 40  # header bytes covered by crc (before the crc field)
_HCRC_AT = 44  # header bytes covered by hcrc
MAX_RECORD = 1 << 20  # larger extents are split, bounding memory when reading back
SUFFIX = ".undo"
_WRITE_CHUNK = 4 << 20  # bytes gathered per pwritev while records stream in
_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
_ZEROS = bytes(MAX_RECORD)


class RecordKind(IntEnum):
    UNDO = 1


class Encoding(IntEnum):
    RAW = 0
    ZSTD = 1
    ZEROS = 2


@dataclass(frozen=True, slots=True)
class PendingRecord:
    """An encoded undo record that has no LSN yet; ``crc`` is CRC-32C of ``stored``."""

    seq: int
    offset: int
    raw_len: int
    encoding: Encoding
    stored: bytes
    crc: int


@dataclass(frozen=True, slots=True)
class UndoRecord:
    """A record read back from the journal (its CRC already checked)."""

    lsn: int
    seq: int
    offset: int
    length: int
    encoding: Encoding
    stored: bytes

    @property
    def end_lsn(self) -> int:
        return self.lsn + RECORD_HEADER.size + len(self.stored)

    def data(self) -> bytes:
        """The old contents, decoded."""
        if self.encoding is Encoding.ZEROS:
            return _ZEROS[: self.length] if self.length <= MAX_RECORD else bytes(self.length)
        if self.encoding is Encoding.RAW:
            return self.stored
        try:
            return decompress(self.stored, self.length)
        except ValueError as exc:  # the CRC matched, so this was written wrong: corrupt
            raise JournalCorrupt(f"undo record: {exc}", self.lsn) from exc


def encode(seq: int, offset: int, old: bytes, level: int) -> list[PendingRecord]:
    """Undo records (at most MAX_RECORD each) for ``old``, the contents at ``offset``.

    Thread-safe; zstd and CRC-32C release the GIL, so several threads encode in parallel.
    """
    out: list[PendingRecord] = []
    for pos in range(0, len(old), MAX_RECORD):
        # bytes slices and == are memcpy/memcmp; memoryview == is ~30x slower.
        piece = old if len(old) <= MAX_RECORD else old[pos : pos + MAX_RECORD]
        n = len(piece)
        if piece == (_ZEROS if n == MAX_RECORD else _ZEROS[:n]):
            out.append(PendingRecord(seq, offset + pos, n, Encoding.ZEROS, b"", 0))
            continue
        packed = compress(piece, level)
        if packed is not None:
            out.append(PendingRecord(seq, offset + pos, n, Encoding.ZSTD, packed, crc32c(packed)))
        else:
            out.append(PendingRecord(seq, offset + pos, n, Encoding.RAW, piece, crc32c(piece)))
    return out


def encode_zeros(seq: int, offset: int, length: int) -> list[PendingRecord]:
    """Undo records for ``length`` bytes at ``offset`` known to read as zeros (a hole):
    what ``encode`` makes of zeros, without reading or comparing them."""
    return [
        PendingRecord(seq, offset + pos, min(MAX_RECORD, length - pos), Encoding.ZEROS, b"", 0)
        for pos in range(0, length, MAX_RECORD)
    ]


def _pack_header(rec: PendingRecord, lsn: int) -> bytes:
    head = RECORD_HEADER.pack(
        RECORD_MAGIC, RecordKind.UNDO, rec.encoding, 0, lsn, rec.seq, rec.offset,
        rec.raw_len, len(rec.stored), 0, 0,
    )  # fmt: skip
    crc = crc32c(memoryview(head)[:_CRC_AT], rec.crc)
    head = head[:_CRC_AT] + struct.pack("<I", crc)
    return head + struct.pack("<I", crc32c(head))


def _parse_header(buf: bytes | memoryview, lsn: int) -> tuple[int, ...] | None:
    """Header fields if ``buf`` holds a plausible header for position ``lsn``, else None."""
    if len(buf) < RECORD_HEADER.size:
        return None
    fields = RECORD_HEADER.unpack_from(buf)
    magic, kind, encoding, _, rec_lsn, _, _, raw_len, stored_len, _, hcrc = fields
    if magic != RECORD_MAGIC or rec_lsn != lsn or crc32c(buf[:_HCRC_AT]) != hcrc:
        return None
    if kind != RecordKind.UNDO or encoding not in (0, 1, 2) or raw_len > MAX_RECORD:
        return None
    if (encoding == Encoding.ZEROS and stored_len) or (
        encoding == Encoding.RAW and stored_len != raw_len
    ):
        return None
    return fields


def _read_record(reader: SegmentReader, lsn: int, limit: int) -> UndoRecord | None:
    """The valid record at ``lsn`` (ending by ``limit``), or None if damaged or torn."""
    head = reader.get(lsn, RECORD_HEADER.size, limit)
    fields = _parse_header(head, lsn)
    if fields is None:
        return None
    _, _, encoding, _, _, seq, offset, raw_len, stored_len, crc, _ = fields
    if lsn + RECORD_HEADER.size + stored_len > limit:
        return None
    stored = bytes(reader.get(lsn + RECORD_HEADER.size, stored_len, limit))
    if len(stored) != stored_len or crc32c(head[:_CRC_AT], crc32c(stored)) != crc:
        return None
    return UndoRecord(lsn, seq, offset, raw_len, Encoding(encoding), stored)


def _resync(reader: SegmentReader, lsn: int, limit: int) -> int | None:
    """The next LSN after ``lsn`` where a valid record starts, if any (its header holds
    its own LSN, so a stray magic number in data is not mistaken for one)."""
    return reader.find(
        _MAGIC_BYTES, lsn + 1, limit, lambda pos: _read_record(reader, pos, limit) is not None
    )


class Journal:
    """One disk's undo journal (format in the module docstring).

    Appends (the disk's writer thread) and truncation (with the writer idle) never
    overlap; any thread may read, pin and drop old segments. Pinned records are never
    dropped and truncation waits until no pin is held.
    """

    def __init__(
        self, directory: Path, disk_id: str, *, segment_bytes: int, durable_lsn: int = 0
    ) -> None:
        self.directory = directory
        self.disk_id = disk_id
        self.segment_bytes = segment_bytes
        self._lock = threading.Condition()
        self._pins: dict[int, int] = {}
        self._next_pin = 0
        self._exclusive = False
        self._wfd = -1
        if not directory.is_dir():
            directory.mkdir(parents=True)
            fsync_dir(directory.parent)  # the new directory itself must survive a crash
        self._segments = self._load(durable_lsn)
        self._end = self._segments[-1].end
        self._open_active()

    # -- opening ---------------------------------------------------------------------

    def _load(self, durable_lsn: int) -> list[Segment]:
        try:
            segments = load_segments(
                self.directory, magic=SEGMENT_MAGIC, version=SEGMENT_VERSION, suffix=SUFFIX
            )
        except SegmentCorrupt as exc:
            raise JournalCorrupt(f"journal of {self.disk_id}: {exc}", exc.position) from exc
        if not segments:
            return [self._create_segment(durable_lsn)]
        last = segments[-1]
        end = self._scan_tail(last, durable_lsn)
        if end < last.end:
            cut_segment(last, end - last.start)
        if last.end < durable_lsn:
            raise JournalCorrupt(f"journal of {self.disk_id} ends before its checkpoint", last.end)
        return segments

    @staticmethod
    def _scan_tail(seg: Segment, durable_lsn: int) -> int:
        """Where the valid records of the last segment end."""
        with SegmentReader(seg) as reader:
            limit = seg.end
            pos = seg.start
            while pos < limit:
                rec = _read_record(reader, pos, limit)
                if rec is not None:
                    pos = rec.end_lsn
                    continue
                if pos >= durable_lsn:
                    break  # the torn tail of a batch that never became durable
                # Damage below the checkpoint: those bytes were synced, so it is rot, not
                # a torn write. Skip to the next record; the checkpoint is a boundary.
                nxt = _resync(reader, pos, limit)
                pos = durable_lsn if nxt is None or nxt > durable_lsn else nxt
        return min(pos, seg.end)

    def _create_segment(self, start: int) -> Segment:
        return create_segment(
            self.directory, start, magic=SEGMENT_MAGIC, version=SEGMENT_VERSION,
            owner=self.disk_id, suffix=SUFFIX,
        )  # fmt: skip

    def _open_active(self) -> None:
        if self._wfd >= 0:
            os.close(self._wfd)
        self._wfd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1

    # -- properties ------------------------------------------------------------------

    @property
    def start_lsn(self) -> int:
        with self._lock:
            return self._segments[0].start

    @property
    def end_lsn(self) -> int:
        """End of the durable records; readers never look past it."""
        return self._end

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(SEGMENT_HEADER.size + s.length for s in self._segments)

    def segment_bounds(self) -> list[tuple[int, int]]:
        """``(start, end)`` LSNs of each segment, oldest first."""
        with self._lock:
            return [(s.start, s.end) for s in self._segments]

    # -- appending -------------------------------------------------------------------

    def append(self, records: Iterable[PendingRecord]) -> int:
        """Write ``records``, fdatasync once, publish them; returns the new end LSN.

        ``records`` may be a generator still producing them: they are written as they
        come, in chunks. On any error the journal is cut back to where it was and the
        error re-raised, so a failed append leaves nothing behind.
        """
        old_end = self._end
        old_active = self._segments[-1]
        pos = old_end
        try:
            active = old_active
            buffers: list[bytes] = []
            pending = 0
            file_pos = SEGMENT_HEADER.size + active.length
            for rec in records:
                step = RECORD_HEADER.size + len(rec.stored)
                if active.length and active.length + step > self.segment_bytes:
                    self._write(buffers, file_pos)
                    active = self._roll_over(pos)
                    buffers, pending, file_pos = [], 0, SEGMENT_HEADER.size
                elif pending >= _WRITE_CHUNK:
                    self._write(buffers, file_pos)
                    buffers, file_pos, pending = [], file_pos + pending, 0
                buffers.append(_pack_header(rec, pos))
                if rec.stored:
                    buffers.append(rec.stored)
                pending += step
                pos += step
                active.length += step  # not visible to readers until _end moves
            self._write(buffers, file_pos)
            fault_point(FaultPoint.JOURNAL_WRITTEN)
            os.fdatasync(self._wfd)
        except BaseException:
            self._cut_back(old_end, old_active)
            raise
        self._end = pos
        return pos

    def _roll_over(self, start: int) -> Segment:
        """Seal the full active segment (synced) and start a new one at ``start``."""
        os.fdatasync(self._wfd)
        fault_point(FaultPoint.JOURNAL_ROLLOVER)
        fresh = self._create_segment(start)
        with self._lock:
            self._segments.append(fresh)
        self._open_active()
        return fresh

    def _write(self, buffers: list[bytes], file_pos: int) -> None:
        fault_point(FaultPoint.JOURNAL_WRITE)
        pwritev_all(self._wfd, buffers, file_pos)

    def _cut_back(self, end: int, old_active: Segment) -> None:
        """Undo an unpublished append: drop new segments, cut the old active one."""
        with self._lock:
            while self._segments[-1] is not old_active:
                self._segments.pop().path.unlink(missing_ok=True)
            active = self._segments[-1]
            active.length = end - active.start
        self._open_active()
        os.ftruncate(self._wfd, SEGMENT_HEADER.size + active.length)

    # -- reading ---------------------------------------------------------------------

    def read(self, from_lsn: int, to_lsn: int | None = None) -> Iterator[UndoRecord]:
        """Records in ``[from_lsn, to_lsn)`` oldest first (``from_lsn`` on a boundary).

        Raises JournalCorrupt at the first damaged record. The caller pins the range
        if segments might be dropped meanwhile.
        """
        to_lsn = self._end if to_lsn is None else min(to_lsn, self._end)
        with self._lock:
            segments = [s for s in self._segments if s.end > from_lsn and s.start < to_lsn]
            if from_lsn < self._segments[0].start:
                raise JournalCorrupt("records before the journal start were dropped", from_lsn)
        pos = from_lsn
        for seg in segments:
            with SegmentReader(seg) as reader:
                limit = min(seg.end, to_lsn)
                while pos < limit:
                    rec = _read_record(reader, pos, limit)
                    if rec is None:
                        raise JournalCorrupt(f"damaged undo record in {seg.path}", pos)
                    yield rec
                    pos = rec.end_lsn

    def scan_corruption(self, to_lsn: int | None = None) -> list[int]:
        """LSNs of every damaged record before ``to_lsn`` (default: the end)."""
        end = self._end if to_lsn is None else to_lsn
        damaged: list[int] = []
        with self._lock:
            segments = [Segment(s.start, s.path, s.length) for s in self._segments]
        for seg in [s for s in segments if s.start < end]:
            with SegmentReader(seg) as reader:
                limit = min(seg.end, end)
                pos = seg.start
                while pos < limit:
                    rec = _read_record(reader, pos, limit)
                    if rec is not None:
                        pos = rec.end_lsn
                        continue
                    damaged.append(pos)
                    nxt = _resync(reader, pos, limit)
                    pos = limit if nxt is None else nxt
        return damaged

    def verify(self) -> int | None:
        """The LSN of the first damaged record, or None if every CRC checks out."""
        damaged = self.scan_corruption()
        return damaged[0] if damaged else None

    # -- pins, truncation, retention ---------------------------------------------------

    def pin(self, lsn: int | None = None) -> int:
        """Keep every record from ``lsn`` (default: the start) on: no drop, no
        truncation. Returns a token for :meth:`unpin`. Waits while someone holds
        :meth:`exclusive`.
        """
        with self._lock:
            self._lock.wait_for(lambda: not self._exclusive)
            if lsn is None:
                lsn = self._segments[0].start
            if lsn < self._segments[0].start:
                raise JournalCorrupt("records before the journal start were dropped", lsn)
            self._next_pin += 1
            self._pins[self._next_pin] = lsn
            return self._next_pin

    def unpin(self, token: int) -> None:
        with self._lock:
            del self._pins[token]
            self._lock.notify_all()

    def pin_floor(self) -> int | None:
        """The lowest pinned LSN, if any pin is held."""
        with self._lock:
            return min(self._pins.values(), default=None)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Wait until no pin is held and keep new pins out for the duration.

        Rolling the replica back (crash recovery, failover) must not run while a
        materialisation copies the replica and reads the records it would cut.
        """
        with self._lock:
            self._lock.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._lock.wait_for(lambda: not self._pins)
        try:
            yield
        finally:
            with self._lock:
                self._exclusive = False
                self._lock.notify_all()

    def truncate(self, after_lsn: int) -> None:
        """Cut the journal back so it ends at ``after_lsn`` (a record boundary).

        Waits while a pin is held: a materialisation in progress needs the records.
        """
        fault_point(FaultPoint.JOURNAL_TRUNCATE)
        with self._lock:
            self._lock.wait_for(lambda: not self._pins)
            if not self._segments[0].start <= after_lsn <= self._end:
                raise ValueError(
                    f"cannot truncate at {after_lsn}: journal spans "
                    f"[{self._segments[0].start}, {self._end})"
                )
            # Newest first: a crash half-way leaves a journal that is merely too long,
            # and recovery rolls back the extra records again (idempotent).
            while len(self._segments) > 1 and self._segments[-1].start >= after_lsn:
                self._segments.pop().path.unlink()
            active = self._segments[-1]
            active.length = after_lsn - active.start
            self._end = after_lsn
            self._open_active()
            os.ftruncate(self._wfd, SEGMENT_HEADER.size + active.length)
            os.fsync(self._wfd)
        fsync_dir(self.directory)

    def drop_before(self, lsn: int) -> int:
        """Delete whole segments ending at or before ``lsn`` (never the active one, never
        pinned records); returns the bytes freed. The new start is :attr:`start_lsn`.
        """
        freed = 0
        with self._lock:
            limit = min([lsn, *self._pins.values()])
            doomed: list[Segment] = []
            while len(self._segments) > 1 and self._segments[0].end <= limit:
                doomed.append(self._segments.pop(0))
        # Oldest first: a crash half-way leaves a journal that starts later, still whole.
        for seg in doomed:
            seg.path.unlink()
            freed += SEGMENT_HEADER.size + seg.length
        if doomed:
            fsync_dir(self.directory)
        return freed
