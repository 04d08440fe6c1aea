"""Chunk digests of a replica's flat file, for the agent's checksum resync.

The agent hashes its own disk with the same `appliance.digest.chunk_digest` over the
same byte ranges (chunk i is [i * chunk, min((i + 1) * chunk, size)): the last chunk
short), so equal digests mean equal bytes and only differing chunks are sent again.

Blocking I/O: call it from the disk's apply thread, after the replica's pending writes
reached the file (`DiskReplica.checkpoint`), never from the event loop.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from appliance.digest import chunk_digest

# Bytes per pread over a run of adjacent chunks: one syscall per 256 chunks of 64 KiB,
# and a bounded buffer however large the request (a chunk is at most 16 MiB itself).
READ_RUN = 16 << 20


def replica_digests(
    flat: Path, size: int, chunk_size: int, chunks: Iterable[int]
) -> list[tuple[int, bytes]]:
    """(index, digest) for each distinct chunk of `chunks` that starts inside the disk
    of `size` bytes, ascending; chunks at or past the end are left out."""
    if chunk_size <= 0:
        raise ValueError(f"chunk size {chunk_size} must be positive")
    wanted = sorted({index for index in chunks if 0 <= index * chunk_size < size})
    if not wanted:
        return []
    per_read = max(1, READ_RUN // chunk_size)
    buffer = bytearray(min(per_read, len(wanted)) * chunk_size)
    out: list[tuple[int, bytes]] = []
    fd = os.open(flat, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with memoryview(buffer) as view:
            for first, end in _runs(wanted):
                for start in range(first, end, per_read):
                    stop = min(start + per_read, end)
                    offset = start * chunk_size
                    length = min(stop * chunk_size, size) - offset
                    _pread_into(fd, view[:length], offset)
                    for k in range(stop - start):
                        # Slicing clamps at `length`: the disk's last chunk comes out
                        # short, exactly as the agent hashes it.
                        at = k * chunk_size
                        out.append(
                            (start + k, chunk_digest(view[at : min(at + chunk_size, length)]))
                        )
    finally:
        os.close(fd)
    return out


def _runs(sorted_unique: list[int]) -> Iterator[tuple[int, int]]:
    """Maximal runs [first, end) of consecutive indexes."""
    first = prev = sorted_unique[0]
    for index in sorted_unique[1:]:
        if index != prev + 1:
            yield first, prev + 1
            first = index
        prev = index
    yield first, prev + 1


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `offset`; the replica file is exactly the disk's size, so a
    short read means it was truncated under us: EIO rather than a digest of garbage."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(
                errno.EIO, f"replica ends at {offset + done}, wanted {len(view) - done} more"
            )
        done += got
