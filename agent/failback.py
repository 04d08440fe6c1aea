"""Failback: bring this machine's disks level with their replicas, fetching only what differs.

After a committed failover the VM at the secondary site ran on the replica disks and
wrote to them; the original machine's disks hold older data. Failback reverses the
direction once: with the disks not in use, the agent digests every chunk locally
(`agent.resync.compare`, the checksum-resync code), asks the master target for the
replica's digests of the same chunks (DIGEST_REQUEST), fetches only the chunks that
differ (READ_REQUEST, at most `MAX_INFLIGHT` in flight), writes them in place and
fdatasyncs. Then both sides hold the same bytes, and normal protection resumes with a
checksum resync that finds nothing to send. What crosses the wire is one digest per
chunk (24 bytes per 64 KiB) plus the changed chunks, not the disk.

Refused, before anything is written: a disk that is mounted at all (even read-only: a
filesystem's cached view of a device rewritten underneath it is wrong, and the kernel
may write it back), here or in any other mount namespace, and a replica whose durable
sequence is 0 (it never received anything: an older master target's OPEN_DISK may
have created it empty, and "failing back" from it would wipe the disk).

A mount namespace made while the disk was mounted (a container, a service with private
mounts) keeps its filesystem alive after the umount here; mounting the disk again then
shares that filesystem and its cache, which shows a file rewritten in place by the
failback as it was before. Only an exclusive open (O_EXCL on a block device: EBUSY
while anything holds it) sees such a holder; each disk's failback holds that claim
from its comparison to its last write, so nothing mounts the disk meanwhile.

The connection goes straight to the master target (the agent's certificate is signed
by the CA it trusts), as a failback reader (`appliance.target.roles.FAILBACK_ROLE`):
the target lets it open only a replica a failover fenced, and beside the process
server's stream rather than taking it over. (A takeover cut the process server's
connection; its reconnect opened the disk again and cut this one, failing the failback.)
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import ssl
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.discovery import Disk, refresh
from agent.errors import AgentError
from agent.replicator_disk import split
from agent.resync import compare
from agent.trackers.base import CHUNK, DirtyMap
from appliance.settings import parse_host_port
from appliance.target.roles import FAILBACK_ROLE
from appliance.wire.connection import Connection, open_connection
from appliance.wire.errors import ConnectionClosed, ProtocolViolation, WireError
from appliance.wire.messages import (
    MAX_READ,
    Ack,
    DigestReply,
    DigestRequest,
    DiskOpened,
    Hello,
    OpenDisk,
    Ping,
    Pong,
    ReadReply,
    ReadRequest,
    Welcome,
)

log = logging.getLogger(__name__)

# Requests outstanding on the connection: the master target queues at most 4 per
# connection (server.MAX_DIGESTS_IN_FLIGHT) and stops reading beyond that.
MAX_INFLIGHT = 4
OPEN_TIMEOUT = 60.0  # opening a disk waits for its previous owner's queue to settle


class FailbackRefused(AgentError):
    """Failing back now would damage the disk or cannot work; nothing was written."""

    hint = "unmount the protected disks (or boot the machine from a rescue system) and retry"


@dataclass(frozen=True)
class FailbackDisk:
    disk_id: str  # the disk's id at the master target
    path: Path
    size: int


@dataclass
class DiskOutcome:
    disk_id: str
    size: int
    chunks: int = 0  # compared
    differ: int = 0  # fetched and written
    bytes_received: int = 0  # READ_REPLY payload bytes, as sent (zstd or raw)
    bytes_written: int = 0


@dataclass
class FailbackResult:
    disks: list[DiskOutcome] = field(default_factory=list)
    wire_bytes_in: int = 0  # everything the connection received: digests, frames, data
    seconds: float = 0.0

    @property
    def bytes_received(self) -> int:
        return sum(d.bytes_received for d in self.disks)

    @property
    def bytes_written(self) -> int:
        return sum(d.bytes_written for d in self.disks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes_received": self.bytes_received,
            "bytes_written": self.bytes_written,
            "wire_bytes_in": self.wire_bytes_in,
            "seconds": round(self.seconds, 3),
            "disks": [asdict(d) for d in self.disks],
        }


def check_unclaimed(path: Path) -> None:
    """FailbackRefused if the kernel holds block device `path` exclusively although
    nothing is mounted here (see the module docstring)."""
    try:
        os.close(_open_exclusive(path, os.O_RDONLY))
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        raise FailbackRefused(
            f"{path} is in use though not mounted here: a filesystem on it is still "
            "mounted in another mount namespace (a container, a service with private "
            "mounts), or device-mapper, md or swap holds it; failback overwrites it",
            hint="find the holder (e.g. grep the device in /proc/*/mountinfo), stop it, and retry",
        ) from None


def _open_exclusive(path: Path, flags: int) -> int:
    """Open `path`; a block device exclusively (O_EXCL: EBUSY while mounted anywhere or
    otherwise claimed, and no mount can claim it while we hold it)."""
    exclusive = os.O_EXCL if stat.S_ISBLK(os.stat(path).st_mode) else 0
    return os.open(path, flags | exclusive | os.O_CLOEXEC)


def check_unused(disk: Disk, fresh: Callable[[Disk], Disk] = refresh) -> None:
    """FailbackRefused if anything on `disk` (itself, a partition, a device above) is
    mounted now."""
    mounts = fresh(disk).mounts
    if mounts:
        where = ", ".join(f"{m.source} on {m.mount_point}" for m in mounts)
        raise FailbackRefused(f"{disk.path} is in use ({where}); failback overwrites it")


class TargetReader:
    """One connection to a master target: open disks, then digest and read requests.

    A reader task routes the replies to their requests by id; `MAX_INFLIGHT` bounds the
    requests outstanding (so the replies waiting for us are bounded too). A failure of
    the connection fails every waiting request with it.
    """

    def __init__(self, conn: Connection, machine_id: str) -> None:
        self.conn = conn
        self.machine_id = machine_id
        self._ids = itertools.count(1)
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        self._waiting: dict[int, asyncio.Future[DigestReply | ReadReply]] = {}
        self._opened: dict[str, asyncio.Future[DiskOpened]] = {}
        self._error: BaseException | None = None
        self._task = asyncio.create_task(self._route(), name="failback-reader")

    @classmethod
    async def connect(
        cls, address: str, ssl_context: ssl.SSLContext, machine_id: str
    ) -> TargetReader:
        host, port = parse_host_port(address)
        conn = await open_connection(host, port, ssl_context, server_hostname=host)
        try:
            await conn.send(Hello(FAILBACK_ROLE, machine_id))
            welcome = await asyncio.wait_for(conn.recv(), OPEN_TIMEOUT)
            if not isinstance(welcome, Welcome):
                raise ProtocolViolation(f"expected WELCOME, got {type(welcome).__name__}")
        except BaseException:
            conn.close()
            raise
        return cls(conn, machine_id)

    async def close(self) -> None:
        self.conn.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def open(self, disk_id: str, size: int) -> int:
        """Open `disk_id` on this connection; the replica's durable sequence."""
        waiter = asyncio.get_running_loop().create_future()
        self._opened[disk_id] = waiter
        await self.conn.send(OpenDisk(disk_id, self.machine_id, size))
        opened = await asyncio.wait_for(waiter, OPEN_TIMEOUT)
        if opened.size != size:
            raise FailbackRefused(f"replica {disk_id} is {opened.size} bytes, the disk {size}")
        return opened.durable_seq

    async def digests(self, disk_id: str, chunk: int, chunks: Sequence[int]) -> dict[int, bytes]:
        reply = await self._call(lambda rid: DigestRequest(disk_id, rid, chunk, tuple(chunks)))
        assert isinstance(reply, DigestReply)
        return dict(reply.digests)

    async def read(self, disk_id: str, offset: int, length: int) -> ReadReply:
        reply = await self._call(lambda rid: ReadRequest(disk_id, rid, offset, length))
        assert isinstance(reply, ReadReply)
        if (reply.offset, reply.length) != (offset, length):
            raise ProtocolViolation(f"asked for {length} at {offset}, got {reply.length} at "
                                    f"{reply.offset}")  # fmt: skip
        return reply

    async def _call(
        self, make: Callable[[int], DigestRequest | ReadRequest]
    ) -> DigestReply | ReadReply:
        async with self._slots:
            if self._error is not None:
                raise self._error
            request = make(next(self._ids))
            waiter = asyncio.get_running_loop().create_future()
            self._waiting[request.request_id] = waiter
            try:
                await self.conn.send(request)
                return await waiter
            finally:
                self._waiting.pop(request.request_id, None)

    async def _route(self) -> None:
        try:
            while True:
                msg = await self.conn.recv()
                if isinstance(msg, DigestReply | ReadReply):
                    waiter = self._waiting.get(msg.request_id)
                    if waiter is None or waiter.done():
                        raise ProtocolViolation(f"a reply to request {msg.request_id} not made")
                    waiter.set_result(msg)
                elif isinstance(msg, DiskOpened):
                    opened = self._opened.pop(msg.disk_id, None)
                    if opened is not None and not opened.done():
                        opened.set_result(msg)
                elif isinstance(msg, Ping):
                    await self.conn.send(Pong(msg.nonce))
                elif not isinstance(msg, Ack):  # checkpoints of our reads: nothing to do
                    raise ProtocolViolation(f"unexpected {type(msg).__name__} from the target")
        except (WireError, OSError) as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(ConnectionClosed("failback connection closed"))
            raise

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        waiters: list[asyncio.Future[Any]] = [*self._waiting.values(), *self._opened.values()]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(exc)


