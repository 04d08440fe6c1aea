"""The agent's replication core for one machine: initial copy, live deltas, tags.

Per disk, in order:

1. The tracker starts BEFORE the initial copy reads anything. Every write that
   completes from then on is in some later drain. A chunk the copy read at time t is
   either unchanged since t (the replica holds its current bytes) or was written
   after t and is dirty (re-read and sent after the copy). So once the copy is done
   and the dirty set is sent, the replica differs from the device only in chunks
   still in the tracker: exactly the invariant the tag rounds rely on.
2. The initial copy reads the device with O_DIRECT in `chunk`-sized pieces, skips
   all-zero pieces (the replica starts sparse) and sends the rest as RAW frames.
   Each frame's sequence number maps to the end offset it completes; on ACK the
   durable offset is persisted (`agent.state`), so a restart continues from there.
3. Deltas: between tags the tracefs tracker is drained without a barrier and the
   chunks are read live and sent, so the capture inside the freeze copies little. A
   drain follows the tracker's first new write (`on_dirty`) after at least
   BUSY_INTERVAL, and comes every SEND_INTERVAL anyway. When a point is due, one more
   live drain is read and sent, its last part while FIFREEZE is being taken: the
   capture keeps the freeze until those reads end (`agent.lead_in`, with the proof).
   Live and captured extents go out packed into EXTENTS messages (`agent.packing`:
   up to 1 MiB of bytes and 4096 extents per sequence number, all-zero ones as ZERO).
   Every `tag_interval` s, `capture_machine` freezes all the machine's filesystems on
   these disks at once; on success the captured extents go out on each disk followed
   by one TAG per disk with the same id. Otherwise the drained chunks go out untagged.

Gaps (tracker restart, overrun): the chunks the tracker lost track of are compared
by checksum with the master target when `remote_digests` is given (`agent.resync`),
else re-sent blindly (logged): the digest request is not wired into the sender yet.

Sequence numbers continue after the receiver's durable sequence (its DISK_OPENED):
hence `acks`, an `AckRelay` the StreamSender must be built with (`on_ack=acks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from agent.capture import DEFAULT_BUDGET, Capture, Untagged, capture_machine
from agent.discovery import Disk, disk_identity, refresh
from agent.disk_ids import assign as assign_disk_ids
from agent.errors import AgentError
from agent.lead_in import Pacing, ReadGate, split_tail
from agent.packing import MAX_PAYLOAD, pack
from agent.replicator_disk import AckRelay, DiskRun, Progress, batches
from agent.resync import RemoteDigests, differing_chunks
from agent.state import load, save
from agent.trackers.base import CHUNK as DIGEST_CHUNK
from agent.trackers.base import DirtyMap, Tracker
from agent.trackers.tracefs import TracefsTracker
from appliance.wire.messages import Data, Tag, TagKind
from appliance.wire.sender import StreamSender

__all__ = ["AckRelay", "Progress", "Replicator"]

APP_RETRY = 300.0  # a failed app-consistent point is tried again after this (at most)
log = logging.getLogger(__name__)

TrackerFactory = Callable[[Disk], Tracker]
#: Called frozen with the seconds it may wait: the group's tag id, or None (agent.group_tag).
GroupBarrier = Callable[[float], str | None]
BARRIER_MARGIN = 0.1  # seconds of the freeze bound kept for the emit and the thaw
CHUNK = 1 << 20  # initial-copy read and frame size
# Live drains between tags, at most this far apart (what is left to read when a point
# is asked for is at most this long's worth of writes) ...
SEND_INTERVAL = 0.2
# ... and as soon as the tracker reports new writes, but no sooner than this after the
# previous drain: a burst flows down the pipeline as it happens rather than in 0.2 s
# lumps (bench_agent's delta, fsync to point: 0.23 s at 0.2, 0.12 s at 0.05). A drain
# costs ~0.2 ms (2 GiB disk) to ~3 ms (256 GiB: the map is allocated and scanned).
BUSY_INTERVAL = 0.05
SEND_BATCH = 8 << 20  # bytes read per worker-thread hop when sending dirty extents
# A point asked for (request_tag, and the first one) that could not be taken is tried
# again this soon rather than at the next scheduled tag; the machine runs in between.
TAG_RETRY = 1.0
SAVE_INTERVAL = 0.5  # state written at most this often (plus at stop)


class Replicator:
    """Replicates `disks` of machine `machine_id` over `sender` (one per machine).

    Build the sender with `on_ack=acks` and pass the same `AckRelay` here. `on_frozen`
    is a test hook, called with the tag id while the machine is frozen for that tag
    (after the capture copy). `remote_digests(disk_id)` returns the master target's
    digest function for checksum resync (None: gaps are re-sent blindly).
    """

    def __init__(
        self,
        disks: Sequence[Disk],
        sender: StreamSender,
        tracker_factory: TrackerFactory,
        state_dir: Path,
        *,
        machine_id: str,
        acks: AckRelay,
        tag_interval: float = 5.0,
        app_interval: float | None = 3600.0,
        pre_script: Sequence[str] | None = None,
        post_script: Sequence[str] | None = None,
        freeze_timeout: float = 1.0,
        chunk: int = CHUNK,
        capture_budget: int = DEFAULT_BUDGET,
        remote_digests: Callable[[str], RemoteDigests] | None = None,
        on_frozen: Callable[[str], None] | None = None,
    ) -> None:
        if not disks:
            raise ValueError("a replicator needs at least one disk")
        if chunk <= 0 or chunk % 4096:
            raise ValueError(f"chunk {chunk} is not a positive multiple of 4096")
        self.machine_id = machine_id
        self.sender = sender
        self.state_dir = Path(state_dir)
        self.tag_interval = tag_interval
        # App-consistent points: the user's pre/post scripts around the same freeze,
        # every `app_interval` s (None: never); the first right after the initial sync.
        self.app_interval = app_interval
        self.pre_script = tuple(pre_script) if pre_script else None
        self.post_script = tuple(post_script) if post_script else None
        self.last_app_tag_ns: int | None = None
        self.app_failure: str | None = None  # why the last app-consistent attempt failed
        self._next_app = 0.0
        self.freeze_timeout = freeze_timeout
        self.chunk = chunk
        self.capture_budget = capture_budget
        self._factory = tracker_factory
        self._remote_digests = remote_digests
        self._on_frozen = on_frozen
        self._acks = acks
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._runs = []
        ids = assign_disk_ids(self.state_dir, machine_id, disks)  # bound to identity, not name
        for disk in disks:
            disk_id = ids[disk.name]
            state = load(self.state_dir, disk_id, disk.size, disk_identity(disk))
            self._runs.append(DiskRun(disk, disk_id, state))
        self._by_id = {run.disk_id: run for run in self._runs}
        for run in self._runs:
            sender.add_disk(run.disk_id, machine_id, run.disk.size)
        acks.listener = self._on_ack
        for disk_id, seq in acks.seen.items():  # acks that arrived before us
            self._on_ack(disk_id, seq)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._tag_now = asyncio.Event()
        self._read_rate: float | None = None
        self._pacing = Pacing()  # sizes the reads overlapped with taking a freeze
        self._written = asyncio.Event()  # a tracker saw writes since the last drain
        self._resync_wanted: int | None = None
        # A group point asked for (agent.group_tag): the barrier and who waits for it.
        self._group_wanted: tuple[GroupBarrier, asyncio.Future[str | None]] | None = None
        self.resync_done = 0  # the newest resync generation finished (see request_resync)
        self.phase = "created"
        self.error: BaseException | None = None

    # -- public ------------------------------------------------------------------

    @property
    def disk_ids(self) -> list[str]:
        return [run.disk_id for run in self._runs]

    @property
    def progress(self) -> dict[str, Progress]:
        return {run.disk_id: run.progress() for run in self._runs}

    def tags(self, disk_id: str) -> dict[str, int]:
        """Tag ids submitted on `disk_id` (this run), each with its sequence number."""
        return dict(self._by_id[disk_id].tags)

    def status(self) -> dict[str, dict[str, Any]]:
        return {run.disk_id: run.status() | {"phase": self.phase} for run in self._runs}

    def unheld_disks(self) -> list[str]:
        """Disks with no mounted filesystem: the freeze does not stop their writes, so
        this machine cannot be frozen at a group's instant (agent.group_tag)."""
        return [run.disk.name for run in self._runs if not run.disk.mounts]

    def set_schedule(
        self, tag_interval: float, app_interval: float | None,
        pre_script: Sequence[str] | None, post_script: Sequence[str] | None,
    ) -> None:  # fmt: skip
        """The policy changed (the configuration server said so): from the next round."""
        if app_interval != self.app_interval:
            self._next_app = 0.0 if self.last_app_tag_ns is None else (
                time.monotonic() + (app_interval or 0.0)
            )  # fmt: skip
        self.tag_interval, self.app_interval = tag_interval, app_interval
        self.pre_script = tuple(pre_script) if pre_script else None
        self.post_script = tuple(post_script) if post_script else None

    def request_tag(self) -> None:
        """Take a crash-consistent point as soon as the current round allows, whatever
        the schedule (SIGUSR1 to `secondsite-agent run`; benchmarks time deltas so)."""
        self._tag_now.set()

    def request_resync(self, generation: int) -> None:
        """Compare every chunk of every disk with the master target's digests and send
        what differs (the configuration server asked, e.g. after a suspected divergence);
        `resync_done` becomes `generation` once the differences are queued."""
        if generation > max(self.resync_done, self._resync_wanted or 0):
            self._resync_wanted = generation

    async def group_point(self, barrier: GroupBarrier) -> str | None:
        """Take a point now whose capture, while frozen, waits in `barrier` (called in
        the capture thread with the seconds of freeze bound it may use; it returns the
        group's tag id, or None). The tag id emitted, None if no point was taken; a
        barrier answering None still yields this machine's own point."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        if self._group_wanted is not None and not self._group_wanted[1].done():
            self._group_wanted[1].set_result(None)  # superseded: one round at a time
        self._group_wanted = (barrier, future)
        self._tag_now.set()
        return await future

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the replicator is already started")
        self._task = asyncio.get_running_loop().create_task(self._main())

    async def wait(self) -> None:
        """Until the replicator ends (stop, or an error: raised here)."""
        assert self._task is not None
        await asyncio.shield(self._task)

    async def wait_initial(self, timeout: float | None = None) -> None:
        """Until every disk's initial copy is durable at the receiver."""
        async with asyncio.timeout(timeout):
            while not all(run.state.initial_done for run in self._runs):
                if self._task is not None and self._task.done():
                    self._task.result()
                    raise RuntimeError("the replicator stopped before the initial copy ended")
                await asyncio.sleep(0.05)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop at the next safe point (not inside a freeze), save state, release."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait({self._task}, timeout=grace)
            if not self._task.done():
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for run in self._runs:
            await asyncio.to_thread(run.close)
            await asyncio.to_thread(save, self.state_dir, run.state)
        self._acks.listener = None
        self.phase = "stopped"

    # -- main --------------------------------------------------------------------

    async def _main(self) -> None:
        saver = asyncio.create_task(self._saver())
        try:
            self.phase = "connecting"
            await self._wait_opened()
            self.phase = "initial-sync"
            for run in self._runs:
                await asyncio.to_thread(self._start_tracking, run)
            copies = [asyncio.create_task(self._initial_copy(run)) for run in self._runs]
            try:
                await asyncio.gather(*copies)
            finally:
                for task in copies:
                    task.cancel()
            if self._stopping.is_set():
                return
            self.phase = "replicating"
            await self._delta_loop()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            self.phase = "failed"
            log.exception("machine %s: replication stopped", self.machine_id)
            raise
        finally:
            saver.cancel()
            await asyncio.gather(saver, return_exceptions=True)

    async def _wait_opened(self) -> None:
        """Sequence numbers continue after the receiver's durable sequence, which only
        its DISK_OPENED tells: submitting earlier could reuse a number it already holds
        (the window would then drop our new bytes as already acknowledged)."""
        for run in self._runs:
            while run.disk_id not in self._acks.seen:
                if self._stopping.is_set():
                    return
                await asyncio.sleep(0.05)
            durable = self.sender.acked_seq(run.disk_id)
            if durable < run.state.acked_seq:
                log.error(
                    "%s: receiver is durable up to %d but acknowledged %d before; copying again",
                    run.disk_id, durable, run.state.acked_seq,
                )  # fmt: skip
                run.state.initial_offset, run.state.initial_done = 0, False
            run.state.acked_seq = durable
            run.seq = durable

    def _start_tracking(self, run: DiskRun) -> None:
        """Tracker first, then the readers; a fresh tracker's gap is the part of the disk
        a previous run already copied (the rest is about to be copied anyway)."""
        run.tracker = self._factory(run.disk)
        run.tracker.start()
        run.open_device(self.chunk)
        if run.state.initial_done:
            done = run.state.size
        else:
            done = run.state.initial_offset - run.state.initial_offset % self.chunk
        run.state.initial_offset = min(run.state.initial_offset, done)
        run.resumed_from = done
        gap = run.tracker.needs_resync()
        if gap is not None and done:
            run.add_gap(gap, done)

    async def _saver(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            for run in self._runs:
                if run.unsaved:
                    run.unsaved = False
                    await asyncio.to_thread(save, self.state_dir, run.state.snapshot())

    def _on_ack(self, disk_id: str, seq: int) -> None:
        run = self._by_id.get(disk_id)
        if run is not None:
            run.acked(seq)

    # -- initial copy ------------------------------------------------------------

    async def _initial_copy(self, run: DiskRun) -> None:
        if run.state.initial_done:
            return
        assert run.reader is not None
        size = run.state.size
        offset = run.state.initial_offset
        run.copy_started = time.monotonic()
        while offset < size and not self._stopping.is_set():
            length = min(self.chunk, size - offset)
            data = await asyncio.to_thread(run.reader.read, offset, length)
            end = offset + length
            run.copy_read += length
            if data.count(0) == length:
                run.skipped(end)
            else:
                run.seq += 1
                run.initial_frame(run.seq, end)
                await self.sender.submit(Data.raw(run.disk_id, run.seq, offset, data))
                run.bytes_sent += length
            run.read_offset = offset = end
        if offset >= size:
            run.read_done()
            log.info("%s: initial copy read (%d bytes sent)", run.disk_id, run.bytes_sent)

    # -- deltas and tags ---------------------------------------------------------

    async def _delta_loop(self) -> None:
        loop = asyncio.get_running_loop()

        def written() -> None:  # in a tracker's reader thread
            with contextlib.suppress(RuntimeError):  # the loop closed: we are stopping
                loop.call_soon_threadsafe(self._written.set)

        for run in self._runs:
            if isinstance(run.tracker, TracefsTracker):
                run.tracker.on_dirty = written
        for run in self._runs:
            if run.gap is not None:
                await self._resync(run, run.gap)
                run.gap = None
        next_tag = time.monotonic()  # a first point as soon as possible
        wanted = True  # a point asked for (and the first one): retried until taken
        while not self._stopping.is_set():
            if self._group_wanted is not None:  # first: the other members are waiting
                (barrier, future), self._group_wanted = self._group_wanted, None
                if future.done():  # its asker gave up (left the group): a stale slot
                    continue
                self._tag_now.clear()
                await self._check_disks()
                taken = await self._tag_round(TagKind.CRASH, barrier)
                if not future.done():
                    future.set_result(taken)
                next_tag = time.monotonic() + self.tag_interval
                continue
            if self._resync_wanted is not None:
                generation, self._resync_wanted = self._resync_wanted, None
                for run in self._runs:
                    await self._resync(run, DirtyMap.full(run.state.size, self.chunk))
                self.resync_done = generation
            if not self._tag_now.is_set() and time.monotonic() < next_tag:
                await self._live_round()
                await self._nap(min(BUSY_INTERVAL, next_tag - time.monotonic()))
                remaining = next_tag - time.monotonic()
                if remaining > 0 and not self._tag_now.is_set():
                    await self._nap(min(SEND_INTERVAL, remaining), self._written)
                    continue
            wanted = wanted or self._tag_now.is_set()
            self._tag_now.clear()
            await self._check_disks()
            taken = await self._tag_round(self._app_due(), lead_in=True)
            wanted = wanted and taken is None
            next_tag = time.monotonic() + (min(TAG_RETRY, self.tag_interval) if wanted
                                           else self.tag_interval)  # fmt: skip

    async def _live_round(self) -> None:
        """Drain every disk live and send what it found."""
        self._written.clear()  # before the drains: a write after them wakes the next
        for run, dirty in await self._drain_live():
            await self._send_dirty(run, dirty)

    async def _drain_live(self) -> list[tuple[DiskRun, DirtyMap]]:
        """Each disk's live drain with what was pending for it, where not empty."""
        drained = []
        for run in self._runs:
            dirty = run.take_pending(await asyncio.to_thread(run.live_drain))
            if dirty:
                drained.append((run, dirty))
        return drained

    async def _nap(self, seconds: float, *also: asyncio.Event) -> None:
        """Sleep until `seconds` pass, a stop, a requested tag, or one of `also`."""
        if seconds <= 0:
            return
        events = (self._stopping, self._tag_now, *also)
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    async def _resync(self, run: DiskRun, ranges: DirtyMap) -> None:
        if not ranges:
            return
        if self._remote_digests is None:
            log.warning(
                "%s: %d chunks need a checksum resync, which is not wired yet: re-sending them",
                run.disk_id, ranges.count,
            )  # fmt: skip
            run.pending_merge(ranges)
            run.resent_chunks += ranges.count
            return
        if ranges.chunk != DIGEST_CHUNK:
            # The remote digests are of DIGEST_CHUNK pieces (agent.remote): local digests
            # of other sizes would never match them, and everything would be sent again.
            fine = DirtyMap(ranges.size, DIGEST_CHUNK)
            for offset, length in ranges.extents():
                fine.mark(offset, length)
            ranges = fine
        differ = await asyncio.to_thread(
            differing_chunks, run.disk.path, ranges, self._remote_digests(run.disk_id)
        )
        log.info("%s: resync: %d of %d chunks differ", run.disk_id, differ.count, ranges.count)
        run.resync_checked += ranges.count
        run.pending_merge(differ)

    async def _send_dirty(self, run: DiskRun, dirty: DirtyMap | None) -> None:
        """Read `dirty` (plus anything pending) live and send it, untagged. Extents are
        read in batches of up to SEND_BATCH bytes per worker-thread hop (at 4 KiB
        granularity a hop per extent cost more than the read), each batch packed."""
        dirty = run.take_pending(dirty)
        if dirty is None or not dirty:
            return
        started, sent = time.monotonic(), run.bytes_sent
        for batch in batches(dirty.extents(), self.chunk, SEND_BATCH):
            await self._send_extents(run, batch, await self._read(run, batch))
        log.debug("%s: %d bytes sent live in %.3f s", run.disk_id, run.bytes_sent - sent,
                  time.monotonic() - started)  # fmt: skip

    def _app_failed(self, reason: str) -> None:
        log.warning("machine %s: app-consistent point skipped: %s", self.machine_id, reason)
        self.app_failure = reason
        self._next_app = time.monotonic() + min(self.app_interval or APP_RETRY, APP_RETRY)

    async def _read(self, run: DiskRun, batch: list[tuple[int, int]]) -> memoryview:
        """`run.read_extents` in a worker thread, timed for `Pacing`."""
        started = time.monotonic()
        data = await asyncio.to_thread(run.read_extents, batch)
        self._pacing.read(len(data), time.monotonic() - started)
        return data

    async def _send_extents(
        self, run: DiskRun, extents: Iterable[tuple[int, int]], data: memoryview
    ) -> None:
        """`extents` (ascending), their bytes back to back in `data`: packed into EXTENTS
        messages (`agent.packing`), one sequence number each."""
        for packed in pack(extents, data, max_payload=min(self.chunk, MAX_PAYLOAD)):
            run.seq += 1
            await self.sender.submit(packed.message(run.disk_id, run.seq))
            run.bytes_sent += packed.raw_bytes

    async def _check_disks(self) -> None:
        """Before each tag: every disk is still the same medium of the same size
        (DeviceGone / DeviceResized end replication with the reason), and the freeze
        list follows what is mounted now, not what was mounted at start."""
        for run in self._runs:
            run.disk = await asyncio.to_thread(refresh, run.disk)

    def _app_due(self) -> TagKind:
        if self.app_interval is None or time.monotonic() < self._next_app:
            return TagKind.CRASH
        return TagKind.APP

    async def _capture(
        self, kind: TagKind, hook: Callable[[], None] | None, hold: Callable[[float], bool] | None
    ) -> list[Capture | Untagged] | None:
        """The freeze and capture in a worker thread. None: the app point's pre-script
        failed (retry it later, take a crash point now); []: nothing was drained, so
        there is no point this round (the trackers still hold everything)."""
        mounts = sorted({str(m.mount_point) for run in self._runs for m in run.disk.mounts})
        targets: list[tuple[Tracker, int]] = []
        for run in self._runs:
            assert run.tracker is not None
            targets.append((run.tracker, run.fd))
        app = kind is TagKind.APP
        try:
            return await asyncio.to_thread(
                capture_machine, targets, mounts, self.freeze_timeout,
                budget=self.capture_budget, read_rate=self._read_rate, on_frozen=hook,
                pre=self.pre_script if app else None, post=self.post_script if app else None,
                hold=hold,
            )  # fmt: skip
        except AgentError as err:  # nothing was drained: the trackers still hold it all
            if app:
                # A broken pre-script must not cost the crash-consistent points: retry
                # the app-consistent one later, take a crash-consistent one now.
                self._app_failed(err.message)
                return None
            for run in self._runs:
                run.untagged(err.message)
            return []

    async def _tag_round(
        self, kind: TagKind = TagKind.CRASH, barrier: GroupBarrier | None = None, *,
        lead_in: bool = False,
    ) -> str | None:  # fmt: skip
        """One freeze and capture; the tag id emitted on every disk (None: no point).
        With `lead_in`, the trackers are drained live first and that is read and sent
        before the tag, its last part while the freeze is being taken (`agent.lead_in`)."""
        tag_id = uuid.uuid4().hex
        started = time.monotonic()
        app = kind is TagKind.APP
        if barrier is not None and self.unheld_disks():
            barrier = None  # writes the freeze cannot stop: never arrive "frozen"
        hook = None
        if self._on_frozen is not None or barrier is not None:
            on_frozen = self._on_frozen

            def hook() -> None:
                nonlocal tag_id
                if barrier is not None:  # what is left of the bound, from before syncfs
                    elapsed = time.monotonic() - capture_started
                    left = self.freeze_timeout - elapsed - BARRIER_MARGIN
                    tag_id = barrier(max(0.0, left)) or tag_id
                if on_frozen is not None:
                    on_frozen(tag_id)

        drained = await self._drain_live() if lead_in else []
        # Only a plain crash point overlaps: no scripts (their time is not the freeze's),
        # no group barrier, and every disk's writes stopped by the freeze (lead_in's proof).
        overlap = kind is TagKind.CRASH and barrier is None and not self.unheld_disks()
        tail_bytes = self._pacing.tail_bytes(self.capture_budget // 4) if overlap else 0
        sets = [(run, list(dirty.extents())) for run, dirty in drained]
        head, tail = split_tail(sets, self.chunk, tail_bytes, SEND_BATCH)
        for run, batch in head:
            await self._send_extents(run, batch, await self._read(run, batch))
        gate = ReadGate(BARRIER_MARGIN) if overlap else None
        capture_started = time.monotonic()
        capture = asyncio.ensure_future(
            self._capture(kind, hook, None if gate is None else gate.hold)
        )
        read: list[tuple[DiskRun, list[tuple[int, int]], memoryview]] = []
        ended = False
        try:
            for run, batch in tail:
                read.append((run, batch, await self._read(run, batch)))
            ended = True
        finally:
            if gate is not None:
                gate.end(ended)  # a failed read gives the point up at once, frozen or not
            if not ended:  # the error goes on up; no freeze is left running behind it
                await asyncio.wait({capture})
        for run, batch, data in read:  # before the capture's data: they are older
            await self._send_extents(run, batch, data)
        results = await capture
        if results is None:  # the pre-script failed: a crash-consistent point instead
            return await self._tag_round(TagKind.CRASH)
        if not results:
            return None
        if gate is not None and gate.held_at is not None:
            self._pacing.lead = gate.held_at - capture_started
        if all(isinstance(r, Capture) for r in results):
            copied = sum(r.nbytes for r in results if isinstance(r, Capture))
            seconds = sum(r.copy_seconds for r in results if isinstance(r, Capture))
            if seconds > 0.01:
                self._read_rate = copied / seconds
            now = time.time_ns()
            log.debug("tag %s: %d bytes copied in %.3f s, frozen %.3f s, round %.3f s",
                      tag_id, copied, seconds, max(r.freeze_seconds for r in results
                                                   if isinstance(r, Capture)),
                      time.monotonic() - started)  # fmt: skip
            for run, result in zip(self._runs, results, strict=True):
                assert isinstance(result, Capture)
                await self._send_extents(run, result.dirty.extents(), result.data)
                run.seq += 1
                await self.sender.submit(Tag(run.disk_id, run.seq, tag_id, kind, now))
                run.tagged(tag_id, run.seq, now, result.freeze_seconds)
            if app:
                self.last_app_tag_ns, self.app_failure = now, None
                self._next_app = time.monotonic() + (self.app_interval or 0.0)
            return tag_id
        if app:
            self._app_failed(next(r.reason for r in results if not isinstance(r, Capture)))
        for run, result in zip(self._runs, results, strict=True):
            assert not isinstance(result, Capture)
            run.untagged(result.reason)
            await self._send_dirty(run, result.dirty)
            if result.resync is not None:
                await self._resync(run, result.resync)
        return None
