"""A raw peer for the connection tests: writes arbitrary bytes over real TLS (or plain TCP).

It drives `ssl.SSLObject` over memory BIOs on a blocking socket, so it can do what a
well-behaved client never would: send half a frame and then a TLS close_notify, yet
keep reading to see the server's answer. Blocking, so run it with `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass, field

from appliance.wire.errors import WireError
from appliance.wire.framing import FrameDecoder
from appliance.wire.messages import Error, Message, decode_message


@dataclass
class Outcome:
    data: bytes = b""  # application bytes received until the stream ended
    tls_error: str | None = None  # the TLS error or alert that ended it, if any
    messages: list[Message] = field(default_factory=list)

    def error_frame(self) -> Error | None:
        errors = [m for m in self.messages if isinstance(m, Error)]
        return errors[-1] if errors else None


def decode_all(data: bytes) -> list[Message]:
    decoder = FrameDecoder()
    try:
        return [decode_message(f) for f in decoder.feed(data)]
    except WireError:
        return []


def tls_exchange(
    port: int,
    ctx: ssl.SSLContext,
    payload: bytes,
    *,
    close_notify: bool = False,
    server_hostname: str = "localhost",
    timeout: float = 10.0,
) -> Outcome:
    """Handshake, write `payload`, optionally send close_notify, read until the end."""
    out = Outcome()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)

        def flush() -> None:
            pending = outgoing.read()
            if pending:
                sock.sendall(pending)

        def fill() -> bool:
            try:
                chunk = sock.recv(65536)
            except (ConnectionError, TimeoutError) as exc:
                out.tls_error = f"socket: {exc!r}"
                return False
            if not chunk:
                incoming.write_eof()
                return False
            incoming.write(chunk)
            return True

        try:
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    flush()
                    if not fill():
                        break
            flush()
            obj.write(payload)
            flush()
            if close_notify:
                # Ours goes out; we keep reading rather than wait for theirs.
                with contextlib.suppress(ssl.SSLWantReadError):
                    obj.unwrap()
                flush()
            while True:
                try:
                    chunk = obj.read(65536)
                except ssl.SSLWantReadError:
                    if not fill():
                        # One more read turns a pending alert or a ragged EOF into an error.
                        try:
                            chunk = obj.read(65536)
                        except ssl.SSLError as exc:
                            out.tls_error = out.tls_error or str(exc)
                        break
                    continue
                except ssl.SSLZeroReturnError:
                    break
                if not chunk:
                    break
                out.data += chunk
        except ssl.SSLError as exc:
            out.tls_error = str(exc)
        except (ConnectionError, TimeoutError) as exc:
            out.tls_error = out.tls_error or f"socket: {exc!r}"
    out.messages = decode_all(out.data)
    return out


def tcp_exchange(port: int, payload: bytes, *, timeout: float = 10.0) -> bytes:
    """Plain TCP: write `payload`, read until the server closes."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionError:
            pass
    return received