async def failback(
    reader: TargetReader, disks: Sequence[FailbackDisk], chunk: int = CHUNK
) -> FailbackResult:
    """Make each of `disks` equal to its replica (see the module doc); the figures."""
    started = time.monotonic()
    for disk in disks:
        if await reader.open(disk.disk_id, disk.size) == 0:
            raise FailbackRefused(
                f"the master target's replica of {disk.disk_id} never received any data",
                hint="fail back only a machine whose failover ran on its replica",
            )
    result = FailbackResult()
    for disk in disks:
        result.disks.append(await _disk(reader, disk, chunk))
    result.wire_bytes_in = reader.conn.bytes_in
    result.seconds = time.monotonic() - started
    return result


async def _disk(reader: TargetReader, disk: FailbackDisk, chunk: int) -> DiskOutcome:
    loop = asyncio.get_running_loop()

    def remote(chunks: list[int]) -> dict[int, bytes]:  # from compare's worker thread
        call = reader.digests(disk.disk_id, chunk, chunks)
        return asyncio.run_coroutine_threadsafe(call, loop).result()

    fd = _open_exclusive(disk.path, os.O_WRONLY)
    writes: list[asyncio.Future[None]] = []
    try:
        everything = DirtyMap.full(disk.size, chunk)
        differ = (await asyncio.to_thread(compare, disk.path, everything, remote)).differ
        outcome = DiskOutcome(disk.disk_id, disk.size, everything.count, differ.count)
        log.info("failback %s: %d of %d chunks differ", disk.disk_id, differ.count,
                 everything.count)  # fmt: skip

        async def fetch(offset: int, length: int) -> None:
            reply = await reader.read(disk.disk_id, offset, length)
            data = reply.decoded()
            # Cancelling a task does not stop its thread: the write is kept so the
            # descriptor is closed only after every write into it has returned.
            write = asyncio.ensure_future(asyncio.to_thread(_pwrite_all, fd, data, offset))
            writes.append(write)
            await asyncio.shield(write)
            outcome.bytes_received += reply.wire_size
            outcome.bytes_written += length

        pending: set[asyncio.Task[None]] = set()
        try:
            for offset, length in differ.extents():
                for at, size in split(offset, length, MAX_READ):
                    if len(pending) >= MAX_INFLIGHT:
                        done, pending = await asyncio.wait(
                            pending, return_when=asyncio.FIRST_COMPLETED
                        )
                        for task in done:
                            task.result()
                    pending.add(asyncio.create_task(fetch(at, size)))
            await asyncio.gather(*pending)
        finally:
            # A failed read: stop the others before the descriptor they write closes.
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.to_thread(os.fdatasync, fd)
    finally:
        await _settle(writes)
        os.close(fd)
    return outcome


