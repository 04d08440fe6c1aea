"""Live write tracking from the kernel's block tracepoints in a private tracefs instance.

A reader thread consumes the instance's `trace_pipe` (text: one event per line) into a
DirtyMap under a lock. Two races from DESIGN ("Change tracking"):

1. A read of a chunk while a write to it is still in flight can return the old bytes.
   So a chunk is marked when a write is queued (`block_bio_queue`) AND again when it
   completes (`block_rq_complete`): a chunk drained and read between the two is drained
   again by the next drain, after the new bytes are on the disk.
2. "Drained up to the freeze" must be proven, not assumed. `drain()` writes a marker
   line into the instance's `trace_marker` from every online CPU in turn (the calling
   thread pinned to each), and the reader swaps the dirty map out exactly when the last
   of them comes back. The ring buffers are per CPU and each is FIFO, so every event
   committed on a CPU before its marker is read before that marker, whatever the
   clocks say; after FIFREEZE returned, every write of the filesystem has completed, so
   its completion event is in some CPU's buffer ahead of that CPU's marker.

Losses are never ignored: the per-CPU `overrun`/`commit overrun`/`dropped events`
counters, `[LOST n EVENTS]` lines and any block event line the parser cannot read turn
into the whole disk in `needs_resync()` (a lost event carries no range, so nothing
smaller can be proven). A fresh start has no history either: the first
`needs_resync()` after `start()` is the whole disk.

Measured on the build machine (tests/bench/bench_tracefs.py, random 4 KiB O_DIRECT
writes into ext4 on a loop device): 20 MB/s gives ~9.8k events/s for ~3% of one core,
54 MB/s ~26k events/s for ~7%, no losses with 4 MiB per-CPU buffers. Text parsing is
~1.3 us per event; the rest is the kernel formatting text inside read(). The chunk
size matters more than the parser: at 64 KiB, 20 MB/s of random 4 KiB writes dirties
~240 MiB of chunks per second, at 4 KiB ~19 MiB (the tracepoints give exact sectors).
So the bits are 4 KiB (`base.fine_chunk`: coarser only where the bitmap would pass
8 MiB, disks over 256 GiB); adjacent dirty blocks come out as one extent.
"""

from __future__ import annotations

import logging
import os
import re
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.discovery import Disk
from agent.errors import BarrierTimeout, DeviceGone, TrackerUnavailable
from agent.trackers.base import CHUNK, DirtyMap, fine_chunk
from agent.trackers.tracefs_instance import (
    DEFAULT_TRACEFS,
    Counters,
    Instance,
    ensure_mounted,
    online_cpus,
    remove_stale,
)

log = logging.getLogger(__name__)

# "block_bio_queue: 7,0 WS 17410 + 24 [dd]", "block_rq_complete: 7,0 WS () 17410 + 24 be,0,4 [0]"
# (the parenthesised SCSI command is empty except for passthrough requests).
_EVENT = re.compile(
    rb"^block_(?:bio_queue|rq_complete): \d+,\d+ ([A-Z]*) (?:\([^)]*\) )?(\d+) \+ (\d+)"
)
_MARK = b"tracing_mark_write: "
_BARRIER = b"secondsite-barrier "
_READ_SIZE = 1 << 16  # trace_pipe returns at most a page per read; ask for more anyway
_BATCH_READS = 256  # reads (pages of text) per batch at most, so the lock is not hogged
_POLL_MS = 200  # how quickly the reader notices stop()
# After a batch the reader naps (unless a drain wakes it) so events pile up: waking per
# event cost ~15% of a core at 10k events/s, mostly poll/read syscalls; the 4 MiB
# per-CPU buffers hold seconds of events, far more than the nap.
_NAP = 0.02


@dataclass(frozen=True)
class TracefsStats:
    """What the tracker saw since start, for status and measurements."""

    events: int
    lines: int
    barriers: int
    lost_counters: int
    lost_lines: int
    unparsed: int


@dataclass
class _Barrier:
    token: bytes
    waiting: set[int]
    done: threading.Event = field(default_factory=threading.Event)
    result: DirtyMap | None = None


