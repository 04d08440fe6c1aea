"""Recovery points: what they are, and rebuilding a disk image at one.

A point on a disk is ``(seq, lsn)``: the tag's sequence number and the journal end when
the tag was applied. The disk at the point is the replica rolled back through every
undo record at or after ``lsn``, newest first. This module rolls back *oldest first,
first writer wins* instead: the earliest record after ``lsn`` that covers a byte holds
that byte's value at the point (it is the old contents of the first write after the
tag), so writing only the not-yet-covered parts of each record, oldest first, gives the
same image as the newest-first rollback while writing every byte at most once and
reading the journal forwards.

The same property makes a copy taken while apply continues correct: after the copy,
every byte written since ``lsn`` has a record in ``[lsn, J1)`` (records are appended
and synced before the replica changes; ``J1`` is the journal end read after the copy),
so whatever value the copy caught, the rollback replaces it with the point's value.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from appliance.storage.faults import FaultPoint, fault_point
from appliance.storage.fileio import copy_sparse, pwrite_all, write_zeros
from appliance.target import vmdk
from appliance.target.journal import Encoding, Journal


class PointKind(StrEnum):
    """How the source produced the tag (DESIGN "Consistency model")."""

    CRASH = "crash"
    APP = "app"


@dataclass(frozen=True)
class RecoveryPoint:
    """A tag present on every listed disk; ``seqs`` and ``disks`` are in the same order."""

    tag_id: str
    time_ns: int
    kind: PointKind
    machine_id: str
    disks: tuple[str, ...]
    seqs: tuple[int, ...]
    usable: bool


class Coverage:
    """A set of byte ranges, kept as sorted, disjoint, non-touching intervals."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any byte of ``[start, end)`` is in the set."""
        i = bisect.bisect_right(self._ends, start)  # the first interval ending after start
        return i < len(self._starts) and self._starts[i] < end

    def intersects(self, other: Coverage) -> bool:
        small, big = (self, other) if len(self) <= len(other) else (other, self)
        return any(big.overlaps(s, e) for s, e in zip(small._starts, small._ends, strict=True))

    def claim(self, start: int, end: int) -> list[tuple[int, int]]:
        """Add ``[start, end)``; return its parts that were not covered before."""
        starts, ends = self._starts, self._ends
        lo = bisect.bisect_left(ends, start)  # first interval touching or after start
        hi = bisect.bisect_right(starts, end)  # past the last interval touching end
        gaps: list[tuple[int, int]] = []
        cursor = start
        for k in range(lo, hi):
            if starts[k] > cursor:
                gaps.append((cursor, min(starts[k], end)))
            cursor = max(cursor, ends[k])
        if cursor < end:
            gaps.append((cursor, end))
        if lo < hi:
            new_start, new_end = min(start, starts[lo]), max(end, ends[hi - 1])
        else:
            new_start, new_end = start, end
        starts[lo:hi] = [new_start]
        ends[lo:hi] = [new_end]
        return gaps


def roll_back(fd: int, journal: Journal, from_lsn: int, to_lsn: int) -> int:
    """Restore onto ``fd`` the old contents recorded in ``[from_lsn, to_lsn)``.

    Afterwards every byte covered by those records holds its value as of ``from_lsn``.
    Idempotent, so an interrupted rollback can simply run again. Zeros are restored as
    holes, which needs no free space. Returns the number of bytes restored.
    Raises JournalCorrupt at a damaged record (``fd`` is then partially restored).
    """
    covered = Coverage()
    restored = 0
    for rec in journal.read(from_lsn, to_lsn):
        gaps = covered.claim(rec.offset, rec.offset + rec.length)
        if not gaps:
            continue
        fault_point(FaultPoint.RECOVERY_RESTORE)
        if rec.encoding is Encoding.ZEROS:
            for start, end in gaps:
                write_zeros(fd, start, end - start)
        else:
            data = memoryview(rec.data())
            for start, end in gaps:
                pwrite_all(fd, data[start - rec.offset : end - rec.offset], start)
        restored += sum(end - start for start, end in gaps)
    return restored


def materialize_disk(
    journal: Journal, *, replica_flat: Path, size: int, point_lsn: int, out_dir: Path, name: str
) -> vmdk.VmdkPaths:
    """Build a new VMDK pair ``out_dir/<name>.vmdk`` holding the disk at ``point_lsn``.

    Runs beside apply: the caller must hold a journal pin at ``point_lsn`` for the whole
    call. On failure the new files are removed. Raises JournalCorrupt if a record the
    point needs is damaged.
    """
    pair = vmdk.create(out_dir, name, size)
    try:
        dst = os.open(pair.flat, os.O_RDWR | os.O_CLOEXEC)
        try:
            src = os.open(replica_flat, os.O_RDONLY | os.O_CLOEXEC)
            try:
                copy_sparse(src, dst, size)
            finally:
                os.close(src)
            # Read only now: every change the copy may have caught has its record below.
            j1 = journal.end_lsn
            roll_back(dst, journal, point_lsn, j1)
            os.fdatasync(dst)
        finally:
            os.close(dst)
    except BaseException:
        pair.descriptor.unlink(missing_ok=True)
        pair.flat.unlink(missing_ok=True)
        raise
    return pair
