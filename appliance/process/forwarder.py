"""Spool → optimise → throttle → master target, one task per disk over one connection.

Each disk's task reads durable records after the last sequence it handed on, turns
every DATA into the cheapest equivalent (ZERO for zeros, SAME for an identical write
still in flight, zstd when it pays) and every EXTENTS into one message the same way
(zero extents made ZERO, the payload one zstd frame), waits for its fair share of the
bandwidth (in wire bytes), and submits it to the `StreamSender`, whose window bounds
what is in flight. ACKs from the master target release spool segments (on the I/O
pool, coalesced per disk) and wake the intake if that made room.

After a restart the task starts at the spool's `target_acked_seq`; the sender skips
what the master target reports durable when it reopens the disk, and the master
target ignores any other resend, so forwarding is idempotent end to end.

An agent's DIGEST_REQUEST is relayed with the guarantee the master target gives for
its own connections: the digests describe everything the agent sent before it. The
service passes the disk's appended sequence S at the request (`relay`); the lane
queues the request in the sender's window once every record <= S was submitted (or
is durable at the master target) and before it submits any record after S, so the
request travels in the disk's order, and keeps it across reconnects (the sender
resends it in place).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from appliance.process.errors import SpoolCorrupt
from appliance.process.health import Condition, Health
from appliance.process.optimize import InflightDedupe, Optimizer
from appliance.process.records import SpoolMessage
from appliance.process.spool import SpoolStream
from appliance.process.throttle import FairShare
from appliance.wire.errors import ShuttingDown, StorageFailure, WireError
from appliance.wire.messages import Data, DigestReply, DigestRequest, Encoding, Extents, Tag
from appliance.wire.sender import StreamSender

log = logging.getLogger(__name__)

READ_BYTES = 4 * 1024 * 1024  # spool bytes a lane reads per step at most: a few frames
# What all lanes with a backlog read per step together: many disks draining at once
# share it (at least MIN_READ_BYTES, or one record, each) rather than reading
# READ_BYTES each (bench_processd, 100 backlogs drained at once: processd's peak RSS
# 346 -> 257-265 MiB).
READ_BUDGET = 32 * 1024 * 1024
MIN_READ_BYTES = 256 * 1024


def read_size(draining: int) -> int:
    """Bytes one lane reads per step while `draining` lanes (itself included) have a
    backlog."""
    return max(MIN_READ_BYTES, min(READ_BYTES, READ_BUDGET // max(1, draining)))


@dataclass
class ForwardStats:
    frames_out: int = 0
    extents_frames: int = 0  # EXTENTS among frames_out
    bytes_raw: int = 0  # decoded bytes handed on
    bytes_wire: int = 0  # bytes on the wire after optimisation
    same: int = 0
    forwarded_seq: int = 0


@dataclass(eq=False)
class _Relay:
    """A digest request waiting until its lane has submitted every record <= after."""

    after: int
    request: DigestRequest
    reply: asyncio.Future[DigestReply]


@dataclass
class _Lane:
    stream: SpoolStream
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    dedupe: InflightDedupe = field(default_factory=InflightDedupe)
    stats: ForwardStats = field(default_factory=ForwardStats)
    release_to: int = 0
    releasing: bool = False
    task: asyncio.Task[None] | None = None
    submitted: int = 0  # every record up to here is with the sender (or durable)
    relays: list[_Relay] = field(default_factory=list)  # in order of `after`


class Forwarder:
    def __init__(  # noqa: PLR0917 - the forwarder's parts, each its own object
        self,
        sender: StreamSender,
        optimizer: Optimizer,
        fair: FairShare,
        pool: Executor,
        health: Health,
        on_released: Callable[[], None],
    ) -> None:
        self.sender = sender
        self.optimizer = optimizer
        self.fair = fair
        self._pool = pool
        self.health = health
        self._on_released = on_released
        self._lanes: dict[str, _Lane] = {}
        self.draining = 0  # lanes with durable records still to hand on

    def add(self, stream: SpoolStream) -> None:
        if stream.disk_id in self._lanes:
            return
        lane = _Lane(stream, release_to=stream.target_acked_seq)
        lane.submitted = stream.target_acked_seq
        self._lanes[stream.disk_id] = lane
        self.sender.add_disk(stream.disk_id, stream.machine_id, stream.size)
        lane.task = asyncio.create_task(self._forward(lane), name=f"forward-{stream.disk_id}")
        lane.task.add_done_callback(functools.partial(self._lane_ended, lane))

    def relay(self, request: DigestRequest, after: int) -> asyncio.Future[DigestReply]:
        """Send `request` to the master target right after record `after` of its disk
        (the disk's last appended sequence when the agent asked); the future gives the
        reply, or the WireError that ended forwarding first.

        Synchronous on purpose: the caller registers it before it reads, and appends,
        the agent's next frame, so no later record can get ahead of it."""
        lane = self._lanes[request.disk_id]
        reply: asyncio.Future[DigestReply] = asyncio.get_running_loop().create_future()
        if lane.task is None or lane.task.done():
            reply.set_exception(StorageFailure(f"disk {request.disk_id}: forwarding stopped"))
            return reply
        # The spool's appended sequence never goes back, so the list is ordered by
        # `after` already; the max makes sure of what `_queue_relays` relies on (it
        # looks at the head only). Waiting for more records is never wrong.
        after = max(after, lane.relays[-1].after) if lane.relays else after
        lane.relays.append(_Relay(after, request, reply))
        lane.wakeup.set()  # an idle lane queues it now
        return reply

    async def _queue_relays(self, lane: _Lane) -> None:
        """Hand the sender the requests whose records are all submitted, in order."""
        disk = lane.stream.disk_id
        while lane.relays:
            relay = lane.relays[0]
            if relay.after > max(lane.submitted, self.sender.acked_seq(disk)):
                return
            lane.relays.pop(0)
            if relay.reply.done():
                continue  # the agent's connection went away meanwhile
            try:
                inner = await self.sender.queue_request(relay.request)
            except (WireError, OSError) as exc:  # the sender stopped for good
                relay.reply.set_exception(exc)
                continue
            _chain(inner, relay.reply)

    def _fail_relays(self, lane: _Lane, error: WireError) -> None:
        relays, lane.relays = lane.relays, []
        for relay in relays:
            if not relay.reply.done():
                relay.reply.set_exception(error)

    def _lane_ended(self, lane: _Lane, task: asyncio.Task[None]) -> None:
        # Nothing will queue its waiting requests any more: answer them.
        self._fail_relays(lane, StorageFailure(f"{task.get_name()} stopped"))
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # a bug: say it once, loudly, with the traceback
            log.error("%s stopped", task.get_name(), exc_info=error)

    def wake(self, disk_id: str) -> None:
        lane = self._lanes.get(disk_id)
        if lane is not None:
            lane.wakeup.set()

    def stats(self, disk_id: str) -> ForwardStats | None:
        lane = self._lanes.get(disk_id)
        return lane.stats if lane else None

    async def close(self) -> None:
        tasks = [lane.task for lane in self._lanes.values() if lane.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self._lanes.values():
            self._fail_relays(lane, ShuttingDown("the process server is stopping"))
        await self.sender.close()  # fails the requests already queued in the sender

    def on_ack(self, disk_id: str, seq: int) -> None:
        """StreamSender's hook: the master target made everything <= seq durable."""
        lane = self._lanes.get(disk_id)
        if lane is None:
            return
        lane.dedupe.acked(seq)
        self.health.clear(Condition.TARGET_UNREACHABLE)  # an ACK proves the link works
        if seq > lane.release_to:
            lane.release_to = seq
            if not lane.releasing:
                lane.releasing = True
                asyncio.get_running_loop().create_task(self._release(lane))

    async def _release(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        try:
            done = 0
            while done < lane.release_to:
                done = lane.release_to
                await loop.run_in_executor(self._pool, lane.stream.release, done)
        finally:
            lane.releasing = False
        self._on_released()

    async def _forward(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        stream = lane.stream
        after = stream.target_acked_seq
        draining = False
        try:
            while True:
                await self._queue_relays(lane)
                if stream.durable_seq <= after:
                    if draining:
                        draining, self.draining = False, self.draining - 1
                    lane.wakeup.clear()
                    if stream.durable_seq <= after:
                        await lane.wakeup.wait()
                    continue
                if not draining:
                    draining, self.draining = True, self.draining + 1
                step = await self._step(lane, loop, after)
                if step is None:
                    return  # forwarding this disk stops (the health condition says why)
                after = step
        finally:
            if draining:
                self.draining -= 1

    async def _step(self, lane: _Lane, loop: asyncio.AbstractEventLoop, after: int) -> int | None:
        """Read, optimise and submit the records after `after`; the new `after`, or None
        when forwarding this disk must stop."""
        stream, disk = lane.stream, lane.stream.disk_id
        try:
            size = read_size(self.draining)
            records = await loop.run_in_executor(self._pool, stream.read, after, size)
        except SpoolCorrupt as exc:
            self.health.raise_(Condition.SPOOL_CORRUPT, f"disk {disk}: {exc}")
            return None  # a resync from the agent repairs it
        for run in _runs(records):
            if isinstance(run, Tag):
                await self._queue_relays(lane)
                if run.seq > self.sender.acked_seq(disk):
                    await self.sender.submit(run)
                    lane.stats.frames_out += 1
                lane.stats.forwarded_seq = lane.submitted = after = run.seq
                continue
            # Several extents compress at once (both workers busy on one disk) while the
            # output keeps the spool's order.
            async for out in self.optimizer.encode_stream(self._prepare(lane, run)):
                # Before each frame: a request that must follow the ones already
                # submitted goes first (a skipped, durable frame needs no wait).
                lane.submitted = max(lane.submitted, out.seq - 1)
                await self._queue_relays(lane)
                await self.fair.acquire(disk, out.wire_size)
                await self.sender.submit(out)
                lane.stats.frames_out += 1
                lane.stats.extents_frames += isinstance(out, Extents)
                lane.stats.bytes_wire += out.wire_size
                lane.stats.forwarded_seq = lane.submitted = out.seq
            lane.submitted = after = run[-1].seq
        return after

    async def _prepare(
        self, lane: _Lane, run: list[Data | Extents]
    ) -> AsyncIterator[Data | Extents]:
        """A run of DATA and EXTENTS in order, DATA deduplicated."""
        disk = lane.stream.disk_id
        for msg in run:
            if msg.seq <= self.sender.acked_seq(disk):
                continue  # the master target has it already (e.g. after our restart)
            lane.stats.bytes_raw += msg.length
            # Every message is recorded, whatever its encoding: a ZERO (or an EXTENTS)
            # between two identical RAW writes must stop the second from becoming SAME.
            if isinstance(msg, Extents):
                lane.dedupe.sent(msg)
                yield msg
            elif lane.dedupe.admit(msg):
                yield msg
            else:
                lane.stats.same += 1
                yield Data(msg.disk_id, msg.seq, msg.offset, msg.length, Encoding.SAME, b"")


def _runs(records: list[SpoolMessage]) -> Iterator[list[Data | Extents] | Tag]:
    """Split records into runs of DATA and EXTENTS and the single tags between them."""
    run: list[Data | Extents] = []
    for msg in records:
        if isinstance(msg, Tag):
            if run:
                yield run
                run = []
            yield msg
        else:
            run.append(msg)
    if run:
        yield run


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    """Resolve `target` as `source` resolves (a cancelled target cancels `source`)."""

    def copy(done: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif (error := done.exception()) is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result())

    def give_up(done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            source.cancel()

    source.add_done_callback(copy)
    target.add_done_callback(give_up)
