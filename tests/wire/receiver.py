"""A small receiver on real TLS for the sender tests (test scaffolding, not a mock).

It keeps the master target's rules: WELCOME after HELLO; DISK_OPENED with its durable
sequence; DATA/TAG at or below the applied sequence ignored (idempotent replay), the
next one applied, a gap refused with OUT_OF_WINDOW, more unacknowledged payload than
the window refused with WINDOW_EXCEEDED; ACKs for what it has made "durable".

Faults to inject: drop the connection when the Nth DATA/TAG arrives (before applying
it), report only the last ACK as durable (so the sender replays what was applied but
not acknowledged), hold ACKs, go mute, refuse a disk with an error code, fail the
first OPEN_DISKs with STORAGE_FAILURE.

It answers DIGEST_REQUEST in order, as the master target does: its one "digest" is the
applied sequence at that point (chunk 0, 16 bytes big-endian), so a test can see which
frames came before the request; `answer_digests=False` records requests unanswered.
Its state
outlives connections and server restarts, like a real target's disk would.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from appliance.wire.connection import Connection, start_server
from appliance.wire.errors import (
    ErrorCode,
    ErrorCounters,
    OutOfWindow,
    ProtocolViolation,
    WindowExceeded,
    error_for,
)
from appliance.wire.framing import MAX_BODY
from appliance.wire.messages import (
    Ack,
    Data,
    DigestReply,
    DigestRequest,
    DiskOpened,
    Hello,
    OpenDisk,
    Ping,
    Pong,
    Tag,
    Welcome,
)
from appliance.wire.server import WireServer


@dataclass
class DiskState:
    size: int
    applied: list[int] = field(default_factory=list)  # every sequence applied, in order
    payloads: dict[int, bytes] = field(default_factory=dict)
    applied_seq: int = 0
    acked_seq: int = 0
    duplicates: int = 0
    unacked_bytes: int = 0
    pending: int = 0  # applied since the last ACK
    requests: list[tuple[int, int]] = field(default_factory=list)  # (id, applied_seq)
    conn: Connection | None = None


class Receiver:
    def __init__(
        self,
        ctx: ssl.SSLContext,
        *,
        window_bytes: int = 64 * 1024,
        ack_every: int = 1,
        report_acked_as_durable: bool = False,
        drop_at: tuple[int, ...] = (),
        refuse: dict[str, ErrorCode] | None = None,
        storage_failures: int = 0,
        acks: bool = True,
        answer_digests: bool = True,
    ) -> None:
        self.ctx = ctx
        self.window_bytes = window_bytes
        self.ack_every = ack_every
        self.report_acked_as_durable = report_acked_as_durable
        self.drop_at = set(drop_at)
        self.refuse = refuse or {}
        self.storage_failures = storage_failures  # the first N OPEN_DISKs fail so
        self.acks = acks
        self.answer_digests = answer_digests
        self.muted: set[Connection] = set()
        self.live: set[Connection] = set()
        self.disks: dict[str, DiskState] = {}
        self.frames = 0  # DATA/TAG frames seen, across connections
        self.connections = 0
        self.counters = ErrorCounters()
        self.server: WireServer | None = None
        self.port = 0

    async def start(self, port: int = 0) -> None:
        self.server = await start_server(
            self.handle, "127.0.0.1", port, self.ctx, counters=self.counters
        )
        self.port = self.server.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def mute(self) -> None:
        """The current connections stay up but hear nothing more (new ones are fine)."""
        self.muted |= self.live

    def release_acks(self) -> None:
        self.acks = True
        for disk_id, disk in self.disks.items():
            if disk.pending:
                self._ack(disk_id, disk)

    async def handle(self, conn: Connection) -> None:
        self.connections += 1
        self.live.add(conn)
        try:
            await self._serve(conn)
        finally:
            self.live.discard(conn)

    async def _serve(self, conn: Connection) -> None:
        hello = await conn.recv()
        if not isinstance(hello, Hello):
            raise ProtocolViolation(f"expected HELLO, got {type(hello).__name__}")
        await conn.send(Welcome("test-receiver", self.window_bytes, MAX_BODY))
        while True:
            msg = await conn.recv()
            if conn in self.muted:
                continue
            if isinstance(msg, OpenDisk):
                await self._open(conn, msg)
            elif isinstance(msg, Data | Tag):
                self.frames += 1
                if self.frames in self.drop_at:
                    conn.abort()  # lost in flight: never applied
                    return
                self._apply(conn, msg)
            elif isinstance(msg, DigestRequest):
                await self._digest(conn, msg)
            elif isinstance(msg, Ping):
                await conn.send(Pong(msg.nonce))
            else:
                raise ProtocolViolation(f"unexpected {type(msg).__name__}")

    async def _open(self, conn: Connection, msg: OpenDisk) -> None:
        if msg.disk_id in self.refuse:
            raise error_for(self.refuse[msg.disk_id], f"disk {msg.disk_id!r} refused")
        if self.storage_failures:
            self.storage_failures -= 1
            raise error_for(ErrorCode.STORAGE_FAILURE, "datastore full, try again later")
        disk = self.disks.setdefault(msg.disk_id, DiskState(msg.size))
        disk.conn = conn
        disk.unacked_bytes = 0
        disk.pending = 0
        durable = disk.acked_seq if self.report_acked_as_durable else disk.applied_seq
        disk.acked_seq = durable
        await conn.send(DiskOpened(msg.disk_id, durable, disk.size))

    def _apply(self, conn: Connection, msg: Data | Tag) -> None:
        disk = self.disks.get(msg.disk_id)
        if disk is None or disk.conn is not conn:
            raise ProtocolViolation(f"{msg.disk_id} is not open on this connection")
        if msg.seq <= disk.applied_seq:
            disk.duplicates += 1
            return
        if msg.seq != disk.applied_seq + 1:
            raise OutOfWindow(f"{msg.disk_id}: seq {msg.seq} after {disk.applied_seq}")
        size = msg.wire_size if isinstance(msg, Data) else 0
        if disk.unacked_bytes and disk.unacked_bytes + size > self.window_bytes:
            raise WindowExceeded(f"{disk.unacked_bytes + size} > {self.window_bytes}")
        disk.applied.append(msg.seq)
        disk.applied_seq = msg.seq
        if isinstance(msg, Data):
            disk.payloads[msg.seq] = bytes(msg.decoded())
        disk.unacked_bytes += size
        disk.pending += 1
        if self.acks and (disk.pending >= self.ack_every or isinstance(msg, Tag)):
            self._ack(msg.disk_id, disk)

    async def _digest(self, conn: Connection, msg: DigestRequest) -> None:
        disk = self.disks.get(msg.disk_id)
        if disk is None or disk.conn is not conn:
            raise ProtocolViolation(f"{msg.disk_id} is not open on this connection")
        disk.requests.append((msg.request_id, disk.applied_seq))
        if self.answer_digests:
            digest = disk.applied_seq.to_bytes(16, "big")
            await conn.send(
                DigestReply(msg.disk_id, msg.request_id, msg.chunk_size, ((0, digest),))
            )

    def _ack(self, disk_id: str, disk: DiskState) -> None:
        disk.acked_seq = disk.applied_seq
        disk.unacked_bytes = 0
        disk.pending = 0
        if disk.conn is not None and disk.conn.state == "open":
            disk.conn.send_nowait(Ack(disk_id, disk.acked_seq))
