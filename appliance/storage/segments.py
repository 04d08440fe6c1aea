"""Segment files: the building block of the append-only logs (the master target's undo
journal; the same layout suits the process server's spool).

A log is a directory of segment files, each named after the log position of its first
byte, with the log's bytes after a fixed header::

    <start:016x><suffix>

    SEGMENT_HEADER (88 bytes, little endian)
        magic     8s   chosen by the log (b"SSUNDOSG" for the undo journal)
        version   u16  the log's format version
        reserved  u16  0
        start     u64  log position of the first byte after the header (== the name)
        owner     64s  UTF-8, NUL padded: the disk or stream the log belongs to
        crc       u32  CRC-32C of the 84 bytes before it

A segment is created complete or not at all: its header goes to a synced temp file
that is then linked into place (``atomic_write``), so a crash leaves at worst a stray
``.<name>.<pid>.tmp`` that :func:`load_segments` removes. Positions chain: each segment
starts where the previous one ends, so a log has no gaps.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.checksum import crc32c
from appliance.storage.atomic import atomic_write

SEGMENT_HEADER = struct.Struct("<8sHHQ64sI")
assert SEGMENT_HEADER.size == 88
_READ_CHUNK = 4 << 20


class SegmentCorrupt(Exception):
    """A segment header or the chain of segments is damaged; ``position`` is where."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


@dataclass
class Segment:
    start: int
    path: Path
    length: int  # bytes after the header

    @property
    def end(self) -> int:
        return self.start + self.length


def segment_path(directory: Path, start: int, suffix: str) -> Path:
    return directory / f"{start:016x}{suffix}"


def create_segment(
    directory: Path, start: int, *, magic: bytes, version: int, owner: str, suffix: str
) -> Segment:
    """Create an empty segment starting at ``start`` (never replacing a file)."""
    head = SEGMENT_HEADER.pack(magic, version, 0, start, owner.encode()[:64], 0)
    head = head[:-4] + struct.pack("<I", crc32c(head[:-4]))
    path = segment_path(directory, start, suffix)
    atomic_write(path, head, 0o600, exclusive=True)
    return Segment(start, path, 0)


def _check_header(path: Path, magic: bytes, version: int, suffix: str) -> int:
    with open(path, "rb") as f:
        raw = f.read(SEGMENT_HEADER.size)
    if len(raw) != SEGMENT_HEADER.size:
        raise SegmentCorrupt(f"{path}: short segment header", 0)
    got_magic, got_version, _, start, _, crc = SEGMENT_HEADER.unpack(raw)
    if got_magic != magic or crc32c(raw[:-4]) != crc or got_version != version:
        raise SegmentCorrupt(f"{path}: bad segment header", 0)
    if path != segment_path(path.parent, start, suffix):
        raise SegmentCorrupt(f"{path}: header says it starts at {start}", start)
    return int(start)


def load_segments(directory: Path, *, magic: bytes, version: int, suffix: str) -> list[Segment]:
    """The segments of the log in ``directory``, oldest first, checked to chain.

    Every segment's length comes from its file size; the caller decides how far the
    last one's bytes are valid.
    """
    segments: list[Segment] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink()  # a segment creation that crashed before its link
        elif path.name.endswith(suffix):
            start = _check_header(path, magic, version, suffix)
            segments.append(Segment(start, path, path.stat().st_size - SEGMENT_HEADER.size))
    for prev, nxt in itertools.pairwise(segments):
        if prev.end != nxt.start:
            raise SegmentCorrupt(f"{nxt.path.name} does not follow {prev.path.name}", prev.end)
    return segments


def cut_segment(segment: Segment, length: int) -> None:
    """Shorten ``segment`` to ``length`` bytes after its header, durably."""
    fd = os.open(segment.path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, SEGMENT_HEADER.size + length)
        os.fsync(fd)
    finally:
        os.close(fd)
    segment.length = length


class SegmentReader:
    """Buffered positional reads of one segment, addressed by log position."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self._fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
        self._buf = b""
        self._at = 0  # log position of _buf[0]

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, pos: int, n: int, limit: int) -> memoryview:
        """Up to ``n`` bytes at ``pos``: fewer at ``limit`` or at the end of the file."""
        n = max(0, min(n, limit - pos))
        if not (self._at <= pos and pos + n <= self._at + len(self._buf)):
            want = min(max(n, _READ_CHUNK), limit - pos)
            self._buf = os.pread(self._fd, want, SEGMENT_HEADER.size + pos - self.segment.start)
            self._at = pos
        return memoryview(self._buf)[pos - self._at : pos - self._at + n]

    def find(
        self, marker: bytes, pos: int, limit: int, accept: Callable[[int], bool]
    ) -> int | None:
        """The first position in ``[pos, limit)`` where ``marker`` starts and ``accept``
        agrees: how a log resynchronises on its next intact record after damage."""
        while pos < limit:
            window = bytes(self.get(pos, _READ_CHUNK, limit))
            if not window:
                break  # the file is shorter than its recorded length
            hit = window.find(marker)
            while hit >= 0:
                if accept(pos + hit):
                    return pos + hit
                hit = window.find(marker, hit + 1)
            pos += max(1, len(window) - len(marker) + 1)
        return None
