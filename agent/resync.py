"""Checksum resync: after any gap in tracking, send only the chunks that really differ.

A gap is anything that makes a tracker unsure: an agent restart, a ring-buffer
overrun, a lost digest file, a disk the master target reports as inconsistent. The
tracker names the chunks (`Tracker.needs_resync`); this module reads them locally,
asks the master target for its digests of the same chunks, and keeps the ones that
differ. Nothing is re-sent blindly: on a 1 TiB disk after a restart, the cost is one
local read and 16 bytes per 64 KiB chunk on the wire, not a terabyte.

The remote side is a callable so this module stays free of the wire protocol (the
digest request arrives with the streaming code); it must digest its replica exactly
as `agent.digest.chunk_digest` does, chunk by chunk.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.digest import DIGEST_SIZE, READ_SIZE, DeviceReader
from agent.trackers.base import DirtyMap

RemoteDigests = Callable[[list[int]], dict[int, bytes]]
# Chunks per remote request: bounds the request (8 bytes each) and the answer (16 bytes
# each, ~64 KiB) so one call fits well inside a wire frame and a window.
BATCH = 4096


@dataclass
class Comparison:
    """Outcome of a checksum resync over some chunks of one disk."""

    differ: DirtyMap  # chunks to send: the replica's digest differs or it has none
    matched: dict[int, bytes] = field(default_factory=dict)  # chunk -> digest both hold

    @property
    def checked(self) -> int:
        return self.differ.count + len(self.matched)


def compare(
    device: Path,
    ranges: DirtyMap,
    remote_digests: RemoteDigests,
    *,
    batch: int = BATCH,
    read_size: int = READ_SIZE,
) -> Comparison:
    """Compare the chunks set in `ranges` between `device` and the master target.

    `device` is read for `ranges.size` bytes (the disk's size when `ranges` was made);
    a chunk the remote leaves out of its answer counts as differing (its replica has
    no data there yet). `matched` lets a tracker record what the replica holds
    (`ScanTracker.commit`) so the same chunks are not compared again after the next
    restart. Memory: 16 bytes per checked chunk plus one read buffer.
    """
    if batch <= 0:
        raise ValueError(f"batch {batch} must be positive")
    result = Comparison(differ=DirtyMap(ranges.size, ranges.chunk))
    pending: dict[int, bytes] = {}
    with DeviceReader(device, ranges.size, read_size) as reader:
        for first, digests in reader.digests(ranges.runs(), ranges.chunk):
            for k in range(0, len(digests), DIGEST_SIZE):
                pending[first + k // DIGEST_SIZE] = digests[k : k + DIGEST_SIZE]
            while len(pending) >= batch:
                _settle(_take(pending, batch), remote_digests, result)
        if pending:
            _settle(pending, remote_digests, result)
    return result


def differing_chunks(
    device: Path,
    ranges: DirtyMap,
    remote_digests: RemoteDigests,
    *,
    batch: int = BATCH,
    read_size: int = READ_SIZE,
) -> DirtyMap:
    """The chunks of `ranges` whose contents differ from the master target's replica."""
    return compare(device, ranges, remote_digests, batch=batch, read_size=read_size).differ


def _take(pending: dict[int, bytes], count: int) -> dict[int, bytes]:
    """Remove and return the `count` oldest entries (dicts keep insertion order)."""
    return {key: pending.pop(key) for key in list(itertools.islice(pending, count))}


def _settle(local: dict[int, bytes], remote_digests: RemoteDigests, result: Comparison) -> None:
    chunks = list(local)
    remote = remote_digests(chunks)
    for index in chunks:
        theirs = remote.get(index)
        if theirs is not None and len(theirs) != DIGEST_SIZE:
            # A wrong-sized digest is a protocol bug, not a difference: sending the
            # chunk would hide it and the next resync would fail the same way.
            raise ValueError(f"remote digest of chunk {index} has {len(theirs)} bytes")
        if theirs == local[index]:
            result.matched[index] = theirs
        else:
            result.differ.mark_chunk(index)
