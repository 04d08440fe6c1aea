"""The master target's side of the wire: streams in, durable ACKs out.

Each replica disk has one `DiskStream`: the connection that opened it last owns it
(a reconnecting sender takes over from its half-dead predecessor), frames are checked
on the event loop (sequence, window, extent bounds) and queued, and one apply thread
per disk feeds them to the storage engine. The queue is bounded by the window the
sender was given: a sender that overruns it is cut off with WINDOW_EXCEEDED. An EXTENTS
frame (many changes under one sequence number) goes the way of a DATA frame: every
extent checked on the event loop, one replica call for all of them, one sequence acked.

An ACK carries the engine's durable sequence, which moves at every tag and at a
checkpoint taken when half the window is pending or `checkpoint_seconds` passed —
so the sender's window never waits on a tag that cannot come (initial sync has none).

A DIGEST_REQUEST (checksum resync) goes into the same queue as the frames, so the
apply thread reaches it exactly after everything the sender sent before it: there it
checkpoints, reads the chunks from the replica and digests them. Its reply is sent
after the ACK that checkpoint produced. The connection's read loop does not wait for
it (pings and DATA keep flowing), but a connection has at most
`MAX_DIGESTS_IN_FLIGHT` requests queued: beyond that, reading waits for a slot.
A READ_REQUEST (failback: the original machine fetches the replica's bytes) takes the
same path and shares those slots, so it too sees everything sent before it.

A failback reader (HELLO role `roles.FAILBACK_ROLE`) does not own the disk: it may open
only a fenced (failed-over) replica, beside the stream's owner, and only digest and read
it. Taking the stream over instead would cut the process server's connection, whose
reconnect opens every disk again and takes this one back from the reader, failing the
failback; and while the disk is fenced nothing the owner sends reaches the replica, so
the reads see it as the VM left it. A read that finds the disk unfenced fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.target.digests import replica_digests
from appliance.target.errors import TargetError
from appliance.target.roles import FAILBACK_ROLE
from appliance.target.store import DiskReplica, ReplicaStore
from appliance.wire.connection import Connection, ConnectionState
from appliance.wire.errors import (
    ConnectionClosed,
    ErrorCounters,
    InternalError,
    InvalidRequest,
    MalformedBody,
    OutOfWindow,
    ProtocolViolation,
    ShuttingDown,
    StorageFailure,
    UnknownDisk,
    WindowExceeded,
    WireError,
)
from appliance.wire.framing import MAX_BODY
from appliance.wire.messages import (
    Ack,
    Data,
    DigestReply,
    DigestRequest,
    DiskOpened,
    Encoding,
    Extents,
    Hello,
    OpenDisk,
    Ping,
    Pong,
    ReadReply,
    ReadRequest,
    Request,
    Tag,
    Welcome,
)
from appliance.wire.rpc import answer

log = logging.getLogger(__name__)

SECTOR = 512
# Bytes handed to the apply thread at once: enough to amortise a thread hop, small
# enough that ACKs keep flowing while a large window drains.
APPLY_CHUNK = 16 * 1024 * 1024
# Digest requests one connection may have queued; each holds up to 16384 chunk indexes
# and the window does not count them, so this is what bounds their memory.
MAX_DIGESTS_IN_FLIGHT = 4


@dataclass
class DiskStats:
    frames_in: int = 0
    bytes_in: int = 0
    bytes_applied: int = 0
    duplicates: int = 0
    tags: int = 0
    digest_requests: int = 0
    digest_chunks: int = 0
    reads: int = 0
    read_bytes: int = 0
    last_ack_ns: int = 0


Reply = DigestReply | ReadReply


@dataclass(eq=False)
class _DigestJob:
    """A digest (or read) request waiting in a disk's queue behind the frames sent
    before it.

    The apply thread fills in `reply` or `error`; `done` is resolved on the event loop
    (asyncio futures are not thread-safe), after the ACK of the checkpoint went out.
    """

    request: DigestRequest | ReadRequest
    done: asyncio.Future[Reply]
    reader: bool = False  # from a failback reader: only while the disk is fenced
    reply: Reply | None = None
    error: WireError | None = None

    def resolve(self) -> None:
        if self.done.done():
            return
        if self.reply is not None:
            self.done.set_result(self.reply)
        else:
            self.done.set_exception(self.error or StorageFailure("digest request dropped"))

    def drop(self, error: WireError) -> None:
        """The stream failed or stopped before this job could run."""
        if self.reply is None and self.error is None:
            self.error = error
        self.resolve()


@dataclass
class DiskStream:
    """One replica disk's incoming stream; see the module docstring."""

    replica: DiskReplica
    window_bytes: int
    checkpoint_seconds: float
    executor: ThreadPoolExecutor
    on_failure: Callable[[DiskStream, WireError], None]
    owner: Connection | None = None
    readers: set[Connection] = field(default_factory=set)  # failback readers
    received_seq: int = 0
    acked_seq: int = 0
    stats: DiskStats = field(default_factory=DiskStats)
    _unacked: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)
    _unacked_bytes: int = 0
    _queue: asyncio.Queue[Data | Extents | Tag | _DigestJob] = field(default_factory=asyncio.Queue)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _checkpointed_at: float = field(default_factory=time.monotonic)
    _task: asyncio.Task[None] | None = None

    @property
    def disk_id(self) -> str:
        return self.replica.disk_id

    def start(self) -> None:
        self._idle.set()
        self.received_seq = self.acked_seq = self.replica.durable_seq
        self._task = asyncio.create_task(self._run(), name=f"apply-{self.disk_id}")

    async def stop(self) -> None:
        """Apply what is queued, make it durable, stop the apply task."""
        await self.settle()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._drop_queue(ShuttingDown("the master target is stopping"))

    async def attach(self, conn: Connection) -> int:
        """Make `conn` the owner; return the durable sequence it must resend after."""
        previous, self.owner = self.owner, conn
        if previous is not None and previous is not conn:
            log.info("disk %s: taken over by %s", self.disk_id, conn.peer)
            previous.close()
        await self.settle()
        durable = self.replica.durable_seq
        self.received_seq = self.acked_seq = durable
        self._unacked.clear()
        self._unacked_bytes = 0
        return durable

    def detach(self, conn: Connection) -> None:
        if self.owner is conn:
            self.owner = None
        self.readers.discard(conn)

    def add_reader(self, conn: Connection) -> int:
        """Let failback reader `conn` digest and read the replica beside its owner (see
        the module docstring); the durable sequence."""
        if not self.replica.fenced:
            raise InvalidRequest(_not_fenced(self.disk_id))
        self.readers.add(conn)
        return self.replica.durable_seq

    async def settle(self) -> None:
        """Wait until everything queued is applied, then checkpoint it."""
        waited = 0.0
        while not self._idle.is_set():
            if self._task is None or self._task.done():
                # Cannot happen by design (every apply error resets the stream); if it
                # does, say so loudly instead of hanging every later sender.
                error = (
                    None
                    if self._task is None or self._task.cancelled()
                    else (self._task.exception())
                )
                log.error("disk %s: the apply task is gone (%r)", self.disk_id, error)
                raise InternalError(f"disk {self.disk_id}: apply task gone")
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except TimeoutError:
                waited += 5.0
                log.warning(
                    "disk %s: still applying after %.0f s (%d queued, pending %d bytes)",
                    self.disk_id, waited, self._queue.qsize(), self.replica.pending_bytes,
                )  # fmt: skip
        loop = asyncio.get_running_loop()
        durable = await loop.run_in_executor(self.executor, self.replica.checkpoint)
        self._acknowledge(durable)

    def digest(
        self, conn: Connection, request: DigestRequest | ReadRequest
    ) -> asyncio.Future[Reply]:
        """Queue a digest or read request behind everything `conn` sent before it; the
        future gives the reply (or a WireError if the stream failed first)."""
        reader = conn in self.readers
        if not reader:
            self._check_owner(conn)
        if isinstance(request, ReadRequest):
            if request.offset + request.length > self.replica.size:
                raise InvalidRequest(
                    f"read of {request.length} at {request.offset} is beyond disk "
                    f"{self.disk_id} ({self.replica.size} bytes)"
                )
            self.stats.reads += 1
        else:
            self.stats.digest_requests += 1
        job = _DigestJob(request, asyncio.get_running_loop().create_future(), reader)
        self._idle.clear()
        self._queue.put_nowait(job)
        return job.done

    def _check_owner(self, conn: Connection) -> None:
        if conn is not self.owner:
            raise ProtocolViolation(f"disk {self.disk_id} is not open on this connection")

    def accept(self, conn: Connection, msg: Data | Extents | Tag) -> None:
        """Check one frame on the event loop and queue it for the apply thread."""
        self._check_owner(conn)
        if msg.seq <= self.received_seq:
            self.stats.duplicates += 1  # a resend of what we already have: idempotent
            return
        if msg.seq != self.received_seq + 1:
            raise OutOfWindow(f"disk {self.disk_id}: sequence {msg.seq} after {self.received_seq}")
        size = 0
        if isinstance(msg, Data | Extents):
            if isinstance(msg, Data):
                _check_extent(self.replica.size, msg)
            else:
                _check_extents(self.replica.size, msg)
            size = msg.wire_size
            if self._unacked_bytes and self._unacked_bytes + size > self.window_bytes:
                raise WindowExceeded(
                    f"disk {self.disk_id}: {self._unacked_bytes + size} unacknowledged "
                    f"bytes, window is {self.window_bytes}"
                )
            self.stats.bytes_in += size
        self.stats.frames_in += 1
        self.received_seq = msg.seq
        self._unacked.append((msg.seq, size))
        self._unacked_bytes += size
        self._idle.clear()
        self._queue.put_nowait(msg)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            behind = self.replica.applied_seq != self.replica.durable_seq
            timeout = self.checkpoint_seconds if behind else None  # see _apply
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                first = None
            batch: list[Data | Extents | Tag | _DigestJob] = [] if first is None else [first]
            size = first.wire_size if isinstance(first, Data | Extents) else 0
            while size < APPLY_CHUNK and not self._queue.empty():
                item = self._queue.get_nowait()
                batch.append(item)
                size += item.wire_size if isinstance(item, Data | Extents) else 0
            jobs = [item for item in batch if isinstance(item, _DigestJob)]
            try:
                durable = await loop.run_in_executor(self.executor, self._apply, batch)
            except asyncio.CancelledError:
                # Stopped mid-batch: these jobs left the queue, so `stop` cannot see them.
                for job in jobs:
                    job.drop(ShuttingDown("the master target is stopping"))
                raise
            except (TargetError, WireError, OSError) as exc:
                error = _as_wire_error(exc)
                for job in jobs:
                    job.drop(error)
                await self._reset(error)
                continue
            except Exception as exc:
                # A bug. Say so once with the traceback, then recover like any failed
                # apply (roll back to the checkpoint, cut the sender, who resends): a
                # dead apply task would leave the disk hanging for every later sender.
                log.exception("disk %s: apply bug", self.disk_id)
                error = InternalError(f"apply failed: {type(exc).__name__}: {exc}")
                for job in jobs:
                    job.drop(error)
                await self._reset(error)
                continue
            self._acknowledge(durable)
            # After the ACK: a reply then tells the sender its earlier frames are durable.
            for job in jobs:
                job.resolve()
            if self._queue.empty():
                self._idle.set()

    def _apply(self, batch: list[Data | Extents | Tag | _DigestJob]) -> int:
        """In the disk's apply thread: write, tag, and checkpoint when it is due."""
        replica = self.replica
        durable_before = replica.durable_seq
        for msg in batch:
            if isinstance(msg, _DigestJob):
                self._digest(msg)
                continue
            if isinstance(msg, Tag):
                replica.tag(msg.seq, msg.tag_id, msg.kind.name.lower(), msg.timestamp_ns)
                self.stats.tags += 1
            elif isinstance(msg, Extents):
                replica.write_extents(msg.seq, msg)
            elif msg.encoding is Encoding.ZERO:
                replica.write_zero(msg.seq, msg.offset, msg.length)
            elif msg.encoding is Encoding.SAME:
                replica.same(msg.seq, msg.offset, msg.length)
            else:
                replica.write(msg.seq, msg.offset, msg.decoded())
            self.stats.bytes_applied += msg.length if isinstance(msg, Data | Extents) else 0
        # Half the window pending, or changes older than checkpoint_seconds: a steady
        # trickle must be acknowledged too, not only a burst or a pause. "Behind", not
        # "bytes pending": SAME frames and everything a fenced replica drops advance the
        # sequence without writing, and must be acknowledged all the same.
        now = time.monotonic()
        behind = replica.applied_seq != replica.durable_seq
        due = replica.pending_bytes >= self.window_bytes // 2 or (
            behind and (not batch or now - self._checkpointed_at >= self.checkpoint_seconds)
        )
        if due:
            replica.checkpoint()
        if replica.durable_seq != durable_before:
            self._checkpointed_at = now
        return replica.durable_seq

    def _digest(self, job: _DigestJob) -> None:
        """In the apply thread, so no write of this disk runs meanwhile: checkpoint (the
        writes before the request leave the in-memory batch and the writer thread and
        reach the file, durably), then read and digest the chunks.

        The lock keeps maintenance (prune, rollback) off the file while it is read. A
        checkpoint failure is an apply failure (raised: the stream resets); a read
        failure only fails this request.
        """
        req = job.request
        replica = self.replica
        with replica.maintenance():
            if job.reader and not replica.fenced:  # unfenced since it opened: writes apply
                job.error = InvalidRequest(_not_fenced(self.disk_id))
                return
            replica.checkpoint()
            try:
                if isinstance(req, ReadRequest):
                    job.reply = self._read(req)
                    return
                digests = replica_digests(replica.flat, replica.size, req.chunk_size, req.chunks)
            except OSError as exc:
                job.error = StorageFailure(f"disk {self.disk_id}: reading for digests: {exc}")
                return
        self.stats.digest_chunks += len(digests)
        job.reply = DigestReply(self.disk_id, req.request_id, req.chunk_size, tuple(digests))

    def _read(self, req: ReadRequest) -> ReadReply:
        """The replica's bytes for a read request (bounds checked when it was queued)."""
        data = bytearray(req.length)
        fd = os.open(self.replica.flat, os.O_RDONLY | os.O_CLOEXEC)
        try:
            done = 0
            while done < req.length:
                got = os.preadv(fd, [memoryview(data)[done:]], req.offset + done)
                if got == 0:  # the flat file is the disk's size: it was truncated under us
                    raise OSError(errno.EIO, f"replica ends at {req.offset + done}")
                done += got
        finally:
            os.close(fd)
        self.stats.read_bytes += req.length
        return ReadReply.of(self.disk_id, req.request_id, req.offset, data)

    def _acknowledge(self, durable: int) -> None:
        if durable <= self.acked_seq:
            return
        self.acked_seq = durable
        while self._unacked and self._unacked[0][0] <= durable:
            self._unacked_bytes -= self._unacked.popleft()[1]
        self.stats.last_ack_ns = time.time_ns()
        owner = self.owner
        if owner is not None:
            # ACKs are tiny and the window already bounds them: no drain wait needed.
            owner.send_nowait(Ack(self.disk_id, durable))

    async def _reset(self, error: WireError) -> None:
        """An apply failed: drop the queue, roll back to the checkpoint, cut the owner."""
        log.error("disk %s: apply failed: %s", self.disk_id, error)
        self._drop_queue(error)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.replica.recover)
        self.received_seq = self.acked_seq = self.replica.durable_seq
        self._unacked.clear()
        self._unacked_bytes = 0
        self._idle.set()
        self.on_failure(self, error)

    def _drop_queue(self, error: WireError) -> None:
        """Forget what is queued; digest requests among it fail with `error`."""
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, _DigestJob):
                item.drop(error)


