"""Which extents of a replica are holes, with few lseek calls.

An extent that holds no data at all (never written, or punched) has a ZEROS undo record
without being read: reading a hole makes the kernel zero-fill page cache for it, which
cost the master target half its CPU on a fresh replica. Asking with one
lseek(SEEK_DATA) per extent was a third of the undo encoding time for 4 KiB extents,
and on ext4 it waits for the inode lock each replica write holds. So `HoleMap`
remembers what its last questions learnt -- a range known to hold no data, a range
known to be data -- and asks again only for an extent outside both: extents taken in
ascending order cost two lseeks per data/hole boundary, not one each.

What it learnt stays true for the extents asked about as long as nobody writes those
extents meanwhile (the apply pipeline guarantees it: a batch whose extents overlap the
one being written waits for it before its undo is read). SEEK_DATA counts data still in
the page cache; a filesystem without it reports everything as data, so every extent
is read.
"""

from __future__ import annotations

import errno
import os

_NOWHERE = (0, 0)


class HoleMap:
    """Answers `is_hole` for one file descriptor; use one per pass over ascending extents."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._hole = _NOWHERE  # [start, end): no data there
        self._data = _NOWHERE  # [start, end): all data
        self.queries = 0  # lseek calls made (tests and benchmarks read it)

    def is_hole(self, offset: int, length: int) -> bool:
        """True when ``[offset, offset+length)`` holds no data at all."""
        end = offset + length
        if self._hole[0] <= offset and end <= self._hole[1]:
            return True
        if self._data[0] <= offset < self._data[1]:
            return False  # its first byte is data: read it
        self.queries += 1
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # no SEEK_DATA here: read everything
                self._data = (offset, end)
                return False
            data = 1 << 63  # no data from offset to the end of the file
        self._hole = (offset, data)
        if data >= end:
            return True
        self.queries += 1
        try:
            self._data = (data, os.lseek(self._fd, data, os.SEEK_HOLE))
        except OSError:
            self._data = _NOWHERE
        return False
