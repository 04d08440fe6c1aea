"""A framed, flow-controlled TLS connection, and a server that never lets one peer hurt another.

`Connection` turns an asyncio TLS transport into `send(msg)` / `recv() -> msg`:

- Writes: `send` hands the encoded frame to the transport without copying the payload
  and, while the transport has called pause_writing, waits for resume_writing (or for
  connection_lost, which wakes every waiter). What one connection buffers is bounded
  by the write high-water mark plus the frame being written.
- Reads: frames are decoded as bytes arrive and queued; past `inbound_limit` queued
  bytes the transport is paused and it resumes once `recv` has drained half of it.
- Errors: bytes that are not valid frames or messages make the connection send an
  ERROR frame with the code, close, count the code once, and `recv` raises that
  error after the messages that came before it. An ERROR frame from the peer makes
  `recv` raise PeerError. The end of the stream makes `recv` raise ConnectionClosed.

`start_server` (see `server.WireServer`) serves many peers so that one peer's
failure, refused handshake or bug never touches another.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

from appliance.wire.errors import (
    BadCertificate,
    ConnectionClosed,
    ErrorCode,
    ErrorCounters,
    MalformedFrame,
    PeerError,
    WireError,
)
from appliance.wire.framing import HEADER, MAX_BODY, Frame, FrameDecoder, buffer_size
from appliance.wire.messages import Error, Message, decode_message, encode_message
from appliance.wire.tls import peer_identity

if TYPE_CHECKING:
    from appliance.wire.server import WireServer

log = logging.getLogger(__name__)

WRITE_HIGH_WATER = 1024 * 1024  # bytes the TLS transport may hold before pausing us
INBOUND_LIMIT = 8 * 1024 * 1024  # decoded bytes queued for recv() before pausing reads
CLOSE_TIMEOUT = 5.0  # a peer that will not take our last bytes is cut off after this
_DISCARD = memoryview(bytearray(64 * 1024))  # where bytes we no longer want are read to


class ConnectionState(StrEnum):
    CONNECTING = "connecting"
    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class _Protocol(asyncio.BufferedProtocol):
    """The transport's callbacks, forwarded to the Connection that owns the state.

    A BufferedProtocol: the TLS layer decrypts straight into the decoder's buffers,
    so a large DATA payload is never copied on its way in.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport but implement it.
        self._conn._on_made(cast(asyncio.Transport, transport))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._conn._get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._conn._on_buffer(nbytes)

    def eof_received(self) -> bool:
        self._conn._on_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn._on_lost(exc)

    def pause_writing(self) -> None:
        self._conn._write_paused = True

    def resume_writing(self) -> None:
        self._conn._write_paused = False
        self._conn._wake_drainers()


