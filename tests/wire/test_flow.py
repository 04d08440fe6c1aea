"""Back-pressure over real TLS: a peer that stops reading stops the sender, boundedly."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import pytest

from appliance.wire.connection import WRITE_HIGH_WATER, open_connection, start_server
from appliance.wire.errors import ErrorCounters
from appliance.wire.framing import HEADER
from appliance.wire.messages import Data
from tests.wire.conftest import Runner
from tests.wire.probe import Probe, eventually

pytestmark = pytest.mark.integration

PAYLOAD = bytes(256 * 1024)
FRAMES = 400  # 100 MiB: far more than every buffer on the path can hold
INBOUND_LIMIT = 1024 * 1024


async def stalled(
    progress: list[int], paused: Callable[[], bool], quiet: float = 0.3, timeout: float = 15.0
) -> None:
    """Wait until the sender is paused and `progress[0]` has not moved for `quiet` s."""
    async with asyncio.timeout(timeout):
        while True:
            before = progress[0]
            await asyncio.sleep(quiet)
            if progress[0] == before and paused():
                return


def test_a_peer_that_stops_reading_blocks_send_and_resumes(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    frame_size = HEADER.size + len(b"".join(Data.raw("d", 1, 0, b"").encode())) + len(PAYLOAD)

    async def scenario() -> None:
        probe = Probe(hold=True)  # accepts the connection, then reads nothing
        async with await start_server(
            probe.handle,
            "127.0.0.1",
            0,
            server_ctx,
            counters=ErrorCounters(),
            inbound_limit=INBOUND_LIMIT,
        ) as server:
            conn = await open_connection(
                "127.0.0.1", server.port, client_ctx, server_hostname="localhost"
            )
            sent = [0]

            async def blast() -> None:
                for seq in range(1, FRAMES + 1):
                    await conn.send(Data.raw("d", seq, 0, PAYLOAD))
                    sent[0] = seq

            sender = asyncio.create_task(blast())
            await stalled(sent, lambda: conn.writing_paused)

            # The sender is parked in send(), paused by the transport...
            assert not sender.done()
            assert conn.writing_paused
            # ...with what it buffers bounded by the high-water mark plus one frame,
            assert conn.write_buffer_size <= WRITE_HIGH_WATER + frame_size
            # ...and the whole path holding a bounded amount, far below what was offered.
            assert sent[0] * frame_size < 48 * 1024 * 1024
            assert sent[0] < FRAMES

            # The receiving side queued at most its limit (plus one read), then paused.
            (peer,) = probe.conns
            assert peer.reading_paused
            assert peer.queued_bytes <= INBOUND_LIMIT + 2 * frame_size

            probe.release.set()  # the peer reads again
            await asyncio.wait_for(sender, 60)
            await eventually(lambda: probe.received_bytes == FRAMES * len(PAYLOAD), 60)
            assert not peer.reading_paused
            assert not conn.writing_paused
            conn.close()

    run(scenario())
