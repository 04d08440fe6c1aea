"""Digest requests relayed by a real secondsite-processd to a real secondsite-targetd.

The agent is a StreamSender with role "agent"; it sends DATA and, without waiting for
any ACK, a DIGEST_REQUEST. The process server must hand the request to the master
target behind every frame the agent sent before it (not only those already spooled,
forwarded or acknowledged), so the digests equal `chunk_digest` over the bytes the
agent wrote up to the request - and not the writes that follow it.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import uvloop

from appliance.digest import chunk_digest
from appliance.wire.connection import Connection, open_connection
from appliance.wire.errors import ErrorCode, PeerError
from appliance.wire.messages import (
    Data,
    DigestReply,
    DigestRequest,
    DiskOpened,
    Hello,
    OpenDisk,
    Welcome,
)
from appliance.wire.reconnect import Backoff
from appliance.wire.sender import StreamSender
from appliance.wire.tls import client_context
from tests.conftest import TlsMaterial, free_port
from tests.integration.daemons import RoleDaemon

pytestmark = pytest.mark.integration

DISK, MACHINE = "disk-d", "machine-d"
CHUNK = 64 << 10
SIZE = 16 * CHUNK + 3 * 512  # the last chunk (16) is short, as the agent hashes it
CHUNKS = tuple(range(17))


def agent(process: RoleDaemon, tls: TlsMaterial) -> StreamSender:
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    sender = StreamSender("127.0.0.1", process.port, ctx, name="agent-test", role="agent",
                          backoff=Backoff(initial=0.05, maximum=0.5))  # fmt: skip
    sender.add_disk(DISK, MACHINE, SIZE)
    return sender


class Image:
    """The disk as the agent wrote it: what each reply must describe."""

    def __init__(self, seed: int) -> None:
        self.data = bytearray(SIZE)
        self.seq = 0
        self.rng = random.Random(seed)

    def write(self) -> Data:
        """A random sector-aligned write, some of them straddling chunks."""
        sectors = self.rng.randint(1, 300)
        offset = self.rng.randrange(0, SIZE // 512 - sectors + 1) * 512
        payload = self.rng.randbytes(sectors * 512)
        self.data[offset : offset + len(payload)] = payload
        self.seq += 1
        return Data.raw(DISK, self.seq, offset, payload)

    def digests(self) -> tuple[tuple[int, bytes], ...]:
        return tuple((i, chunk_digest(self.data[i * CHUNK : (i + 1) * CHUNK])) for i in CHUNKS)


def test_relayed_digests_describe_exactly_what_the_agent_sent_before(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial
) -> None:
    process, _ = sites
    image = Image(21)
    rounds = 8  # more than the process server relays at once per connection (4)

    async def run() -> None:
        sender = agent(process, tls)
        await sender.start()
        expected: list[tuple[tuple[int, bytes], ...]] = []
        replies: list[asyncio.Future[DigestReply]] = []
        for n in range(rounds):
            for _ in range(25):
                await sender.submit(image.write())
            # Right behind the writes, no ACK awaited; then more writes at once.
            replies.append(await sender.queue_request(DigestRequest(DISK, 100 + n, CHUNK, CHUNKS)))
            expected.append(image.digests())
        for _ in range(25):
            await sender.submit(image.write())  # after every request: in none of them
        for n, (reply, wanted) in enumerate(zip(replies, expected, strict=True)):
            answer = await asyncio.wait_for(reply, 60)
            assert (answer.disk_id, answer.request_id, answer.chunk_size) == (DISK, 100 + n, CHUNK)
            assert answer.digests == wanted, f"request {n} does not describe the writes before it"
        # And the final state, once everything is in.
        last = await asyncio.wait_for(sender.request(DigestRequest(DISK, 7, CHUNK, CHUNKS)), 60)
        assert last.digests == image.digests()
        await sender.close()

    uvloop.run(run())


async def connect(daemon: RoleDaemon, tls: TlsMaterial) -> Connection:
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    conn = await open_connection("127.0.0.1", daemon.port, ctx, server_hostname="localhost")
    await conn.send(Hello("agent", "digest-test"))
    assert isinstance(await conn.recv(), Welcome)
    return conn


async def refused(conn: Connection, request: DigestRequest) -> PeerError:
    await conn.send(request)
    with pytest.raises(PeerError) as caught:
        async with asyncio.timeout(10):
            while True:
                await conn.recv()
    conn.close()
    return caught.value


def test_a_request_for_a_disk_not_opened_is_refused(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial
) -> None:
    process, _ = sites

    async def run() -> None:
        conn = await connect(process, tls)
        error = await refused(conn, DigestRequest("not-opened", 1, CHUNK, (0,)))
        assert error.code == ErrorCode.UNKNOWN_DISK

    uvloop.run(run())


def test_without_a_master_target_a_request_is_refused(tmp_path: Path, tls: TlsMaterial) -> None:
    process = RoleDaemon(tmp_path / "process", free_port(), tls, "", "appliance.process")
    process.state_dir.mkdir()
    process.start()

    async def run() -> None:
        conn = await connect(process, tls)
        await conn.send(OpenDisk(DISK, MACHINE, SIZE))
        assert isinstance(await asyncio.wait_for(conn.recv(), 10), DiskOpened)
        error = await refused(conn, DigestRequest(DISK, 1, CHUNK, (0,)))
        assert error.code == ErrorCode.INVALID_REQUEST
        assert "no master target assigned" in str(error)

    try:
        uvloop.run(run())
    finally:
        process.kill()