class Connection:
    """One peer. Single reader (one `recv` at a time); `send` may be called concurrently."""

    def __init__(
        self,
        *,
        max_body: int = MAX_BODY,
        counters: ErrorCounters | None = None,
        inbound_limit: int = INBOUND_LIMIT,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.counters = counters
        self.peer = ""
        self.peer_serial: str | None = None  # the certificate's serial, lower-case hex
        self.peer_unit: str | None = None  # its OU: the component kind, on the server side
        self.state = ConnectionState.CONNECTING
        self.bytes_in = 0
        self.bytes_out = 0
        self.send_max_body = MAX_BODY  # the peer's limit; lower it from its Welcome
        self._decoder = FrameDecoder(max_body)
        self._transport: asyncio.Transport | None = None
        self._inbox: deque[tuple[Message, int]] = deque()
        self._inbox_bytes = 0
        self._inbound_limit = inbound_limit
        self._reading_paused = False
        self._recv_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drainers: list[asyncio.Future[None]] = []
        self._terminal: WireError | None = None  # raised by recv once the inbox is empty
        self._failed = False  # an error was already counted and reported
        self._discarding = False  # the last get_buffer() lent _DISCARD
        self._close_timeout = close_timeout
        self._abort_handle: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()

    def __repr__(self) -> str:
        return f"<Connection peer={self.peer!r} {self.state}>"

    # -- public API --------------------------------------------------------------------

    @property
    def writing_paused(self) -> bool:
        return self._write_paused

    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    @property
    def queued_bytes(self) -> int:
        """Decoded bytes waiting for recv()."""
        return self._inbox_bytes

    @property
    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default) if self._transport else default

    async def send(self, msg: Message) -> None:
        """Write one message; waits while the transport is paused. ConnectionClosed if gone."""
        self.send_nowait(msg)
        if self._write_paused:
            await self.drain()

    def send_nowait(self, msg: Message) -> None:
        """Write one message without waiting for the transport to drain.

        Only for small messages whose number is bounded elsewhere (ACKs within a
        window); anything on the data path must use `send` so back-pressure holds.
        """
        if self.state is not ConnectionState.OPEN or self._transport is None:
            raise ConnectionClosed(f"cannot send {type(msg).__name__}: {self._why_closed()}")
        parts = encode_message(msg, max_body=self.send_max_body)
        if len(parts) > 2:
            # Header and fields in one piece, so they travel in one TLS record rather
            # than two tiny ones; only the payload (always last) is passed uncopied.
            parts = [b"".join(parts[:-1]), parts[-1]]
        self._transport.writelines(parts)
        self.bytes_out += sum(buffer_size(p) for p in parts)

    async def drain(self) -> None:
        """Wait until the transport accepts more writes (resume_writing or connection_lost)."""
        while self._write_paused:
            if self.state is ConnectionState.CLOSED:
                raise ConnectionClosed(self._why_closed())
            waiter = self._loop.create_future()
            self._drainers.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._drainers:
                    self._drainers.remove(waiter)
        if self.state is ConnectionState.CLOSED:
            raise ConnectionClosed(self._why_closed())

    async def recv(self) -> Message:
        """The next message; PeerError, a MalformedFrame or ConnectionClosed at the end."""
        while True:
            if self._inbox:
                msg, size = self._inbox.popleft()
                self._inbox_bytes -= size
                if self._reading_paused and self._inbox_bytes <= self._inbound_limit // 2:
                    self._reading_paused = False
                    if self._transport is not None and not self._transport.is_closing():
                        self._transport.resume_reading()
                return msg
            if self._terminal is not None:
                exc = self._terminal
                # Raise the real cause once; afterwards the connection is simply closed.
                self._terminal = ConnectionClosed(f"closed after {exc}")
                raise exc
            if self._recv_waiter is not None:
                raise RuntimeError("recv() is already being awaited on this connection")
            self._recv_waiter = self._loop.create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None

    async def fail(self, error: WireError, *, count: bool = True) -> None:
        """Send an ERROR frame for `error` (best effort), close, and count the code.

        Only the first failure of a connection is reported and counted.
        """
        self._fail_now(error, count=count)

    def close(self) -> None:
        """Start a graceful TLS close; buffered writes are flushed first (bounded in time)."""
        self._set_terminal(ConnectionClosed("closed locally"))
        self._close_transport()

    def abort(self) -> None:
        self._set_terminal(ConnectionClosed("aborted locally"))
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    # -- transport callbacks ----------------------------------------------------------

    def _on_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.state is ConnectionState.CONNECTING or self.state is ConnectionState.HANDSHAKING:
            self.state = ConnectionState.OPEN

    def _get_buffer(self, sizehint: int) -> memoryview:
        self._discarding = self._failed or self.state is not ConnectionState.OPEN
        if self._discarding:
            return _DISCARD  # we are closing: nothing more from this peer matters
        return self._decoder.get_buffer(sizehint)

    def _on_buffer(self, nbytes: int) -> None:
        if self._discarding:
            return
        self.bytes_in += nbytes
        try:
            frames = self._decoder.buffer_updated(nbytes)
        except MalformedFrame as exc:
            if self._deliver(exc.frames):
                self._fail_now(exc)
            return
        self._deliver(frames)

    def _deliver(self, frames: list[Frame]) -> bool:
        """Queue decoded messages; False if one was malformed or an ERROR (we closed)."""
        for frame in frames:
            try:
                msg = decode_message(frame)
            except MalformedFrame as exc:
                self._fail_now(exc)
                return False
            if isinstance(msg, Error):
                self._set_terminal(PeerError(msg.code, msg.message))
                self._close_transport()
                return False
            size = HEADER.size + len(frame.body)
            self._inbox.append((msg, size))
            self._inbox_bytes += size
        if self._inbox:
            self._wake_reader()
        if self._inbox_bytes > self._inbound_limit and not self._reading_paused:
            assert self._transport is not None
            self._reading_paused = True
            self._transport.pause_reading()
        return True

    def _on_eof(self) -> None:
        if self._failed or self._terminal is not None:
            return
        try:
            self._decoder.eof()
        except MalformedFrame as exc:
            self._fail_now(exc)  # the peer may still read our answer after its close_notify
            return
        self._set_terminal(ConnectionClosed("peer closed the connection"))

    def _on_lost(self, exc: Exception | None) -> None:
        if self._terminal is None and not self._failed:
            try:
                self._decoder.eof()
            except MalformedFrame as truncated:
                self._failed = True
                self._count(truncated.code)
                self._set_terminal(truncated)
        why = f"connection lost: {exc}" if exc else "connection closed"
        self._set_terminal(ConnectionClosed(why))
        self.state = ConnectionState.CLOSED
        if self._abort_handle is not None:
            self._abort_handle.cancel()
        self._wake_drainers()
        self._wake_reader()
        if not self._closed.done():
            self._closed.set_result(None)

    # -- internals --------------------------------------------------------------------

    def _count(self, code: ErrorCode) -> None:
        if self.counters is not None:
            self.counters.count(code)

    def _fail_now(self, error: WireError, *, count: bool = True) -> None:
        if self._failed:
            return
        self._failed = True
        if count:
            self._count(error.code)
        log.info("closing connection from %s: %s", self.peer or "?", error)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.writelines(encode_message(Error(error.code, error.message)))
        self._set_terminal(error)
        self._close_transport()

    def _set_terminal(self, error: WireError) -> None:
        if self._terminal is None:
            self._terminal = error
        self._wake_reader()

    def _close_transport(self) -> None:
        if self.state is ConnectionState.OPEN or self.state is ConnectionState.CONNECTING:
            self.state = ConnectionState.CLOSING
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if self._abort_handle is None:
            self._abort_handle = self._loop.call_later(self._close_timeout, transport.abort)

    def _why_closed(self) -> str:
        return str(self._terminal) if self._terminal is not None else str(self.state)

    def _wake_reader(self) -> None:
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drainers(self) -> None:
        for waiter in self._drainers:
            if not waiter.done():
                waiter.set_result(None)
        self._drainers.clear()


