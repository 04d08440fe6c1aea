"""The server side of the connection tests: a tiny receiver that records its connections.

It answers HELLO with WELCOME and PING with PONG, checks DATA sequence numbers (a gap
raises OutOfWindow, as the master target does), and turns a few REQUEST methods into
handler failures: "invalid" raises InvalidRequest, "boom" raises a plain bug.
`hold` stops it reading until `release` is set, for the back-pressure tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from appliance.wire.connection import Connection
from appliance.wire.errors import InvalidRequest, OutOfWindow
from appliance.wire.messages import Data, Hello, Ping, Pong, Request, Response, Welcome


class Probe:
    def __init__(self, *, hold: bool = False) -> None:
        self.conns: list[Connection] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.received_bytes = 0
        self.received_frames = 0

    async def handle(self, conn: Connection) -> None:
        self.conns.append(conn)
        await self.release.wait()
        next_seq: dict[str, int] = {}
        while True:
            msg = await conn.recv()
            self.received_frames += 1
            if isinstance(msg, Hello):
                await conn.send(Welcome("probe", 1 << 20, 1 << 20))
            elif isinstance(msg, Ping):
                await conn.send(Pong(msg.nonce))
            elif isinstance(msg, Data):
                self.received_bytes += msg.wire_size
                expected = next_seq.get(msg.disk_id, 1)
                if msg.seq > expected:
                    raise OutOfWindow(f"{msg.disk_id}: seq {msg.seq}, expected {expected}")
                next_seq[msg.disk_id] = max(expected, msg.seq + 1)
            elif isinstance(msg, Request):
                if msg.method == "invalid":
                    raise InvalidRequest("no such thing")
                if msg.method == "boom":
                    raise ZeroDivisionError("a bug in the handler")
                await conn.send(Response.make(msg.request_id, msg.json()))


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until `predicate()` holds (state changes that land a moment after an event)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