def _check_extent(size: int, msg: Data) -> None:
    if msg.offset % SECTOR or msg.length % SECTOR or msg.length == 0:
        raise InvalidRequest(f"extent {msg.offset}+{msg.length} is not sector-aligned")
    if msg.offset + msg.length > size:
        raise InvalidRequest(f"extent {msg.offset}+{msg.length} is beyond the disk ({size})")
    if msg.encoding is Encoding.RAW and len(msg.payload) != msg.length:
        raise MalformedBody(f"payload is {len(msg.payload)} bytes, length says {msg.length}")


def _check_extents(size: int, msg: Extents) -> None:
    """Sector alignment of every extent, and the disk's end (decoding made them ascend)."""
    for ext in msg.extents:
        if ext.offset % SECTOR or ext.length % SECTOR:
            raise InvalidRequest(f"extent {ext.offset}+{ext.length} is not sector-aligned")
    last = msg.extents[-1]
    if last.offset + last.length > size:
        raise InvalidRequest(f"extent {last.offset}+{last.length} is beyond the disk ({size})")


def _not_fenced(disk_id: str) -> str:
    return (
        f"disk {disk_id} is not failed over (not fenced): a failback reads only a replica "
        "that a failover rolled back"
    )


def _as_wire_error(exc: BaseException) -> WireError:
    if isinstance(exc, WireError):
        return exc
    return StorageFailure(f"{type(exc).__name__}: {exc}")


