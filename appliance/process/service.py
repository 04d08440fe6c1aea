"""A process server's connection handling and status, tying intake, spool and forwarder."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from appliance.process import push
from appliance.process.errors import ProcessError, SpoolFull
from appliance.process.forwarder import Forwarder
from appliance.process.health import Condition, Health
from appliance.process.intake import IntakeStream
from appliance.process.records import SpoolMessage
from appliance.process.spool import Spool
from appliance.push.errors import PushError
from appliance.wire.connection import Connection, ConnectionState
from appliance.wire.errors import (
    ConnectionClosed,
    ErrorCounters,
    InternalError,
    InvalidRequest,
    ProtocolViolation,
    ShuttingDown,
    UnknownDisk,
    WireError,
)
from appliance.wire.framing import MAX_BODY
from appliance.wire.messages import (
    Data,
    DigestReply,
    DigestRequest,
    DiskOpened,
    Extents,
    Hello,
    OpenDisk,
    Ping,
    Pong,
    Request,
    Tag,
    Welcome,
)
from appliance.wire.rpc import answer

log = logging.getLogger(__name__)

MONITOR_SECONDS = 2.0
RATE_MEMORY_SECONDS = 10.0
# Digest requests one agent connection may have relayed and unanswered, as the master
# target allows per connection: each holds up to 16384 chunk indexes and no window
# counts them, so this bounds their memory (the read loop waits beyond it).
MAX_DIGESTS_IN_FLIGHT = 4


class ProcessService:
    def __init__(
        self,
        spool: Spool,
        forwarder: Forwarder | None,
        *,
        name: str,
        window_bytes: int,
        counters: ErrorCounters,
        pool: ThreadPoolExecutor,
        health: Health | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.spool = spool
        self.state_dir = state_dir  # None: no push installation from here
        self.forwarder = forwarder
        self.name = name
        self.window_bytes = window_bytes
        self.counters = counters
        self.health = health or Health()
        self.space = asyncio.Event()
        self.space.set()
        self.connections = 0
        self._pool = pool
        self._streams: dict[str, IntakeStream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._samples: dict[str, tuple[float, int, int]] = {}
        self._rates: dict[str, tuple[float, float]] = {}
        self.started = time.time()
        if forwarder is None:
            self.health.raise_(Condition.NO_TARGET, "set target.address to forward")

    def start(self) -> None:
        """Resume what the spool holds: forward it, accept its agents again."""
        for stream in self.spool.streams():
            self._intake(stream.disk_id)
        self._refresh_space()
        self._monitor = asyncio.create_task(self._monitor_loop())

    def _intake(self, disk_id: str) -> IntakeStream:
        stream = self._streams.get(disk_id)
        if stream is None:
            spooled = self.spool.get(disk_id)
            stream = IntakeStream(
                spooled, self.window_bytes, self._pool, self.health, self.space,
                self._durable,
            )  # fmt: skip
            self._streams[disk_id] = stream
            stream.start()
            if self.forwarder is not None:
                self.forwarder.add(spooled)
        return stream

    def _durable(self, stream: IntakeStream) -> None:
        if self.forwarder is not None:
            self.forwarder.wake(stream.disk_id)

    def released(self) -> None:
        """The forwarder freed spool segments: agents may go on if there is room now."""
        self._refresh_space()

    def _refresh_space(self) -> None:
        if self.spool.full():
            self.health.raise_(Condition.SPOOL_FULL, f"{self.spool.total_bytes} bytes spooled")
            self.space.clear()
        else:
            self.health.clear(Condition.SPOOL_FULL)
            if not self.health.active(Condition.DISK_FULL):
                self.space.set()

    async def handle(self, conn: Connection) -> None:
        hello = await conn.recv()
        if not isinstance(hello, Hello):
            raise ProtocolViolation(f"expected HELLO, got {type(hello).__name__}")
        # The configuration server's control calls (status polls every few seconds)
        # would drown the log at INFO; data connections are worth a line.
        level = logging.DEBUG if hello.role == "admin" else logging.INFO
        log.log(level, "%s connected as %s %r", conn.peer, hello.role, hello.name)
        await conn.send(Welcome(self.name, self.window_bytes, MAX_BODY))
        self.connections += 1
        owned: list[IntakeStream] = []
        digest_slots = asyncio.Semaphore(MAX_DIGESTS_IN_FLIGHT)
        try:
            while True:
                try:
                    msg = await conn.recv()
                except ConnectionClosed:
                    return
                if isinstance(msg, Data | Extents | Tag):
                    stream = self._streams.get(msg.disk_id)
                    if stream is None:
                        raise UnknownDisk(f"disk {msg.disk_id!r} was not opened")
                    await self._accept(stream, conn, msg)
                elif isinstance(msg, OpenDisk):
                    loop = asyncio.get_running_loop()
                    try:  # creating a stream writes files: not on the event loop
                        await loop.run_in_executor(
                            self._pool, self.spool.stream, msg.disk_id, msg.machine_id, msg.size
                        )
                    except ProcessError as exc:
                        raise InvalidRequest(str(exc)) from None
                    stream = self._intake(msg.disk_id)
                    durable = await stream.attach(conn)
                    owned.append(stream)
                    await conn.send(DiskOpened(msg.disk_id, durable, msg.size))
                elif isinstance(msg, DigestRequest):
                    await self._relay(conn, msg, digest_slots)
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

    async def _accept(self, stream: IntakeStream, conn: Connection, msg: SpoolMessage) -> None:
        # Holding `msg` while there is no room is what pauses this agent: we stop
        # reading its connection until the spool drains.
        while True:
            if not self.space.is_set():
                await self.space.wait()
            try:
                stream.accept(conn, msg)
                return
            except SpoolFull:
                self._refresh_space()
                if self.space.is_set():  # freed meanwhile; the limit is a soft line
                    await asyncio.sleep(0.05)

    async def _relay(self, conn: Connection, msg: DigestRequest, slots: asyncio.Semaphore) -> None:
        """Forward a digest request to the master target behind every frame of its disk
        this agent sent before it, i.e. up to the spool's appended sequence now."""
        stream = self._streams.get(msg.disk_id)
        if stream is None:
            raise UnknownDisk(f"disk {msg.disk_id!r} was not opened")
        if conn is not stream.owner:
            raise ProtocolViolation(f"disk {msg.disk_id} is not open on this connection")
        if self.forwarder is None:
            raise InvalidRequest("no master target assigned")
        await slots.acquire()
        # Nothing is read from this connection between here and the acquire, so the
        # appended sequence is still the last frame the agent sent before the request.
        try:
            reply = self.forwarder.relay(msg, stream.spool.appended_seq)
        except BaseException:
            slots.release()
            raise
        self._spawn(self._send_digests(conn, reply, slots))

    async def _send_digests(
        self, conn: Connection, reply: asyncio.Future[DigestReply], slots: asyncio.Semaphore
    ) -> None:
        """Pass the master target's answer on, in its own task so the read loop goes
        on. An error ends the agent's connection, as every ERROR does."""
        try:
            try:
                answer = await reply
            except WireError as exc:
                if conn.state is ConnectionState.OPEN:
                    await conn.fail(exc, count=not isinstance(exc, ShuttingDown))
                return
            except OSError as exc:  # the sender's fatal error: e.g. a bad target certificate
                if conn.state is ConnectionState.OPEN:
                    await conn.fail(InternalError(f"relaying digests: {exc}"))
                return
            with contextlib.suppress(WireError):  # the agent went away: it will ask again
                await conn.send(answer)
        finally:
            if not reply.done():
                reply.cancel()  # e.g. the daemon stops: no use relaying it any more
            slots.release()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, conn: Connection, req: Request) -> None:
        async def call(method: str, params: dict[str, Any]) -> Any:
            if method in push.METHODS:
                if conn.peer_unit not in push.CALLERS:
                    raise InvalidRequest(f"{method} is for the configuration server only")
                if self.state_dir is None:
                    raise InvalidRequest("push installation is not set up on this server")
                # Minutes of SSH: in a thread of its own, never on the loop or the spool's pool.
                return await asyncio.to_thread(push.call, method, params, self.state_dir)
            return self._call(method, params)  # quick, in-memory: on the loop

        await answer(conn, req, call, (WireError, TypeError, KeyError, PushError))

    def _call(self, method: str, params: dict[str, Any]) -> Any:
        if method == "status":
            return self.status()
        if method == "set_throttle":
            mbps = params.get("mbps")
            if mbps is not None and (not isinstance(mbps, int | float) or mbps <= 0):
                raise InvalidRequest("mbps must be a positive number, or null for no limit")
            if self.forwarder is None:
                raise InvalidRequest("no master target is assigned")
            self.forwarder.fair.set_rate(None if mbps is None else mbps * 1e6 / 8)
            return {"mbps": mbps}
        raise InvalidRequest(f"unknown method {method!r}")

    def status(self) -> dict[str, Any]:
        now_ns = time.time_ns()
        disks = []
        for stream in self._streams.values():
            spooled = stream.spool
            forwarded = self.forwarder.stats(stream.disk_id) if self.forwarder else None
            oldest = spooled.oldest_unforwarded_ns
            disks.append({
                "disk_id": spooled.disk_id,
                "machine_id": spooled.machine_id,
                "connected": stream.owner is not None,
                "durable_seq": spooled.durable_seq,
                "target_acked_seq": spooled.target_acked_seq,
                "backlog_bytes": spooled.backlog_bytes,
                "backlog_records": spooled.backlog_records,
                "oldest_unforwarded_s": round((now_ns - oldest) / 1e9, 3) if oldest else 0.0,
                "bytes_in": stream.stats.bytes_in,
                "rate_in_bytes_s": round(self._rates.get(spooled.disk_id, (0.0, 0.0))[0]),
                "rate_out_bytes_s": round(self._rates.get(spooled.disk_id, (0.0, 0.0))[1]),
                "bytes_raw_out": forwarded.bytes_raw if forwarded else 0,
                "bytes_wire_out": forwarded.bytes_wire if forwarded else 0,
                "same_frames": forwarded.same if forwarded else 0,
                "frames_out": forwarded.frames_out if forwarded else 0,
                "extents_frames": forwarded.extents_frames if forwarded else 0,
            })  # fmt: skip
        optimizer = self.forwarder.optimizer if self.forwarder else None
        sender = self.forwarder.sender if self.forwarder else None
        return {
            "name": self.name,
            "uptime_s": round(time.time() - self.started, 1),
            "connections": self.connections,
            "health": self.health.snapshot(),
            "spool_bytes": self.spool.total_bytes,
            "target": {
                "state": str(sender.state) if sender else "none",
                "reconnects": sender.reconnects if sender else 0,
                "compression_ratio": round(optimizer.ratio, 3) if optimizer else 1.0,
                "throttle_bytes_per_s": self.forwarder.fair.rate if self.forwarder else None,
                # Disks with durable records still to forward: they share the read budget.
                "draining_disks": self.forwarder.draining if self.forwarder else 0,
            },
            "disks": disks,
            "errors": self.counters.snapshot(),
        }

    def _sample_rates(self) -> None:
        """Per-disk throughput in (from the agent) and out (on the wire to the target),
        as exponentially weighted averages over the monitor's ticks (~10 s memory)."""
        now = time.monotonic()
        for disk_id, stream in self._streams.items():
            out = self.forwarder.stats(disk_id) if self.forwarder else None
            sample = (now, stream.stats.bytes_in, out.bytes_wire if out else 0)
            previous = self._samples.get(disk_id)
            self._samples[disk_id] = sample
            if previous is None or now <= previous[0]:
                continue
            elapsed = now - previous[0]
            rate_in = (sample[1] - previous[1]) / elapsed
            rate_out = (sample[2] - previous[2]) / elapsed
            old_in, old_out = self._rates.get(disk_id, (rate_in, rate_out))
            weight = min(1.0, elapsed / RATE_MEMORY_SECONDS)
            self._rates[disk_id] = (
                old_in + weight * (rate_in - old_in),
                old_out + weight * (rate_out - old_out),
            )

    async def _monitor_loop(self) -> None:
        """Rates; TARGET_UNREACHABLE while there is backlog and no link to the target."""
        while True:
            await asyncio.sleep(MONITOR_SECONDS)
            self._sample_rates()
            if self.forwarder is None:
                continue
            backlog = any(s.spool.backlog_records for s in self._streams.values())
            if self.forwarder.sender.state is ConnectionState.OPEN:
                self.health.clear(Condition.TARGET_UNREACHABLE)
            elif backlog:
                self.health.raise_(
                    Condition.TARGET_UNREACHABLE, str(self.forwarder.sender.last_error)
                )
            # A fully acknowledged active segment is kept while its stream is busy (it
            # rolls over soon enough); here, every few seconds, it goes.
            await asyncio.get_running_loop().run_in_executor(self._pool, self.spool.reclaim)
            self._refresh_space()

    async def shutdown(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        for stream in list(self._streams.values()):
            if not self.health.active(Condition.DISK_FULL):
                await stream.stop()
        if self.forwarder is not None:
            await self.forwarder.close()
