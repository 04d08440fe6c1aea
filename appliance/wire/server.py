"""The accept loop: one task per peer, a refused handshake counted, a failing peer alone.

`WireServer` accepts plain TCP and runs the TLS handshake itself
(`loop.connect_accepted_socket`), so that a refused handshake (wrong CA, expired
certificate, not TLS at all) reaches us, to be counted as BAD_CERTIFICATE, instead of
vanishing into the event loop's debug log. (`loop.start_tls` on an accepted transport
would do too on the stdlib loop, but uvloop starts reading as soon as the connection
is made and the ClientHello would be lost.)

Then it runs the handler. A WireError from it becomes an ERROR frame with its code;
PeerError and ConnectionClosed just end the connection; anything else is a bug,
logged once with its traceback and answered with INTERNAL. Only that connection
closes, and each connection counts at most one error. `start_server` in
`connection` builds it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Self

from appliance.wire.connection import (
    Connection,
    ConnectionState,
    Handler,
    _Protocol,
)
from appliance.wire.errors import (
    BadCertificate,
    ConnectionClosed,
    ErrorCode,
    ErrorCounters,
    InternalError,
    PeerError,
    ShuttingDown,
    WireError,
)
from appliance.wire.tls import organizational_unit, peer_identity, serial_hex

log = logging.getLogger(__name__)


class WireServer:
    """The listening socket, its accept loop, and one task per connection."""

    def __init__(
        self,
        listener: socket.socket,
        handler: Handler,
        ssl_context: ssl.SSLContext,
        *,
        counters: ErrorCounters,
        max_body: int,
        handshake_timeout: float,
        inbound_limit: int,
        max_connections: int,
        allow_anonymous: bool = False,
    ) -> None:
        self.counters = counters
        #: Certificate serials (lower-case hex) refused at the handshake; see `revoke`.
        self.revoked: set[str] = set()
        self._allow_anonymous = allow_anonymous
        self.connections: set[Connection] = set()
        self._listener = listener
        self._handler = handler
        self._ssl = ssl_context
        self._max_body = max_body
        self._handshake_timeout = handshake_timeout
        self._inbound_limit = inbound_limit
        self._max_connections = max_connections
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = self._loop.create_task(self._accept_loop())
        self.port = int(listener.getsockname()[1])

    def close(self) -> None:
        """Stop listening and end every connection (their peers get SHUTTING_DOWN)."""
        self._accepting.cancel()
        # The accept task may not have started yet (then its finally never runs).
        self._listener.close()
        for task in self._tasks:
            task.cancel()

    def revoke(self, serials: set[str]) -> int:
        """Refuse these certificate serials from now on and cut the peers using them;
        returns how many connections were cut."""
        self.revoked = {serial_hex(s) for s in serials}
        cut = [c for c in self.connections if c.peer_serial in self.revoked]
        for conn in cut:
            log.warning("cutting %s: its certificate %s was revoked", conn.peer, conn.peer_serial)
            conn.abort()
        return len(cut)

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, return_exceptions=True)
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    async def _accept_loop(self) -> None:
        try:
            while True:
                try:
                    sock, _ = await self._loop.sock_accept(self._listener)
                except OSError as exc:  # EMFILE and friends: wait instead of spinning
                    log.warning("accept failed: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                if len(self._tasks) >= self._max_connections:
                    log.warning("refusing a connection: %d open", len(self._tasks))
                    sock.close()
                    continue
                task = self._loop.create_task(self._serve(sock))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            self._listener.close()

    async def _serve(self, sock: socket.socket) -> None:
        # The handshake runs here rather than inside a loop-managed server, so that a
        # refused one reaches us (to be counted) instead of the loop's debug log.
        conn = Connection(
            max_body=self._max_body, counters=self.counters, inbound_limit=self._inbound_limit
        )
        conn.state = ConnectionState.HANDSHAKING
        try:
            where = sock.getpeername()
        except OSError:  # already gone
            where = "?"
        try:
            async with asyncio.timeout(self._handshake_timeout + 1):
                transport, _ = await self._loop.connect_accepted_socket(
                    lambda: _Protocol(conn),
                    sock,
                    ssl=self._ssl,
                    ssl_handshake_timeout=self._handshake_timeout,
                )
            peercert = transport.get_extra_info("peercert")
            if peercert or not self._allow_anonymous:
                conn.peer = peer_identity(transport)
                conn.peer_serial = serial_hex(peercert.get("serialNumber", "0"))
                conn.peer_unit = organizational_unit(peercert)
                if conn.peer_serial in self.revoked:
                    raise BadCertificate(
                        f"certificate {conn.peer_serial} of {conn.peer} is revoked"
                    )
        except (OSError, TimeoutError, BadCertificate) as exc:
            self.counters.count(ErrorCode.BAD_CERTIFICATE)
            log.info("TLS handshake with %s refused: %s", where, exc)
            conn.abort()
            return
        self.connections.add(conn)
        try:
            await _run_handler(self._handler, conn)
        finally:
            self.connections.discard(conn)
            conn.close()
            await conn.wait_closed()


async def _run_handler(handler: Handler, conn: Connection) -> None:
    try:
        await handler(conn)
    except (PeerError, ConnectionClosed) as exc:
        log.debug("connection from %s ended: %s", conn.peer, exc)
    except WireError as exc:
        await conn.fail(exc)
    except asyncio.CancelledError:
        await conn.fail(ShuttingDown("server shutting down"), count=False)
        raise
    except Exception:
        log.exception("bug while serving %s", conn.peer)
        await conn.fail(InternalError("internal error"))
