"""The reads just before a point, overlapped with taking the freeze.

A crash-consistent round first drains the tracker live (no barrier) and reads what it
found, so that the capture inside the freeze copies little. Taking the freeze is
mostly waiting: FIFREEZE blocks writers with per-CPU semaphores, each of which waits
out an RCU grace period (measured 25-55 ms on ext4 here, with nothing to flush). So
the last part of those live reads (the *tail*) runs while FIFREEZE does, and the
capture holds the freeze until the tail reads have ended (`ReadGate`).

Why that is still exact (one disk, its filesystem frozen; a disk whose writes the
freeze does not stop never gets a tail): let d0 be the live drain and S0 its set,
read during [d0, r]; F the instant the filesystems are frozen, S1 the capture's
barrier drain there and T the thaw, with r <= T (the gate). S1 is sent after S0.
  - A chunk in S1 goes out as copied while frozen: its bytes at F.
  - A chunk in S0 and not in S1 had no write complete between d0 and F (the tracker
    marks a write when it is queued and again when it completes, and the barrier
    drain sees every write completed before F), and none can land between F and T:
    read anywhere in [d0, T], it reads its bytes at F.
  - Any other chunk has not changed since an earlier drain, as before.
So the replica at the tag is the device at F, as with the reads done before FIFREEZE.

`Pacing` learns the two figures that size the tail: how fast live reads go, and how
long a capture takes from its start to the end of its copy (the time a tail may use).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from agent.replicator_disk import split

Key = TypeVar("Key")

MARGIN = 0.8  # of the learned lead time given to the tail: reads seldom outrun the freeze
MIN_SAMPLE = 1 << 20  # bytes: smaller reads say more about the thread hop than the disk


@dataclass
class Pacing:
    """What sizes a tail: live read speed (bytes/s) and a capture's lead (s)."""

    read_rate: float | None = None
    lead: float | None = None

    def read(self, nbytes: int, seconds: float) -> None:
        if nbytes >= MIN_SAMPLE and seconds > 0:
            rate = nbytes / seconds
            self.read_rate = rate if self.read_rate is None else (self.read_rate + rate) / 2

    def tail_bytes(self, limit: int) -> int:
        """How many bytes to leave for the tail: none until both figures are known."""
        if self.read_rate is None or self.lead is None:
            return 0
        return min(limit, int(self.read_rate * self.lead * MARGIN))


def split_tail(
    sets: Sequence[tuple[Key, Sequence[tuple[int, int]]]], piece: int, tail: int, batch: int
) -> tuple[list[tuple[Key, list[tuple[int, int]]]], list[tuple[Key, list[tuple[int, int]]]]]:
    """Each key's extents cut into pieces of at most `piece` bytes and grouped into
    batches of at most `batch` bytes (one key per batch, order kept): the head, then
    the last `tail` bytes or less (whole pieces), which are read during the freeze."""
    pieces = [(key, at, size) for key, extents in sets for offset, length in extents
              for at, size in split(offset, length, piece)]  # fmt: skip
    total = sum(size for _, _, size in pieces)
    cut, behind = len(pieces), 0
    while cut > 0 and behind + pieces[cut - 1][2] <= tail:
        cut -= 1
        behind += pieces[cut][2]
    if tail and total - behind < piece:  # a head under one piece: not worth a round trip
        cut = 0
    return _grouped(pieces[:cut], batch), _grouped(pieces[cut:], batch)


def _grouped(
    pieces: list[tuple[Key, int, int]], limit: int
) -> list[tuple[Key, list[tuple[int, int]]]]:
    out: list[tuple[Key, list[tuple[int, int]]]] = []
    total = 0
    for key, at, size in pieces:
        if not out or out[-1][0] != key or total + size > limit:
            out.append((key, []))
            total = 0
        out[-1][1].append((at, size))
        total += size
    return out


class ReadGate:
    """Between the tail reads (on the event loop's side) and the capture thread, which
    calls `hold` frozen: it returns once the reads have ended (True) or failed, or the
    bound ran out (False). `held_at` is when the capture got there (monotonic)."""

    def __init__(self, margin: float) -> None:
        self._ended = threading.Event()
        self._ok = False
        self._margin = margin
        self.held_at: float | None = None

    def hold(self, remaining: float) -> bool:
        self.held_at = time.monotonic()
        return self._ended.wait(max(0.0, remaining - self._margin)) and self._ok

    def end(self, ok: bool) -> None:
        """The tail reads are over (`ok`: all of them read). Idempotent."""
        if not self._ended.is_set():
            self._ok = ok
            self._ended.set()
