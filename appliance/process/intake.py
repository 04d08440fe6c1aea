"""The agent-facing side of a process server: frames in, spooled, durable ACKs out.

Each disk has one `IntakeStream`; the connection that opened it last owns it. Frames
are checked on the event loop (sequence, window) and appended to the spool in memory;
a commit task per disk writes and fdatasyncs everything pending in one go (group
commit) on a small thread pool, then ACKs the agent with the durable sequence and wakes
the forwarder. Nothing is acknowledged before it is on disk.

Back-pressure: when the spool reaches its limit or its filesystem is full, the shared
`space` event is cleared and connection handlers stop reading DATA and EXTENTS (their
bounded inbound queues fill, TCP pushes back, agents slow down); nothing is dropped.
The event is set again when the master target's ACKs free spool segments or a retried
commit goes through.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from appliance.process.errors import StorageFull
from appliance.process.health import Condition, Health
from appliance.process.records import SpoolMessage
from appliance.process.spool import SpoolStream
from appliance.wire.connection import Connection
from appliance.wire.errors import OutOfWindow, ProtocolViolation, WindowExceeded
from appliance.wire.messages import Ack, Tag

log = logging.getLogger(__name__)

DISK_FULL_RETRY = 0.5  # seconds between commit attempts while the filesystem is full


@dataclass
class IntakeStats:
    frames_in: int = 0
    bytes_in: int = 0
    duplicates: int = 0
    commits: int = 0


@dataclass
class IntakeStream:
    spool: SpoolStream
    window_bytes: int
    pool: Executor
    health: Health
    space: asyncio.Event
    on_durable: Callable[[IntakeStream], None]
    owner: Connection | None = None
    acked_seq: int = 0
    stats: IntakeStats = field(default_factory=IntakeStats)
    _unacked: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)
    _unacked_bytes: int = 0
    _dirty: asyncio.Event = field(default_factory=asyncio.Event)
    _settled: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    @property
    def disk_id(self) -> str:
        return self.spool.disk_id

    def start(self) -> None:
        self.acked_seq = self.spool.durable_seq
        self._settled.set()
        self._task = asyncio.create_task(self._commit_loop(), name=f"commit-{self.disk_id}")

    async def stop(self) -> None:
        await self.settle()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def attach(self, conn: Connection) -> int:
        """Make `conn` the owner; return the durable sequence it must resend after."""
        previous, self.owner = self.owner, conn
        if previous is not None and previous is not conn:
            log.info("disk %s: taken over by %s", self.disk_id, conn.peer)
            previous.close()
        await self.settle()
        self._unacked.clear()
        self._unacked_bytes = 0
        return self.spool.durable_seq

    def detach(self, conn: Connection) -> None:
        if self.owner is conn:
            self.owner = None

    async def settle(self) -> None:
        """Wait until everything appended is durable."""
        while self.spool.appended_seq > self.spool.durable_seq:
            self._settled.clear()
            self._dirty.set()
            await self._settled.wait()

    def accept(self, conn: Connection, msg: SpoolMessage) -> bool:
        """Check a frame (DATA, EXTENTS or TAG) and append it to the spool in memory as
        one record; False for a resend. The window counts payload bytes as on the wire.

        Raises SpoolFull (from the spool) with nothing appended: the caller waits for
        space and offers the same frame again."""
        if conn is not self.owner:
            raise ProtocolViolation(f"disk {self.disk_id} is not open on this connection")
        if msg.seq <= self.spool.appended_seq:
            self.stats.duplicates += 1
            return False
        if msg.seq != self.spool.appended_seq + 1:
            raise OutOfWindow(
                f"disk {self.disk_id}: sequence {msg.seq} after {self.spool.appended_seq}"
            )
        size = 0 if isinstance(msg, Tag) else msg.wire_size
        if self._unacked_bytes and self._unacked_bytes + size > self.window_bytes:
            raise WindowExceeded(
                f"disk {self.disk_id}: {self._unacked_bytes + size} unacknowledged bytes, "
                f"window is {self.window_bytes}"
            )
        self.spool.append(msg)
        self.stats.frames_in += 1
        self.stats.bytes_in += size
        self._unacked.append((msg.seq, size))
        self._unacked_bytes += size
        self._dirty.set()
        return True

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                durable = await loop.run_in_executor(self.pool, self.spool.commit)
            except StorageFull as exc:
                # What fitted is durable: acknowledge and forward it, so the master
                # target's ACKs can free the space the rest is waiting for.
                self.health.raise_(Condition.DISK_FULL, str(exc))
                self.space.clear()
                self._acknowledge(self.spool.durable_seq)
                self.on_durable(self)
                await asyncio.sleep(DISK_FULL_RETRY)
                self._dirty.set()
                continue
            self.stats.commits += 1
            if self.health.active(Condition.DISK_FULL):
                self.health.clear(Condition.DISK_FULL)
                if not self.health.active(Condition.SPOOL_FULL):
                    self.space.set()
            self._acknowledge(durable)
            if self.spool.appended_seq == self.spool.durable_seq:
                self._settled.set()
            self.on_durable(self)

    def _acknowledge(self, durable: int) -> None:
        if durable <= self.acked_seq:
            return
        self.acked_seq = durable
        while self._unacked and self._unacked[0][0] <= durable:
            self._unacked_bytes -= self._unacked.popleft()[1]
        if self.owner is not None:
            self.owner.send_nowait(Ack(self.disk_id, durable))
