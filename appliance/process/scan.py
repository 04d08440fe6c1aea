"""Recovery scan of one stream's segments when the spool opens.

Every segment but the last was fdatasync'ed before the next one was created, so any bad
byte in it is damage to durable data. Their records are walked by header only (the
header has its own CRC; payload CRCs are checked when :meth:`SpoolStream.read` reads
them), which keeps a restart with gigabytes spooled fast. The last segment may end in
records that were never synced: it is verified in full, and a bad record with no intact
record after it is the torn tail of an unfinished commit, to be cut. A bad record that
*is* followed by an intact one is corruption, because a torn write only ever loses the
end of the file (kill -9 leaves the page cache whole; rot or a lost sector can hit
anywhere, and then acknowledged data may be gone, so it is reported, not cut).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.process.records import (
    MAGIC_BYTES,
    RECORD_HEADER,
    RecordHeader,
    RecordIndex,
    body_ok,
    parse_header,
)
from appliance.storage.segments import SEGMENT_HEADER, Segment, SegmentReader

_HEADER_WINDOW = 64 << 10  # read-ahead while walking headers: many small records per read
_BODY_WINDOW = 4 << 20


@dataclass
class StreamScan:
    index: RecordIndex
    seg_first: list[int]  # seq of the first record of each segment (next seq if empty)
    cut_to: int | None = None  # valid length of the last segment when its tail is torn
    damage: list[tuple[int, int]] = field(default_factory=list)  # seq ranges, inclusive


class _Window:
    """Positional reads of one segment through a read-ahead buffer."""

    def __init__(self, fd: int, segment: Segment, ahead: int) -> None:
        self.fd = fd
        self.segment = segment
        self.ahead = ahead
        self._buf = b""
        self._at = 0

    def get(self, pos: int, n: int) -> memoryview:
        n = max(0, min(n, self.segment.end - pos))
        if not (self._at <= pos and pos + n <= self._at + len(self._buf)):
            want = min(max(n, self.ahead), self.segment.end - pos)
            self._buf = os.pread(self.fd, want, SEGMENT_HEADER.size + pos - self.segment.start)
            self._at = pos
        return memoryview(self._buf)[pos - self._at : pos - self._at + n]


def _valid_at(window: _Window, pos: int, verify: bool) -> RecordHeader | None:
    head = window.get(pos, RECORD_HEADER.size)
    header = parse_header(head, pos)
    if header is None or header.end > window.segment.end:
        return None
    if verify:
        # (head stays valid: a view keeps the buffer it came from alive)
        body = window.get(pos + RECORD_HEADER.size, header.body_len)
        if len(body) != header.body_len or not body_ok(head, body):
            return None
    return header


def _resync(
    segment: Segment, pos: int, verify: bool, accept: Callable[[RecordHeader], bool]
) -> int | None:
    """The next position after ``pos`` where an intact record starts that ``accept``
    takes (its header names its own position, so payload bytes that happen to look
    like a header are not mistaken for one)."""
    fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        window = _Window(fd, segment, _BODY_WINDOW)

        def ok(at: int) -> bool:
            header = _valid_at(window, at, verify)
            return header is not None and accept(header)

        with SegmentReader(segment) as reader:
            return reader.find(MAGIC_BYTES, pos + 1, segment.end, ok)
    finally:
        os.close(fd)


def _at_least(floor: int) -> Callable[[RecordHeader], bool]:
    return lambda header: header.seq >= floor


def scan_stream(segments: list[Segment], target_acked_seq: int) -> StreamScan:
    """Index the records of ``segments`` (oldest first, already checked to chain)."""
    index: RecordIndex | None = None
    seg_first: list[int] = []
    damage: list[tuple[int, int]] = []
    next_seq: int | None = None  # unknown until the first intact record
    bad = False  # bad bytes since the last intact record
    cut_to: int | None = None

    def take(header: RecordHeader) -> None:
        nonlocal index, next_seq, bad
        if index is None:
            index = RecordIndex(header.seq)
            # Damage before the first intact record matters only above the target's ack.
            if bad and header.seq > target_acked_seq + 1:
                damage.append((target_acked_seq + 1, header.seq - 1))
        elif next_seq is not None and header.seq > next_seq:
            damage.append((next_seq, header.seq - 1))
            for _ in range(next_seq, header.seq):  # keep seq = base + i; never readable
                index.add(header.pos, 0, 0, header.received_ns)
        index.add(header.pos, header.size, header.payload_len, header.received_ns)
        next_seq = header.seq + 1
        bad = False

    for k, seg in enumerate(segments):
        last = k == len(segments) - 1
        seg_first.append(-1 if next_seq is None else next_seq)
        fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            window = _Window(fd, seg, _BODY_WINDOW if last else _HEADER_WINDOW)
            pos = seg.start
            while pos < seg.end:
                header = _valid_at(window, pos, verify=last)
                if header is not None and (next_seq is None or header.seq >= next_seq):
                    if seg_first[-1] < 0:
                        seg_first[-1] = header.seq
                    take(header)
                    pos = header.end
                    continue
                floor = 1 if next_seq is None else next_seq
                nxt = _resync(seg, pos, last, _at_least(floor))
                if nxt is None and last:
                    cut_to = pos - seg.start  # the torn tail of an unfinished commit
                    break
                bad = True  # in a sealed segment even the tail was durable
                if nxt is None:
                    break
                pos = nxt
        finally:
            os.close(fd)
    if index is None:
        index = RecordIndex(target_acked_seq + 1)
    following = index.last_seq + 1
    for k in reversed(range(len(seg_first))):  # segments without an intact record
        if seg_first[k] < 0:
            seg_first[k] = following
        following = seg_first[k]
    if bad:  # a sealed segment ended in damage and nothing intact came after it
        lost = target_acked_seq + 1 if next_seq is None else next_seq
        damage.append((lost, lost))
    return StreamScan(index, seg_first, cut_to, damage)
