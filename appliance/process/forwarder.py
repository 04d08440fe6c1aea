"""Spool → optimise → throttle → master target, one task per disk over one connection.

Each disk's task reads durable records after the last sequence it handed on, turns
every DATA into the cheapest equivalent (ZERO for zeros, SAME for an identical write
still in flight, zstd when it pays), waits for its fair share of the bandwidth, and
submits it to the `StreamSender`, whose window bounds what is in flight. ACKs from
the master target release spool segments (on the I/O pool, coalesced per disk) and
wake the intake if that made room.

After a restart the task starts at the spool's `target_acked_seq`; the sender skips
what the master target reports durable when it reopens the disk, and the master
target ignores any other resend, so forwarding is idempotent end to end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

from appliance.process.errors import SpoolCorrupt
from appliance.process.health import Condition, Health
from appliance.process.optimize import InflightDedupe, Optimizer
from appliance.process.spool import SpoolStream
from appliance.process.throttle import FairShare
from appliance.wire.messages import Data, Encoding, Tag
from appliance.wire.sender import StreamSender

log = logging.getLogger(__name__)

READ_BYTES = 4 * 1024 * 1024  # spool bytes read per step: a few frames, bounded memory


@dataclass
class ForwardStats:
    frames_out: int = 0
    bytes_raw: int = 0  # decoded bytes handed on
    bytes_wire: int = 0  # bytes on the wire after optimisation
    same: int = 0
    forwarded_seq: int = 0


@dataclass
class _Lane:
    stream: SpoolStream
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    dedupe: InflightDedupe = field(default_factory=InflightDedupe)
    stats: ForwardStats = field(default_factory=ForwardStats)
    release_to: int = 0
    releasing: bool = False
    task: asyncio.Task[None] | None = None


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

    def add(self, stream: SpoolStream) -> None:
        if stream.disk_id in self._lanes:
            return
        lane = _Lane(stream, release_to=stream.target_acked_seq)
        self._lanes[stream.disk_id] = lane
        self.sender.add_disk(stream.disk_id, stream.machine_id, stream.size)
        lane.task = asyncio.create_task(self._forward(lane), name=f"forward-{stream.disk_id}")
        lane.task.add_done_callback(self._lane_ended)

    def _lane_ended(self, task: asyncio.Task[None]) -> None:
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
        await self.sender.close()

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
        stream, disk = lane.stream, lane.stream.disk_id
        after = stream.target_acked_seq
        while True:
            if stream.durable_seq <= after:
                lane.wakeup.clear()
                if stream.durable_seq <= after:
                    await lane.wakeup.wait()
                continue
            try:
                records = await loop.run_in_executor(self._pool, stream.read, after, READ_BYTES)
            except SpoolCorrupt as exc:
                self.health.raise_(Condition.SPOOL_CORRUPT, f"disk {disk}: {exc}")
                return  # forwarding this disk stops; a resync from the agent repairs it
            for run in _runs(records):
                if isinstance(run, Tag):
                    if run.seq > self.sender.acked_seq(disk):
                        await self.sender.submit(run)
                        lane.stats.frames_out += 1
                    lane.stats.forwarded_seq = after = run.seq
                    continue
                # Several extents compress at once (both workers busy on one disk)
                # while the output keeps the spool's order.
                async for out in self.optimizer.encode_stream(self._prepare(lane, run)):
                    await self.fair.acquire(disk, out.wire_size)
                    await self.sender.submit(out)
                    lane.stats.frames_out += 1
                    lane.stats.bytes_wire += out.wire_size
                    lane.stats.forwarded_seq = out.seq
                after = run[-1].seq

    async def _prepare(self, lane: _Lane, run: list[Data]) -> AsyncIterator[Data]:
        """A run of DATA in order, deduplicated."""
        disk = lane.stream.disk_id
        for msg in run:
            if msg.seq <= self.sender.acked_seq(disk):
                continue  # the master target has it already (e.g. after our restart)
            lane.stats.bytes_raw += msg.length
            # Every DATA is recorded, whatever its encoding: a ZERO between two identical
            # RAW writes must stop the second from becoming SAME.
            if lane.dedupe.admit(msg):
                yield msg
            else:
                lane.stats.same += 1
                yield Data(msg.disk_id, msg.seq, msg.offset, msg.length, Encoding.SAME, b"")


def _runs(records: list[Data | Tag]) -> Iterator[list[Data] | Tag]:
    """Split records into runs of DATA and the single tags between them."""
    run: list[Data] = []
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
