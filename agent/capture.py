"""One consistent recovery point's payload: freeze, drain with a barrier, copy, thaw.

`capture_consistent` is what the agent's tag loop calls. Inside one bounded freeze
(`agent.quiesce.freeze`) it drains the tracker with its marker barrier (so the dirty
set provably holds every write that completed before FIFREEZE returned), checks the
tracker lost nothing, and preads the dirty extents into memory. Everything before the
tag, applied on the replica, then reproduces the device as it was while frozen: the
extents are its bytes at that instant, and the chunks not in them have not changed
since the previous drain.

It gives up rather than stretch the freeze: a dirty set over the byte budget, a copy
that would not (or did not) finish inside the bound, or a tracker that lost events all
yield `Untagged`, which hands back what was drained, so the caller sends it without a
tag (read live later; the tracker marks again whatever changes meanwhile) and
checksum-resyncs `resync`. Nothing drained is ever dropped.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from agent.errors import BarrierTimeout, FreezeTimeout, QuiesceFailed
from agent.extents import pread_extents
from agent.quiesce import Freeze, freeze
from agent.trackers.base import DirtyMap, Tracker
from agent.trackers.tracefs import TracefsTracker

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 64 << 20  # bytes copied into memory per capture, at most


@dataclass(frozen=True)
class Capture:
    """A consistent point: `data` holds the bytes of every extent of `dirty`, back to
    back in `dirty.extents()` order, read while frozen; the tag goes after them."""

    dirty: DirtyMap
    data: memoryview
    freeze_seconds: float
    copy_seconds: float

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def extents(self) -> tuple[tuple[int, memoryview], ...]:
        """(device offset, its bytes) of each dirty extent: views of `data`, no copy."""
        out: list[tuple[int, memoryview]] = []
        position = 0
        for offset, length in self.dirty.extents():
            out.append((offset, self.data[position : position + length]))
            position += length
        return tuple(out)


@dataclass(frozen=True)
class Untagged:
    """No consistent point this time, and why. `dirty` was drained from the tracker:
    the caller must still send it (without a tag); `resync` (if any) is what the tracker
    lost track of, to compare by checksum."""

    dirty: DirtyMap
    resync: DirtyMap | None
    reason: str
    freeze_seconds: float | None


def capture_consistent(
    tracker: Tracker,
    device_fd: int,
    mounts: Iterable[str | os.PathLike[str]],
    timeout: float = 1.0,
    *,
    budget: int = DEFAULT_BUDGET,
    read_rate: float | None = None,
    pre: Sequence[str] | None = None,
    post: Sequence[str] | None = None,
    on_frozen: Callable[[], None] | None = None,
) -> Capture | Untagged:
    """Freeze `mounts` for at most `timeout` s and capture the tracker's dirty extents.

    `device_fd` must be the whole disk opened with O_DIRECT: a buffered read can be
    served from the block device's page cache, which the filesystem's writes (issued
    as bios) bypass, i.e. bytes older than the freeze. `read_rate` (bytes/s, e.g. the
    last capture's) lets it give up before copying when the copy cannot fit.
    `on_frozen` runs while still frozen after the copy (a test hook: hash the device).

    Raises QuiesceFailed / BarrierTimeout / FreezeTimeout only when nothing was drained.
    """
    (result,) = capture_machine(
        [(tracker, device_fd)], mounts, timeout, budget=budget, read_rate=read_rate,
        pre=pre, post=post, on_frozen=on_frozen,
    )  # fmt: skip
    return result


def capture_machine(
    disks: Sequence[tuple[Tracker, int]],
    mounts: Iterable[str | os.PathLike[str]],
    timeout: float = 1.0,
    *,
    budget: int = DEFAULT_BUDGET,
    read_rate: float | None = None,
    pre: Sequence[str] | None = None,
    post: Sequence[str] | None = None,
    on_frozen: Callable[[], None] | None = None,
    hold: Callable[[float], bool] | None = None,
) -> list[Capture | Untagged]:
    """`capture_consistent` for all the disks of one machine inside ONE freeze, so one
    tag id can mark the same instant on every disk. All or nothing: if any disk cannot
    be captured, every disk gets `Untagged` (with what was drained from it). `budget`
    and `read_rate` apply to the machine's total; results are in `disks` order.

    `hold`, if given, is called frozen after the copy with the seconds left of the bound
    and keeps the filesystems frozen until it returns: True to go on, False to give up
    the point (the caller's own reads that must end before the thaw did not)."""
    for _, fd in disks:
        if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise ValueError("capture_consistent needs the device opened with O_DIRECT")
    drained: list[tuple[DirtyMap, DirtyMap | None]] = []
    reason: str | None = None
    buffers: list[mmap.mmap] = []
    copy_seconds = 0.0
    handle: Freeze | None = None
    try:
        with freeze(mounts, timeout, pre=pre, post=post) as handle:
            for tracker, _ in disks:
                dirty = _drain(tracker, handle)
                drained.append((dirty, tracker.needs_resync()))
            reason = _refusal(drained, budget, read_rate, handle)
            if reason is None:
                started = time.monotonic()
                for (dirty, _), (_, fd) in zip(drained, disks, strict=True):
                    buffer, reason = _copy(fd, dirty, handle)
                    if buffer is None:
                        break
                    buffers.append(buffer)
                copy_seconds = time.monotonic() - started
                if reason is None and hold is not None and not hold(handle.remaining()):
                    reason = "the reads before the point did not end inside the freeze bound"
                if reason is None and on_frozen is not None:
                    on_frozen()
    except (FreezeTimeout, QuiesceFailed, BarrierTimeout) as err:
        # A failed drain on a later disk must not lose what earlier disks handed over.
        if not drained:
            raise
        reason = err.message
    assert handle is not None and handle.duration is not None
    if reason is not None or len(buffers) != len(disks):
        for buffer in buffers:
            buffer.close()
        log.info("no consistent point: %s", reason)
        untagged: list[Capture | Untagged] = []
        for i, (tracker, _) in enumerate(disks):
            if i < len(drained):
                dirty, resync = drained[i]
            else:  # its drain never ran: whatever it tracked is still in the tracker
                dirty, resync = _empty_like(tracker, drained[0][0]), None
            untagged.append(Untagged(dirty, resync, reason or "nothing copied", handle.duration))
        return untagged
    return [
        Capture(dirty, _view(buffer, dirty), handle.duration, copy_seconds)
        for (dirty, _), buffer in zip(drained, buffers, strict=True)
    ]


def _empty_like(tracker: Tracker, fallback: DirtyMap) -> DirtyMap:
    """An empty map of `tracker`'s geometry (trackers keep `size` or `disk.size`)."""
    disk = getattr(tracker, "disk", None)
    size = getattr(tracker, "size", getattr(disk, "size", fallback.size))
    return DirtyMap(int(size), int(getattr(tracker, "chunk", fallback.chunk)))


def _drain(tracker: Tracker, handle: Freeze) -> DirtyMap:
    if isinstance(tracker, TracefsTracker):
        # The barrier may use what is left of the bound, not the tracker's default.
        return tracker.drain(barrier=True, timeout=max(handle.remaining(), 0.0))
    return tracker.drain()


def _refusal(
    drained: list[tuple[DirtyMap, DirtyMap | None]],
    budget: int,
    read_rate: float | None,
    handle: Freeze,
) -> str | None:
    lost = sum(resync.count for _, resync in drained if resync is not None)
    if any(resync is not None for _, resync in drained):
        return f"the tracker lost events ({lost} chunks to resync)"
    nbytes = sum(length for dirty, _ in drained for _, length in dirty.extents())
    if nbytes > budget:
        return f"dirty set of {nbytes} bytes exceeds the capture budget of {budget}"
    if read_rate and nbytes / read_rate > handle.remaining():
        return f"copying {nbytes} bytes at {read_rate:.0f} B/s would overrun the freeze bound"
    return None


def _copy(fd: int, dirty: DirtyMap, handle: Freeze) -> tuple[mmap.mmap | None, str | None]:
    """pread every dirty extent into one page-aligned buffer (O_DIRECT wants aligned
    memory; an anonymous mmap is), several at once (`agent.extents`). Stops at the
    deadline rather than overrun it."""
    extents = list(dirty.extents())
    total = sum(length for _, length in extents)
    if total == 0:
        return mmap.mmap(-1, 1), None
    buffer = mmap.mmap(-1, total)
    try:
        with memoryview(buffer) as view:
            reason = pread_extents(fd, extents, view, expired=handle.expired)
    except OSError as err:
        reason = f"reading the device failed: {err}"
    if reason is not None:
        buffer.close()
        return None, reason
    return buffer, None


def _view(buffer: mmap.mmap, dirty: DirtyMap) -> memoryview:
    """The copied bytes, uncopied: the messages that send them hold slices of this
    view, and the mmap is unmapped when the last of them is dropped."""
    return memoryview(buffer)[: sum(length for _, length in dirty.extents())]