class TracefsTracker:
    """Tracker for one whole blk-mq disk (by its major:minor), in chunk-sized dirty bits.

    `buffer_size_kb` is per CPU; 4096 held 26k events/s without overrun on the build
    machine. `barrier_timeout` bounds how long a drain waits for its markers.
    """

    name = "tracefs"

    def __init__(
        self,
        disk: Disk,
        *,
        chunk: int | None = None,
        tracefs: str | os.PathLike[str] = DEFAULT_TRACEFS,
        buffer_size_kb: int = 4096,
        barrier_timeout: float = 5.0,
    ) -> None:
        self.disk = disk
        self.device = disk.path
        self.size = size = disk.size
        # Dirty bits at the finest affordable granularity (the tracepoints give exact
        # sectors); a gap is resynced by checksum at CHUNK: a digest per 4 KiB would
        # make a full resync's requests 16 times larger for nothing.
        self.chunk = chunk or fine_chunk(size)
        self.resync_chunk = max(self.chunk, CHUNK)
        self.tracefs = Path(tracefs)
        self.buffer_size_kb = buffer_size_kb
        self.barrier_timeout = barrier_timeout
        self._lock = threading.Lock()  # dirty map, barrier, loss flags, counters
        self._drain_lock = threading.Lock()  # one barrier in flight at a time
        self._dirty = DirtyMap(size, self.chunk)
        self._barrier: _Barrier | None = None
        self._barrier_seq = 0
        self._fresh = True
        self._lost = False
        self._lost_baseline = 0
        self._failure: str | None = None
        self._instance: Instance | None = None
        self._pipe = -1
        self._marker = -1
        self._allowed: set[int] = set()
        self._reader: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()  # cuts the reader's nap short: a drain waits
        # Called by the reader thread (without the lock) when the set goes from empty to
        # not empty, at most once between two drains: lets the caller drain as writes
        # come instead of polling an idle disk.
        self.on_dirty: Callable[[], None] | None = None
        self._signalled = False
        self._events = self._lines = self._barriers = 0
        self._lost_lines = self._unparsed = self._lost_counters = 0

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        if self._instance is not None:
            raise RuntimeError("tracefs tracker already started")
        major, minor = self._whole_blk_mq_disk()
        ensure_mounted(self.tracefs)
        remove_stale(self.tracefs)
        instance = Instance(self.tracefs, major, minor, self.buffer_size_kb)
        instance.create()
        try:
            self._allowed = self._allowed_cpus(instance)
            self._pipe = instance.open_pipe()
            self._marker = instance.open_marker()
            instance.enable()
        except BaseException:
            self._close_fds()
            instance.remove()
            raise
        self._instance = instance
        self._fresh, self._lost, self._failure = True, False, None
        self._lost_baseline = 0
        self._stopping.clear()
        self._reader = threading.Thread(
            target=self._read_loop, name=f"tracefs-{self.device.name}", daemon=True
        )
        self._reader.start()
        log.info("tracefs tracker on %s (%d:%d) in %s", self.device, major, minor, instance.name)

    def stop(self) -> None:
        instance, self._instance = self._instance, None
        if instance is None:
            return
        try:
            instance.disable()
        finally:
            self._stopping.set()
            self._wake.set()
            if self._reader is not None:
                self._reader.join()
                self._reader = None
            self._close_fds()
            instance.remove()
        with self._lock:
            self._release_barrier()

    def __enter__(self) -> TracefsTracker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def instance_path(self) -> Path | None:
        return None if self._instance is None else self._instance.path

    # -- the Tracker interface ---------------------------------------------------

    def drain(self, *, barrier: bool = True, timeout: float | None = None) -> DirtyMap:
        """Everything dirtied since the previous drain; resets the set.

        With `barrier` (the default) the set is proven complete up to the call: every
        write that completed before `drain` was called is in it (see the module doc).
        BarrierTimeout after `timeout` (default `barrier_timeout`) drains nothing.
        Without `barrier`, it is whatever the reader has parsed so far.
        """
        with self._drain_lock:
            self._check_alive()
            if not barrier:
                with self._lock:
                    drained = self._swap()
            else:
                drained = self._barrier_drain(self.barrier_timeout if timeout is None else timeout)
            self._check_counters()
            return drained

    def needs_resync(self) -> DirtyMap | None:
        self._check_alive()
        self._check_counters()
        with self._lock:
            gap = self._fresh or self._lost
            self._fresh = self._lost = False
        return DirtyMap.full(self.size, self.resync_chunk) if gap else None

    def stats(self) -> TracefsStats:
        with self._lock:
            return TracefsStats(
                self._events,
                self._lines,
                self._barriers,
                self._lost_counters,
                self._lost_lines,
                self._unparsed,
            )

    # -- barrier -----------------------------------------------------------------

    def _barrier_drain(self, timeout: float) -> DirtyMap:
        deadline = time.monotonic() + timeout
        self._barrier_seq += 1
        token = f"{os.getpid()}.{self._barrier_seq}.{time.monotonic_ns()}".encode()
        # Online CPUs read at every drain: a vCPU hot-added since start has a buffer too.
        cpus = online_cpus() & self._allowed
        pending = _Barrier(token, set(cpus))
        with self._lock:
            self._barrier = pending
        self._write_markers(pending, cpus)
        self._wake.set()
        pending.done.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._barrier = None
            result = pending.result
        if result is None:
            self._check_alive()
            raise BarrierTimeout(self.device.name, timeout)
        return result

    def _write_markers(self, pending: _Barrier, cpus: set[int]) -> None:
        """One marker per CPU, written while pinned to that CPU (sched_setaffinity on
        the calling thread migrates it before returning), so each lands in that CPU's
        ring buffer behind every event committed there before it."""
        previous = os.sched_getaffinity(0)
        try:
            for cpu in sorted(cpus):
                try:
                    os.sched_setaffinity(0, {cpu})
                except OSError:
                    # Went offline since online_cpus(): it records nothing new, and what
                    # it holds is read in clock order with the rest.
                    with self._lock:
                        pending.waiting.discard(cpu)
                        self._complete_if_done(pending)
                    continue
                os.write(self._marker, _BARRIER + pending.token + b" %d\n" % cpu)
        finally:
            os.sched_setaffinity(0, previous)

    def _complete_if_done(self, pending: _Barrier) -> None:
        """With the lock held: swap the dirty map out once every marker is back."""
        if not pending.waiting and pending.result is None:
            pending.result = self._swap()
            self._barriers += 1
            pending.done.set()

    def _allowed_cpus(self, instance: Instance) -> set[int]:
        online = online_cpus()
        allowed = os.sched_getaffinity(0)
        if online - allowed:
            # A cpuset keeps us off some CPUs, so their buffers get no marker: order the
            # merged pipe by a clock that is coherent across CPUs instead (set now:
            # changing the clock later would reset the buffers). That covers an event
            # strictly older than the marker, not one with an equal timestamp.
            log.warning(
                "tracefs barrier: CPUs %s unreachable from this process; relying on the "
                "global trace clock for them",
                sorted(online - allowed),
            )
            instance.set_clock("global")
        return allowed

    def _swap(self) -> DirtyMap:
        """With the lock held: the dirty set so far, replaced by an empty one (which
        `on_dirty` will announce again)."""
        drained, self._dirty = self._dirty, DirtyMap(self.size, self.chunk)
        self._signalled = False
        return drained

    def _release_barrier(self) -> None:
        if self._barrier is not None:
            self._barrier.done.set()

    # -- reader thread -----------------------------------------------------------

    def _read_loop(self) -> None:
        poller = select.poll()
        poller.register(self._pipe, select.POLLIN)
        tail = b""
        try:
            while not self._stopping.is_set():
                if not poller.poll(_POLL_MS):
                    continue
                pages: list[bytes] = [tail]
                for _ in range(_BATCH_READS):
                    try:
                        data = os.read(self._pipe, _READ_SIZE)
                    except BlockingIOError:
                        break
                    if not data:
                        break
                    pages.append(data)
                text = b"".join(pages)
                cut = text.rfind(b"\n") + 1
                if cut:
                    self._consume(text[:cut].split(b"\n")[:-1])
                tail = text[cut:]
                if self._wake.wait(_NAP):
                    self._wake.clear()
        except OSError as err:
            # The instance went away under us (removed by hand, tracefs unmounted):
            # nothing after this point is tracked, so drain() must refuse from now on.
            log.error("tracefs reader for %s stopped: %s", self.device, err)
            with self._lock:
                self._failure = f"reader stopped: {err.strerror or err}"
        finally:
            with self._lock:
                if self._failure is None and not self._stopping.is_set():
                    self._failure = "reader thread died (bug, see the traceback)"
                self._release_barrier()

    def _consume(self, lines: list[bytes]) -> None:
        """Mark every event of a batch, in order, under one lock hold, so a barrier that
        completes in the middle swaps the map out at exactly that line."""
        size = self.size
        events = self._events
        with self._lock:
            self._lines += len(lines)
            for line in lines:
                match = _EVENT.match(line)
                if match is not None:
                    rwbs, sector, count = match.groups()
                    # The kernel filter keeps only this disk, and on kernels with glob
                    # filters also drops reads and empty ranges; re-checked here.
                    if count == b"0" or b"R" in rwbs:
                        continue
                    self._events += 1
                    start = int(sector) << 9
                    if start < size:
                        end = min(start + (int(count) << 9), size)
                        self._dirty.mark(start, end - start)
                    continue
                self._other_line(line)
            notify = None
            if self._events != events and not self._signalled:
                notify, self._signalled = self.on_dirty, self.on_dirty is not None
        if notify is not None:
            notify()

    def _other_line(self, line: bytes) -> None:
        if line.startswith(_MARK):
            text = line[len(_MARK) :]
            pending = self._barrier
            if pending is None or not text.startswith(_BARRIER):
                return
            token, _, cpu = text[len(_BARRIER) :].rpartition(b" ")
            if token != pending.token:
                return
            pending.waiting.discard(int(cpu))
            self._complete_if_done(pending)
        elif b"[LOST" in line:
            self._lost_lines += 1
            if not self._lost:
                log.warning("tracefs %s: %s; whole disk to resync", self.device, line.decode())
            self._lost = True
        elif line.startswith(b"block_"):
            # A block event we cannot read carries a range we do not know.
            self._unparsed += 1
            if not self._lost:
                log.warning(
                    "tracefs %s: unparsed event %r; whole disk to resync", self.device, line
                )
            self._lost = True

    # -- checks ------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._instance is None:
            raise RuntimeError("tracefs tracker is not started")
        with self._lock:
            failure = self._failure
        if failure is not None:
            raise TrackerUnavailable("tracefs", failure, fallback="scan")

    def _check_counters(self) -> None:
        """Compare the per-CPU loss counters with the last look. After a barrier this
        covers every loss before the marker: the counters move when data is lost."""
        instance = self._instance
        if instance is None:
            return
        counters: Counters = instance.counters()
        with self._lock:
            if counters.lost > self._lost_baseline:
                log.warning(
                    "tracefs %s: ring buffer lost events (%s); whole disk to resync",
                    self.device,
                    counters,
                )
                self._lost = True
                self._lost_counters += counters.lost - self._lost_baseline
                self._lost_baseline = counters.lost

    def _whole_blk_mq_disk(self) -> tuple[int, int]:
        major, minor = self.disk.major, self.disk.minor
        sysfs = Path(f"/sys/dev/block/{major}:{minor}")
        if not sysfs.exists():
            raise DeviceGone(str(self.device), "no longer in /sys/dev/block")
        if not (sysfs / "mq").is_dir():
            raise TrackerUnavailable(
                "tracefs",
                f"{self.device} is bio-based (no blk-mq): no request completion events, "
                "so writes in flight during a drain could be missed",
                fallback="scan",
            )
        return major, minor

    def _close_fds(self) -> None:
        for fd in (self._pipe, self._marker):
            if fd >= 0:
                os.close(fd)
        self._pipe = self._marker = -1
