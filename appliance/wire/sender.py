"""The sending side of a replication stream: keep everything unacknowledged, resend it.

Per disk, messages (DATA and TAG) carry contiguous sequence numbers assigned by the
caller. Each disk has an `OutboundWindow` holding every message the receiver has not
acknowledged as durable; its capacity is the receiver's advertised window, in DATA
payload bytes as sent on the wire (`wire_size` of DATA and EXTENTS; a TAG costs nothing), plus a cap
on the number of messages so zero-cost messages cannot pile up without limit.

A session of `StreamSender`::

    -> HELLO(role, name)              <- WELCOME(name, window_bytes, max_body)
    -> OPEN_DISK(disk, machine, size) <- DISK_OPENED(disk, durable_seq, size)   per disk
    -> DATA/TAG seq > durable_seq ... <- ACK(disk, seq) as the receiver makes data durable

    -> DIGEST_REQUEST(disk, id, ...)   <- DIGEST_REPLY(disk, id, ...)   see `request`

DISK_OPENED's durable_seq counts as an ACK; everything after it is (re)sent in order.
The sender never has more unacknowledged payload bytes in flight on a connection than
the window, so the receiver never has to refuse with WINDOW_EXCEEDED. When the
connection drops, or the receiver reports a transient error (see
`reconnect.TRANSIENT_CODES`), the sender reconnects after a backoff delay and resends
from the last ACK; the receiver ignores what it already applied. Any other error is
fatal: it is raised from `submit` and `wait_acked` instead of retrying forever.

Digest requests ride in a disk's window too, so that the receiver (which answers a
request only after applying the frames sent before it on that disk) sees them in
order, on every connection: see `StreamSender.request` and `OutboundWindow.ack`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from appliance.wire.connection import Connection, ConnectionState, open_connection
from appliance.wire.errors import ConnectionClosed, InternalError, ProtocolViolation, WireError
from appliance.wire.framing import MAX_BODY
from appliance.wire.messages import (
    Ack,
    Data,
    DigestReply,
    DigestRequest,
    DiskOpened,
    Extents,
    Hello,
    OpenDisk,
    Ping,
    Pong,
    Tag,
    Welcome,
)
from appliance.wire.reconnect import Backoff, is_transient

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 8 * 1024 * 1024  # until the receiver's WELCOME says otherwise
MAX_MESSAGES = 8192
STABLE_SESSION = 5.0  # a session that lasted this long resets the backoff


# What a disk's window holds, in the order it goes on the wire.
Outbound = Data | Extents | Tag | DigestRequest
# A stream message: what carries a sequence number.
StreamMessage = Data | Extents | Tag


def cost(msg: Outbound) -> int:
    """What `msg` counts against the window."""
    return msg.wire_size if isinstance(msg, Data | Extents) else 0


class OutboundWindow:
    """One disk's unacknowledged messages, in sequence order, bounded in bytes and count.

    It also remembers how many of them were sent on the current connection (a cursor
    that `rewind` resets), so the sender can resend exactly what follows the last ACK.

    A DIGEST_REQUEST entry (`put_request`) has no sequence number and costs no bytes;
    it sits after the frames put before it and is sent, and resent after a reconnect,
    in that order. An ACK cannot drop it: the ACK says the frames before it are
    durable, not that the request was answered (it may have been lost with the
    connection). So `ack` drops the acknowledged frames around it and leaves it at
    the front (its predecessors are all durable, so nothing it must follow is left
    behind it), and only `remove_request` - its reply arrived - takes it out. A
    request therefore leaves the window once the frames before it are acked and its
    reply is in, whichever comes first; it is never sent ahead of a frame it follows.
    """

    def __init__(self, window_bytes: int, *, max_messages: int = MAX_MESSAGES) -> None:
        self.window_bytes = window_bytes
        self.max_messages = max_messages
        self.acked_seq = 0
        self.last_seq = 0  # highest sequence put
        self._entries: deque[tuple[Outbound, int]] = deque()
        self._requests = 0  # DIGEST_REQUEST entries among them
        self._unacked_bytes = 0
        self._sent = 0  # entries at the front already sent on this connection
        self._inflight = 0  # their bytes
        self._waiters: list[asyncio.Future[None]] = []
        self._error: BaseException | None = None

    @property
    def unacked_bytes(self) -> int:
        return self._unacked_bytes

    @property
    def inflight_bytes(self) -> int:
        return self._inflight

    def __len__(self) -> int:
        return len(self._entries)

    def unacked(self) -> list[StreamMessage]:
        """The frames not yet acknowledged (digest requests left out: see `requests`)."""
        return [msg for msg, _ in self._entries if not isinstance(msg, DigestRequest)]

    def requests(self) -> list[DigestRequest]:
        """The digest requests not yet answered, in order."""
        return [msg for msg, _ in self._entries if isinstance(msg, DigestRequest)]

    def _fits(self, size: int) -> bool:
        if len(self._entries) == self._requests:
            # No frame waits (requests only wait for replies): even a message larger
            # than the window, or it could never pass.
            return True
        return (
            self._unacked_bytes + size <= self.window_bytes
            and len(self._entries) < self.max_messages
        )

    async def put(self, msg: StreamMessage) -> None:
        """Admit `msg` (the next sequence), waiting for ACKs while the window is full."""
        if msg.seq <= self.acked_seq:
            # The receiver already has it (it reported a durable sequence past what we
            # had put): nothing to send, and the stream may go on from its ACK.
            self.last_seq = max(self.last_seq, msg.seq)
            return
        base = max(self.last_seq, self.acked_seq)
        if base and msg.seq != base + 1:
            raise ValueError(f"{msg.disk_id}: seq {msg.seq} after {base} is not contiguous")
        size = cost(msg)
        while not self._fits(size):
            await self._wait()
        if self._error is not None:
            raise self._error
        self.last_seq = msg.seq
        if msg.seq <= self.acked_seq:
            return  # the receiver told us it already has this one
        self._entries.append((msg, size))
        self._unacked_bytes += size

    def ack(self, seq: int) -> bool:
        """Everything up to `seq` is durable: drop it and wake waiters. True if it advanced."""
        if seq <= self.acked_seq:
            return False
        self.acked_seq = seq
        # Unanswered requests among the acknowledged frames stay, at the front, in
        # their order (see the class doc); the sent-cursor keeps counting the sent
        # ones, which come first because sending is in order.
        kept: list[tuple[Outbound, int]] = []
        kept_sent = 0
        popped = 0
        while self._entries:
            msg, size = self._entries[0]
            if not isinstance(msg, DigestRequest) and msg.seq > seq:
                break
            self._entries.popleft()
            was_sent = popped < self._sent
            popped += 1
            if isinstance(msg, DigestRequest):
                kept.append((msg, size))
                kept_sent += was_sent
            else:
                self._unacked_bytes -= size
                if was_sent:
                    self._inflight -= size
        self._sent = kept_sent + max(0, self._sent - popped)
        self._entries.extendleft(reversed(kept))
        self._wake()
        return True

    async def put_request(self, msg: DigestRequest) -> None:
        """Queue `msg` after every frame put so far (waits while the count is full)."""
        while self._entries and len(self._entries) >= self.max_messages:
            await self._wait()
        if self._error is not None:
            raise self._error
        self._entries.append((msg, 0))
        self._requests += 1

    def remove_request(self, request_id: int) -> bool:
        """The request was answered (or abandoned): never (re)send it. False if absent."""
        for index, (msg, _) in enumerate(self._entries):
            if isinstance(msg, DigestRequest) and msg.request_id == request_id:
                del self._entries[index]
                self._requests -= 1
                if index < self._sent:
                    self._sent -= 1  # it costs nothing: in-flight bytes are unchanged
                self._wake()
                return True
        return False

    def rewind(self) -> None:
        """A new connection: nothing unacknowledged has been sent on it yet."""
        self._sent = 0
        self._inflight = 0

    def next_to_send(self, limit: int) -> Outbound | None:
        """The next unsent message if sending it keeps in-flight bytes within `limit`."""
        if self._sent >= len(self._entries):
            return None
        msg, size = self._entries[self._sent]
        if self._inflight and self._inflight + size > limit:
            return None
        self._sent += 1
        self._inflight += size
        return msg

    def resize(self, window_bytes: int) -> None:
        self.window_bytes = window_bytes
        self._wake()

    async def wait_acked(self, seq: int) -> None:
        while self.acked_seq < seq:
            await self._wait()

    def fail(self, error: BaseException) -> None:
        """The stream is over: every waiter (and every later put) raises `error`."""
        self._error = error
        self._wake()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()


@dataclass
class _Pending:
    """A digest request waiting for its reply; it goes out under `StreamSender`'s own
    id (callers' ids need not be unique across disks or callers)."""

    disk_id: str
    caller_id: int
    reply: asyncio.Future[DigestReply]


@dataclass
class _Disk:
    disk_id: str
    machine_id: str
    size: int
    window: OutboundWindow
    open_sent: bool = False  # on the current connection
    open_sent_at: float = 0.0
    opened: bool = False


class StreamSender:
    """Streams the disks added with `add_disk` to one receiver, across reconnects."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        name: str,
        role: str = "process",
        server_hostname: str | None = "localhost",
        backoff: Backoff | None = None,
        window_bytes: int = DEFAULT_WINDOW,
        max_messages: int = MAX_MESSAGES,
        connect_timeout: float = 10.0,
        keepalive: float = 15.0,
        on_ack: Callable[[str, int], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.name = name
        self.role = role
        self.state = ConnectionState.CLOSED
        self.reconnects = 0
        self.receiver = ""  # the receiver's name from its WELCOME
        self.last_error: BaseException | None = None
        self.last_error_hint = ""  # what the last error probably means, if we can tell
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._backoff = backoff if backoff is not None else Backoff()
        self._window_bytes = window_bytes
        self._max_messages = max_messages
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._disks: dict[str, _Disk] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: Connection | None = None
        self._fatal: BaseException | None = None
        self._progress = False  # an ACK advanced during the current session
        self._last_recv = 0.0
        self._on_ack = on_ack
        self._pending: dict[int, _Pending] = {}  # by the request_id sent on the wire
        self._request_ids = 0

    # -- public API --------------------------------------------------------------------

    def add_disk(self, disk_id: str, machine_id: str, size: int) -> None:
        if disk_id in self._disks:
            raise ValueError(f"disk {disk_id!r} is already part of this stream")
        window = OutboundWindow(self._window_bytes, max_messages=self._max_messages)
        if self._fatal is not None:
            window.fail(self._fatal)
        self._disks[disk_id] = _Disk(disk_id, machine_id, size, window)
        self._wakeup.set()

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the sender is already started")
        self.state = ConnectionState.CONNECTING
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, msg: StreamMessage) -> None:
        """Queue `msg` for sending; waits while the receiver's window is full."""
        disk = self._disks.get(msg.disk_id)
        if disk is None:
            raise ValueError(f"disk {msg.disk_id!r} was not added to this stream")
        if self._fatal is not None:
            raise self._fatal
        await disk.window.put(msg)
        self._wakeup.set()

    async def queue_request(self, msg: DigestRequest) -> asyncio.Future[DigestReply]:
        """Queue `msg` in its disk's order, right after every frame submitted so far;
        return a future for the reply (with `msg`'s request_id).

        Returns once it is queued, so a caller that must submit nothing in between
        (the process server's forwarder) can go on submitting. The receiver answers
        only after applying every frame before it. After a reconnect it is resent in
        the same place, the receiver answers again, and the extra reply is ignored.
        The future raises the stream's fatal error if it stops first.
        """
        disk = self._disks.get(msg.disk_id)
        if disk is None:
            raise ValueError(f"disk {msg.disk_id!r} was not added to this stream")
        if self._fatal is not None:
            raise self._fatal
        self._request_ids += 1
        wire_id = self._request_ids
        reply: asyncio.Future[DigestReply] = asyncio.get_running_loop().create_future()
        self._pending[wire_id] = _Pending(msg.disk_id, msg.request_id, reply)
        try:
            await disk.window.put_request(replace(msg, request_id=wire_id))
        except BaseException:
            del self._pending[wire_id]
            raise
        # A caller that gives up (cancels the future) need not have it resent.
        reply.add_done_callback(lambda f: self._forget(wire_id) if f.cancelled() else None)
        self._wakeup.set()
        return reply

    async def request(self, msg: DigestRequest) -> DigestReply:
        """`queue_request`, then wait for the reply."""
        return await (await self.queue_request(msg))

    def _forget(self, wire_id: int) -> None:
        pending = self._pending.pop(wire_id, None)
        if pending is not None:
            self._disks[pending.disk_id].window.remove_request(wire_id)

    def acked_seq(self, disk_id: str) -> int:
        return self._disks[disk_id].window.acked_seq

    def window(self, disk_id: str) -> OutboundWindow:
        return self._disks[disk_id].window

    async def wait_acked(self, disk_id: str, seq: int, timeout: float | None = None) -> None:
        """Wait until the receiver has made `seq` durable (TimeoutError after `timeout`)."""
        async with asyncio.timeout(timeout):
            await self._disks[disk_id].window.wait_acked(seq)

    async def close(self) -> None:
        """Stop streaming; unacknowledged messages are dropped and waiters released."""
        if self.state is not ConnectionState.CLOSED:
            self.state = ConnectionState.CLOSING
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
        if self._fatal is None:
            self._set_fatal(ConnectionClosed("the sender was closed"))
        self.state = ConnectionState.CLOSED

    # -- the connection loop ----------------------------------------------------------

    def _acked(self, disk: _Disk) -> None:
        # The spool behind a process server frees space on this: tell it promptly.
        if self._on_ack is not None:
            self._on_ack(disk.disk_id, disk.window.acked_seq)

    def _set_fatal(self, error: BaseException) -> None:
        self._fatal = error
        for disk in self._disks.values():
            disk.window.fail(error)
        pending, self._pending = self._pending, {}
        for request in pending.values():
            if not request.reply.done():
                request.reply.set_exception(error)

    async def _run(self) -> None:
        while True:
            self.state = ConnectionState.CONNECTING
            started = time.monotonic()
            self._progress = False
            try:
                conn = await open_connection(
                    self.host,
                    self.port,
                    self._ssl,
                    server_hostname=self._server_hostname,
                    timeout=self._connect_timeout,
                )
            except (OSError, TimeoutError, WireError) as exc:
                error: BaseException = exc
            else:
                self._conn = conn
                try:
                    await self._session(conn)
                    error = ConnectionClosed("session ended")
                except (OSError, TimeoutError, WireError) as exc:
                    error = exc
                except Exception as exc:
                    log.exception("bug in the stream to %s:%s", self.host, self.port)
                    error = InternalError(f"sender bug: {exc!r}")
                    error.__cause__ = exc
                finally:
                    conn.close()
            self.last_error = error
            if not is_transient(error) or isinstance(error, InternalError):
                log.error("stream to %s:%s stopped: %s", self.host, self.port, error)
                self._set_fatal(error)
                self.state = ConnectionState.CLOSED
                return
            if self._progress or time.monotonic() - started >= STABLE_SESSION:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            hint = ""
            if self.state is ConnectionState.HANDSHAKING and isinstance(error, ConnectionClosed):
                hint = " before WELCOME (does the receiver accept our certificate?)"
            self.last_error_hint = hint.strip()
            log.warning(
                "stream to %s:%s: %s%s; reconnecting in %.1fs",
                self.host,
                self.port,
                str(error) or type(error).__name__,
                hint,
                delay,
            )
            self.state = ConnectionState.CONNECTING
            await asyncio.sleep(delay)
            self.reconnects += 1

    async def _session(self, conn: Connection) -> None:
        self.state = ConnectionState.HANDSHAKING
        await conn.send(Hello(self.role, self.name))
        async with asyncio.timeout(self._connect_timeout):
            welcome = await conn.recv()
        if not isinstance(welcome, Welcome):
            raise ProtocolViolation(f"expected WELCOME, got {type(welcome).__name__}")
        self.receiver = welcome.name
        conn.send_max_body = min(welcome.max_body, MAX_BODY)
        self._window_bytes = welcome.window_bytes
        for disk in self._disks.values():
            disk.open_sent = disk.opened = False
            disk.window.rewind()
            disk.window.resize(welcome.window_bytes)
        self.state = ConnectionState.OPEN
        self._last_recv = time.monotonic()
        reader = asyncio.create_task(self._read_loop(conn))
        pump = asyncio.create_task(self._pump(conn))
        try:
            done, _ = await asyncio.wait({reader, pump}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended the session
        finally:
            for task in (reader, pump):
                task.cancel()
            await asyncio.gather(reader, pump, return_exceptions=True)

    async def _read_loop(self, conn: Connection) -> None:
        silence = self._keepalive * 3  # three unanswered pings: the link is dead
        while True:
            try:
                async with asyncio.timeout(silence):
                    msg = await conn.recv()
            except TimeoutError:
                raise TimeoutError(f"nothing from the receiver for {silence:.1f}s") from None
            self._last_recv = time.monotonic()
            if isinstance(msg, Ack):
                disk = self._disks.get(msg.disk_id)
                if disk is not None and disk.window.ack(msg.seq):
                    self._progress = True
                    self._acked(disk)
                    self._wakeup.set()
            elif isinstance(msg, DiskOpened):
                await self._opened(conn, msg)
            elif isinstance(msg, DigestReply):
                self._answered(msg)
            elif isinstance(msg, Ping):
                await conn.send(Pong(msg.nonce))
            elif not isinstance(msg, Pong):
                error = ProtocolViolation(f"unexpected {type(msg).__name__} from the receiver")
                await conn.fail(error)
                raise error

    def _answered(self, msg: DigestReply) -> None:
        pending = self._pending.get(msg.request_id)
        if pending is None or pending.disk_id != msg.disk_id:
            # A second answer to a request resent after a cut, or one its caller gave
            # up on: nothing waits for it.
            log.debug("%s: ignoring DIGEST_REPLY %d", msg.disk_id, msg.request_id)
            return
        del self._pending[msg.request_id]
        self._disks[msg.disk_id].window.remove_request(msg.request_id)
        self._wakeup.set()  # a free slot in the window's count
        if not pending.reply.done():
            pending.reply.set_result(replace(msg, request_id=pending.caller_id))

    async def _opened(self, conn: Connection, msg: DiskOpened) -> None:
        disk = self._disks.get(msg.disk_id)
        if disk is None or not disk.open_sent:
            error = ProtocolViolation(f"DISK_OPENED for {msg.disk_id!r}, which we did not open")
        elif msg.durable_seq < disk.window.acked_seq:
            error = ProtocolViolation(
                f"{msg.disk_id}: receiver is durable up to {msg.durable_seq} but had acked "
                f"{disk.window.acked_seq}; acknowledged data was lost"
            )
        else:
            disk.window.ack(msg.durable_seq)
            self._acked(disk)
            disk.window.rewind()  # resend everything after durable_seq, in order
            disk.opened = True
            self._wakeup.set()
            return
        await conn.fail(error)
        raise error

    async def _pump(self, conn: Connection) -> None:
        """Send, one message per disk per round so no disk starves the others."""
        nonce = 0
        last_ping = 0.0
        while True:
            self._wakeup.clear()
            sent = False
            now = time.monotonic()
            for disk in list(self._disks.values()):
                if not disk.open_sent:
                    disk.open_sent, disk.open_sent_at = True, now
                    await conn.send(OpenDisk(disk.disk_id, disk.machine_id, disk.size))
                    sent = True
                elif not disk.opened and now - disk.open_sent_at > self._connect_timeout:
                    raise TimeoutError(f"no DISK_OPENED for {disk.disk_id} in time")
                elif disk.opened:
                    msg = disk.window.next_to_send(self._window_bytes)
                    if msg is not None:
                        await conn.send(msg)
                        sent = True
            now = time.monotonic()
            if now - max(self._last_recv, last_ping) >= self._keepalive:
                # Quiet for a while: make the receiver answer, or the reader's timeout
                # will find out that the link is dead.
                nonce += 1
                last_ping = now
                await conn.send(Ping(nonce))
            if not sent:
                try:
                    async with asyncio.timeout(self._keepalive):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