async def _settle(writes: list[asyncio.Future[None]]) -> None:
    """Wait until every write thread has returned, even through a cancellation (which
    is raised again afterwards): a pwrite after the close could land in whatever file
    reuses the descriptor number."""
    cancelled = False
    while not all(write.done() for write in writes):
        try:
            await asyncio.wait([w for w in writes if not w.done()])
        except asyncio.CancelledError:
            cancelled = True
    for write in writes:
        if not write.cancelled():
            write.exception()  # retrieved: its error, if any, was the task's to report
    if cancelled:
        raise asyncio.CancelledError


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


async def run(
    address: str,
    ssl_context: ssl.SSLContext,
    machine_id: str,
    disks: Sequence[tuple[Disk, str]],
    chunk: int = CHUNK,
) -> FailbackResult:
    """The whole failback of a machine's `disks` ((disk, id at the target) pairs) from the
    master target at `address`: checked unused first, then made equal to the replicas."""
    for disk, _ in disks:
        await asyncio.to_thread(check_unused, disk)
        await asyncio.to_thread(check_unclaimed, disk.path)
    reader = await TargetReader.connect(address, ssl_context, machine_id)
    try:
        return await failback(
            reader, [FailbackDisk(disk_id, d.path, d.size) for d, disk_id in disks], chunk
        )
    finally:
        await reader.close()
