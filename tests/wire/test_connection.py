"""Connections over real TLS on 127.0.0.1, on the stdlib loop and on uvloop.

For every kind of bad input the server answers with an ERROR frame that the peer
can read (or, for a refused handshake, a TLS alert), closes only that connection,
and counts the code once; a good connection opened before keeps working.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

import pytest

from appliance.checksum import crc32c
from appliance.wire.connection import Connection, ConnectionState, open_connection, start_server
from appliance.wire.errors import (
    BadMagic,
    ConnectionClosed,
    ErrorCode,
    ErrorCounters,
    PeerError,
)
from appliance.wire.framing import HEADER, MAGIC
from appliance.wire.messages import (
    Data,
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    Request,
    Response,
    Welcome,
    encode_message,
)
from appliance.wire.server import WireServer
from appliance.wire.tls import client_context
from tests.conftest import TlsMaterial
from tests.wire.conftest import Runner
from tests.wire.probe import Probe, eventually
from tests.wire.rawpeer import decode_all, tls_exchange

pytestmark = pytest.mark.integration

MAX_BODY = 64 * 1024  # small, so "too large" is cheap to provoke


def wire(*msgs: Message) -> bytes:
    return b"".join(b"".join(bytes(p) for p in encode_message(m)) for m in msgs)


def frame(msg_type: int, body: bytes, *, magic: bytes = MAGIC, version: int = 1) -> bytes:
    return HEADER.pack(magic, version, msg_type, 0, len(body), crc32c(body)) + body


HELLO = wire(Hello("process", "raw"))


@dataclass(frozen=True)
class Case:
    name: str
    payload: bytes
    code: ErrorCode
    close_notify: bool = False
    by_handler: bool = False  # raised by the handler, after it answered the HELLO


CASES = [
    Case("truncated-then-close", HELLO + frame(9, bytes(8))[:11], ErrorCode.TRUNCATED, True),
    # Only the header: the refusal cannot have waited for the 1 MiB body.
    Case("oversized", HELLO + HEADER.pack(MAGIC, 1, 5, 0, 1 << 20, 0), ErrorCode.FRAME_TOO_LARGE),
    Case("wrong-magic", HELLO + frame(9, bytes(8), magic=b"HTTP"), ErrorCode.BAD_MAGIC),
    Case("wrong-version", HELLO + frame(9, bytes(8), version=9), ErrorCode.BAD_VERSION),
    Case(
        "bad-crc",
        HELLO + HEADER.pack(MAGIC, 1, 9, 0, 8, crc32c(bytes(8)) ^ 1) + bytes(8),
        ErrorCode.BAD_CRC,
    ),
    Case("unknown-type", HELLO + frame(77, b"?"), ErrorCode.UNKNOWN_TYPE),
    Case("malformed-body", HELLO + frame(9, b"\x01\x02\x03"), ErrorCode.MALFORMED_BODY),
    Case(
        "out-of-window",
        HELLO + wire(Data.raw("d0", 1, 0, b"a" * 512), Data.raw("d0", 3, 512, b"c" * 512)),
        ErrorCode.OUT_OF_WINDOW,
        by_handler=True,
    ),
    Case(
        "invalid-request",
        HELLO + wire(Request.make(1, "invalid")),
        ErrorCode.INVALID_REQUEST,
        by_handler=True,
    ),
    Case("handler-bug", HELLO + wire(Request.make(2, "boom")), ErrorCode.INTERNAL, by_handler=True),
]


async def serve(probe: Probe, ctx: ssl.SSLContext, counters: ErrorCounters) -> WireServer:
    return await start_server(
        probe.handle,
        "127.0.0.1",
        0,
        ctx,
        counters=counters,
        max_body=MAX_BODY,
        handshake_timeout=1,
    )


async def good_connection(server: WireServer, ctx: ssl.SSLContext) -> Connection:
    conn = await open_connection("127.0.0.1", server.port, ctx, server_hostname="localhost")
    await conn.send(Hello("process", "good"))
    assert isinstance(await conn.recv(), Welcome)
    return conn


async def still_works(conn: Connection) -> None:
    await conn.send(Ping(99))
    assert await conn.recv() == Pong(99)


def changed(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_gets_an_error_frame_and_only_that_connection_closes(
    case: Case, run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        counters = ErrorCounters()
        probe = Probe()
        async with await serve(probe, server_ctx, counters) as server:
            good = await good_connection(server, client_ctx)
            before = counters.snapshot()
            outcome = await asyncio.to_thread(
                tls_exchange, server.port, client_ctx, case.payload, close_notify=case.close_notify
            )
            error = outcome.error_frame()
            assert error is not None, outcome
            assert error.code == case.code
            # Bad bytes close the connection at once: no answer to what came before
            # them is promised. A handler's error comes after what it already sent.
            assert outcome.messages[-1] == error
            if case.by_handler:
                assert isinstance(outcome.messages[0], Welcome)
            await eventually(lambda: counters.get(case.code) > before[case.code.name.lower()])
            await eventually(lambda: probe.conns[-1].state is ConnectionState.CLOSED)
            assert changed(before, counters.snapshot()) == {case.code.name.lower(): 1}
            await still_works(good)
            assert good.state is ConnectionState.OPEN
            good.close()

    run(scenario())


@pytest.mark.parametrize("who", ["rogue-ca", "expired", "plain-tcp", "silent"])
def test_refused_handshakes_are_counted_and_harmless(
    who: str,
    run: Runner,
    tls: TlsMaterial,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
) -> None:
    async def scenario() -> None:
        counters = ErrorCounters()
        probe = Probe()
        async with await serve(probe, server_ctx, counters) as server:
            good = await good_connection(server, client_ctx)
            if who in ("rogue-ca", "expired"):
                leaf = tls.rogue_client if who == "rogue-ca" else tls.expired_client
                ctx = client_context(leaf.cert, leaf.key, tls.ca.cert)
                outcome = await asyncio.to_thread(tls_exchange, server.port, ctx, HELLO)
                assert outcome.data == b""  # never served
                assert outcome.tls_error is not None  # the TLS alert, where the peer can see it
            elif who == "plain-tcp":
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = await reader.read()  # the server closes on us
                assert b"HTTP" not in answer
                writer.close()
            else:  # connects and says nothing: the handshake timeout ends it
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                assert await reader.read() == b""
                writer.close()
            await eventually(lambda: counters.get(ErrorCode.BAD_CERTIFICATE) == 1)
            assert counters.total() == 1
            assert probe.conns == [probe.conns[0]]  # the handler never saw the intruder
            await still_works(good)
            good.close()

    run(scenario())


def test_peer_identity_and_byte_counts(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        probe = Probe()
        async with await serve(probe, server_ctx, ErrorCounters()) as server:
            conn = await good_connection(server, client_ctx)
            assert conn.peer == "target.test"
            assert probe.conns[0].peer == "process.test"
            assert conn.bytes_out == len(wire(Hello("process", "good")))
            assert conn.bytes_in == len(wire(Welcome("probe", 1 << 20, 1 << 20)))
            await conn.send(Request.make(1, "echo", a=1))
            reply = await conn.recv()
            assert isinstance(reply, Response) and reply.json() == {"a": 1}
            conn.close()
            await asyncio.wait_for(conn.wait_closed(), 5)
            assert conn.state is ConnectionState.CLOSED
            with pytest.raises(ConnectionClosed):
                await conn.send(Ping(1))
            with pytest.raises(ConnectionClosed):
                await conn.recv()

    run(scenario())


def test_peer_error_reaches_the_client_as_peer_error(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        counters = ErrorCounters()
        async with await serve(Probe(), server_ctx, counters) as server:
            conn = await good_connection(server, client_ctx)
            await conn.send(Data.raw("d", 5, 0, b"x" * 512))  # seq 5 where 1 is expected
            with pytest.raises(PeerError) as info:
                await conn.recv()
            assert info.value.code is ErrorCode.OUT_OF_WINDOW
            with pytest.raises(ConnectionClosed):
                await conn.recv()
            await conn.wait_closed()
            assert counters.get(ErrorCode.OUT_OF_WINDOW) == 1

    run(scenario())


def test_handler_bug_is_logged_once_with_its_traceback(
    run: Runner,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        counters = ErrorCounters()
        async with await serve(Probe(), server_ctx, counters) as server:
            conn = await good_connection(server, client_ctx)
            await conn.send(Request.make(1, "boom"))
            with pytest.raises(PeerError) as info:
                await conn.recv()
            assert info.value.code is ErrorCode.INTERNAL
            assert "ZeroDivision" not in info.value.message  # no internals to the peer

    with caplog.at_level(logging.INFO, logger="appliance.wire"):
        run(scenario())
    bugs = [r for r in caplog.records if r.exc_info]
    assert len(bugs) == 1
    assert bugs[0].exc_info is not None and bugs[0].exc_info[0] is ZeroDivisionError


def test_server_close_tells_clients_it_is_shutting_down(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        counters = ErrorCounters()
        server = await serve(Probe(), server_ctx, counters)
        conn = await good_connection(server, client_ctx)
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        with pytest.raises(PeerError) as info:
            await conn.recv()
        assert info.value.code is ErrorCode.SHUTTING_DOWN
        assert counters.total() == 0  # a shutdown is not an error of the peer
        with pytest.raises(OSError):
            await open_connection("127.0.0.1", server.port, client_ctx, timeout=2)

    run(scenario())


def test_malformed_bytes_from_the_server_fail_the_client_side(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """recv raises the framing error, the client counts it and tells the server."""

    async def scenario() -> None:
        heard: list[bytes] = []

        async def bad_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(frame(9, bytes(8), magic=b"JUNK"))
            heard.append(await reader.read())
            writer.close()

        server = await asyncio.start_server(bad_server, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        counters = ErrorCounters()
        conn = await open_connection(
            "127.0.0.1", port, client_ctx, server_hostname="localhost", counters=counters
        )
        with pytest.raises(BadMagic):
            await conn.recv()
        await asyncio.wait_for(conn.wait_closed(), 5)
        await eventually(lambda: bool(heard))
        (error,) = decode_all(heard[0])
        assert isinstance(error, Error) and error.code is ErrorCode.BAD_MAGIC
        assert counters.get(ErrorCode.BAD_MAGIC) == 1
        server.close()
        await server.wait_closed()

    run(scenario())