async def open_connection(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    max_body: int = MAX_BODY,
    timeout: float = 10,
    counters: ErrorCounters | None = None,
    inbound_limit: int = INBOUND_LIMIT,
) -> Connection:
    """Connect and complete the TLS handshake within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    conn = Connection(max_body=max_body, counters=counters, inbound_limit=inbound_limit)
    async with asyncio.timeout(timeout):
        transport, _ = await loop.create_connection(
            lambda: _Protocol(conn),
            host,
            port,
            ssl=ssl_context,
            server_hostname=server_hostname or host,
            ssl_handshake_timeout=timeout,
        )
    try:
        conn.peer = peer_identity(transport)
    except BadCertificate:
        transport.abort()
        raise
    return conn


Handler = Callable[[Connection], Awaitable[None]]


async def start_server(
    handler: Handler,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    counters: ErrorCounters,
    max_body: int = MAX_BODY,
    handshake_timeout: float = 10,
    inbound_limit: int = INBOUND_LIMIT,
    max_connections: int = 1024,
    allow_anonymous: bool = False,
) -> WireServer:
    """Listen on host:port (0: any free port, see `.port`); serve each peer with `handler`.

    `allow_anonymous` admits peers without a certificate (their `peer` is "" and their
    `peer_serial` None) for a handler that only lets them enrol; the context must then
    use CERT_OPTIONAL."""
    from appliance.wire.server import WireServer  # it builds on this module

    listener = socket.create_server((host, port), backlog=128)
    listener.setblocking(False)
    return WireServer(
        listener,
        handler,
        ssl_context,
        counters=counters,
        max_body=max_body,
        handshake_timeout=handshake_timeout,
        inbound_limit=inbound_limit,
        max_connections=max_connections,
        allow_anonymous=allow_anonymous,
    )