class TargetService:
    """Serves replication streams and the small control RPC for one ReplicaStore."""

    def __init__(
        self,
        store: ReplicaStore,
        *,
        name: str,
        datastore: Path,
        window_bytes: int,
        checkpoint_seconds: float,
        counters: ErrorCounters,
    ) -> None:
        self.store = store
        self.name = name
        self.datastore = datastore
        self.window_bytes = window_bytes
        self.checkpoint_seconds = checkpoint_seconds
        self.counters = counters
        self.connections = 0
        self._streams: dict[str, DiskStream] = {}
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._control = ThreadPoolExecutor(max_workers=2, thread_name_prefix="control")
        self._tasks: set[asyncio.Task[None]] = set()
        self.started_ns = time.time_ns()

    async def handle(self, conn: Connection) -> None:
        """One peer connection, from HELLO to close."""
        hello = await conn.recv()
        if not isinstance(hello, Hello):
            raise ProtocolViolation(f"expected HELLO, got {type(hello).__name__}")
        # The configuration server's control calls (status polls every few seconds)
        # would drown the log at INFO; data connections are worth a line.
        level = logging.DEBUG if hello.role == "admin" else logging.INFO
        log.log(level, "%s connected as %s %r", conn.peer, hello.role, hello.name)
        reader = hello.role == FAILBACK_ROLE
        await conn.send(Welcome(self.name, self.window_bytes, MAX_BODY))
        self.connections += 1
        owned: list[DiskStream] = []
        digest_slots = asyncio.Semaphore(MAX_DIGESTS_IN_FLIGHT)
        try:
            while True:
                try:
                    msg = await conn.recv()
                except ConnectionClosed:
                    return
                if isinstance(msg, Data | Extents | Tag):
                    self._stream_of(msg.disk_id).accept(conn, msg)
                elif isinstance(msg, DigestRequest | ReadRequest):
                    stream = self._stream_of(msg.disk_id)
                    # Back-pressure: with MAX_DIGESTS_IN_FLIGHT queued, stop reading. (If
                    # digest() raises, this connection ends and its slots with it.)
                    await digest_slots.acquire()
                    reply = stream.digest(conn, msg)
                    self._spawn(self._send_digests(conn, reply, digest_slots))
                elif isinstance(msg, OpenDisk):
                    stream = await self._open(msg, create=not reader)
                    if reader:
                        durable = stream.add_reader(conn)
                    else:
                        durable = await stream.attach(conn)
                    owned.append(stream)
                    await conn.send(DiskOpened(msg.disk_id, durable, stream.replica.size))
                elif isinstance(msg, Ping):
                    await conn.send(Pong(msg.nonce))
                elif isinstance(msg, Request):
                    self._spawn(self._answer(conn, msg))
                else:
                    raise ProtocolViolation(f"unexpected {type(msg).__name__}")
        finally:
            self.connections -= 1
            for stream in owned:
                stream.detach(conn)

    def _stream_of(self, disk_id: str) -> DiskStream:
        stream = self._streams.get(disk_id)
        if stream is None:
            raise UnknownDisk(f"disk {disk_id!r} was not opened")
        return stream

    async def _send_digests(
        self, conn: Connection, reply: asyncio.Future[Reply], slots: asyncio.Semaphore
    ) -> None:
        """Send a digest reply once the apply thread made it (in its own task, so the
        connection's read loop goes on meanwhile)."""
        try:
            try:
                answer = await reply
            except WireError as exc:
                # A failed stream has cut its owner already (a no-op then); a failed read
                # has not. A connection closed by a takeover has nothing left to report.
                if conn.state is ConnectionState.OPEN:
                    await conn.fail(exc, count=not isinstance(exc, ShuttingDown))
                return
            with contextlib.suppress(WireError):  # the peer went away: nothing to answer
                await conn.send(answer)
        finally:
            slots.release()

    async def _open(self, msg: OpenDisk, *, create: bool = True) -> DiskStream:
        """The disk's stream; its replica is created if new, unless not `create` (a
        reader: an empty replica has nothing to read, and must not appear)."""
        stream = self._streams.get(msg.disk_id)
        if stream is not None:
            if stream.replica.size != msg.size or stream.replica.machine_id != msg.machine_id:
                raise InvalidRequest(
                    f"disk {msg.disk_id} is {stream.replica.size} bytes of "
                    f"{stream.replica.machine_id}, not {msg.size} of {msg.machine_id}"
                )
            return stream
        loop = asyncio.get_running_loop()
        if not create:
            try:
                await loop.run_in_executor(self._control, self.store.disk, msg.disk_id)
            except TargetError as exc:
                raise InvalidRequest(str(exc)) from None
        executor = self._executors.setdefault(
            msg.disk_id, ThreadPoolExecutor(1, thread_name_prefix=f"apply-{msg.disk_id}")
        )
        try:
            replica = await loop.run_in_executor(
                executor, self.store.open_disk, msg.disk_id, msg.machine_id, msg.size
            )
        except TargetError as exc:
            raise InvalidRequest(str(exc)) from None
        # Another connection may have opened it while we waited for the thread.
        stream = self._streams.get(msg.disk_id)
        if stream is None:
            stream = DiskStream(
                replica,
                self.window_bytes,
                self.checkpoint_seconds,
                executor,
                self._stream_failed,
            )
            self._streams[msg.disk_id] = stream
            stream.start()
        return stream

    def _stream_failed(self, stream: DiskStream, error: WireError) -> None:
        owner = stream.owner
        stream.owner = None
        if owner is not None:
            self._spawn(owner.fail(error))
        else:
            self.counters.count(error.code)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, conn: Connection, req: Request) -> None:
        loop = asyncio.get_running_loop()

        async def call(method: str, params: dict[str, Any]) -> Any:
            return await loop.run_in_executor(self._control, self._call, method, params)

        await answer(conn, req, call, (TargetError, WireError, TypeError, KeyError))

    def _call(self, method: str, params: dict[str, Any]) -> Any:
        """Control RPCs, in a control thread (never on the event loop)."""
        if method == "status":
            return self.status()
        if method == "points":
            points = self.store.points(params.get("machine_id"), params.get("disk_id"))
            return [_point_json(p) for p in points]
        if method == "materialize":
            paths = self.store.materialize(
                str(params["machine_id"]),
                str(params["tag_id"]),
                self.datastore,
                str(params["name"]),
            )
            return {"vmdks": [str(p) for p in paths]}
        if method == "discard":
            removed = self.store.discard(
                str(params["machine_id"]), self.datastore, str(params["name"])
            )
            return {"discarded": [p.name for p in removed]}
        if method == "rollback":
            # Streams may still be attached (a process server draining its spool): the
            # rollback fences the disks first, so whatever arrives later is dropped.
            machine = str(params["machine_id"])
            self.store.rollback(machine, str(params["tag_id"]))
            return {"rolled_back": machine, "fenced": True}
        if method == "unfence":
            return {"unfenced": self.store.unfence(str(params["machine_id"]))}
        if method == "drop_points":
            return {"dropped": self.store.drop_points(str(params["machine_id"]))}
        if method == "prune":
            return self.store.prune().__dict__
        raise InvalidRequest(f"unknown method {method!r}")

    def status(self) -> dict[str, Any]:
        disks = []
        for stream in self._streams.values():
            r = stream.replica
            disks.append(
                {
                    "disk_id": r.disk_id,
                    "machine_id": r.machine_id,
                    "size": r.size,
                    "applied_seq": r.applied_seq,
                    "durable_seq": r.durable_seq,
                    "pending_bytes": r.pending_bytes,
                    "connected": stream.owner is not None,
                    **stream.stats.__dict__,
                }
            )
        return {
            "name": self.name,
            "uptime_s": round((time.time_ns() - self.started_ns) / 1e9, 1),
            "connections": self.connections,
            "disks": disks,
            "errors": self.counters.snapshot(),
        }

    async def shutdown(self) -> None:
        """Make everything received durable, then release the store."""
        for stream in list(self._streams.values()):
            await stream.stop()
        for executor in self._executors.values():
            executor.shutdown(wait=True)
        self._control.shutdown(wait=True)


def _point_json(point: Any) -> dict[str, Any]:
    return {
        "tag_id": point.tag_id,
        "time_ns": point.time_ns,
        "kind": str(point.kind),
        "machine_id": point.machine_id,
        "disks": list(point.disks),
        "usable": point.usable,
    }
