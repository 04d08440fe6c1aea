"""Digest requests against a real secondsite-targetd: the replica's chunk digests as the
sender's stream has it, computed exactly like the agent's, and the named errors."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from appliance.digest import chunk_digest
from appliance.wire.connection import Connection, open_connection
from appliance.wire.errors import ErrorCode, PeerError
from appliance.wire.messages import (
    MAX_DIGEST_CHUNKS,
    Ack,
    Data,
    DigestReply,
    DigestRequest,
    DiskOpened,
    Hello,
    Message,
    OpenDisk,
    Ping,
    Pong,
    Welcome,
)
from appliance.wire.tls import client_context
from tests.conftest import TlsMaterial
from tests.integration.daemons import RoleDaemon, TargetDaemon

pytestmark = pytest.mark.integration

CHUNK = 64 << 10
# Ten full chunks and a short last one of three sectors (chunk 10); chunk 11 is past it.
SIZE = 10 * CHUNK + 3 * 512
LAST = 10


@pytest.fixture
def daemon(tmp_path: Path, tls: TlsMaterial, port: int) -> Iterator[RoleDaemon]:
    # Neither the checkpoint timer (60 s) nor the half-window rule (8 MiB) fires during
    # a test: only the digest request itself can bring the writes before it to the file.
    d = TargetDaemon(
        tmp_path / "target",
        port,
        tls,
        extra_config="[stream]\nwindow_mib = 16\ncheckpoint_seconds = 60\n",
    )
    d.state_dir.mkdir()
    d.start()
    yield d
    if d.process and d.process.poll() is None:
        d.kill()


class Peer:
    """One connection to the daemon, past HELLO; keeps every message it reads."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.seen: list[Message] = []

    @classmethod
    async def connect(cls, daemon: RoleDaemon, tls: TlsMaterial) -> Peer:
        ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
        conn = await open_connection("127.0.0.1", daemon.port, ctx, server_hostname="localhost")
        await conn.send(Hello("test", "digest-test"))
        assert isinstance(await conn.recv(), Welcome)
        return cls(conn)

    async def send(self, *msgs: Message) -> None:
        for msg in msgs:
            await self.conn.send(msg)

    async def until(self, kind: type[Message]) -> Message:
        """Read until a `kind` arrives (a PeerError raises), 10 s at most."""
        while True:
            msg = await asyncio.wait_for(self.conn.recv(), 10)
            self.seen.append(msg)
            if isinstance(msg, kind):
                return msg

    async def open(self, disk_id: str, size: int = SIZE) -> DiskOpened:
        await self.send(OpenDisk(disk_id, "m1", size))
        opened = await self.until(DiskOpened)
        assert isinstance(opened, DiskOpened)
        return opened

    async def digests(self, disk_id: str, request_id: int, chunks: list[int]) -> DigestReply:
        await self.send(DigestRequest(disk_id, request_id, CHUNK, tuple(chunks)))
        reply = await self.until(DigestReply)
        assert isinstance(reply, DigestReply)
        assert (reply.disk_id, reply.request_id, reply.chunk_size) == (disk_id, request_id, CHUNK)
        return reply

    def close(self) -> None:
        self.conn.close()


class Image:
    """The disk as the stream has it, kept locally: what the digests must describe."""

    def __init__(self, disk_id: str) -> None:
        self.disk_id = disk_id
        self.data = bytearray(SIZE)
        self.seq = 0

    def raw(self, offset: int, payload: bytes) -> Data:
        self.seq += 1
        self.data[offset : offset + len(payload)] = payload
        return Data.raw(self.disk_id, self.seq, offset, payload)

    def compressed(self, offset: int, payload: bytes) -> Data:
        self.seq += 1
        self.data[offset : offset + len(payload)] = payload
        return Data.compressed(self.disk_id, self.seq, offset, payload)

    def zero(self, offset: int, length: int) -> Data:
        self.seq += 1
        self.data[offset : offset + length] = bytes(length)
        return Data.zero(self.disk_id, self.seq, offset, length)

    def expected(self, chunks: list[int]) -> tuple[tuple[int, bytes], ...]:
        """Ascending, distinct, chunks inside the disk only; the last one short."""
        inside = sorted({c for c in chunks if c * CHUNK < SIZE})
        return tuple((c, chunk_digest(self.data[c * CHUNK : (c + 1) * CHUNK])) for c in inside)


def test_digests_describe_the_stream_sent_before_the_request(
    daemon: RoleDaemon, tls: TlsMaterial
) -> None:
    async def run() -> None:
        peer = await Peer.connect(daemon, tls)
        try:
            await peer.open("d1")
            image = Image("d1")
            # Sent in one go, no waiting for ACKs: the request right behind them must
            # still see every one of these writes (nothing checkpoints them otherwise).
            writes = [
                image.raw(0, os.urandom(CHUNK)),
                image.raw(CHUNK, os.urandom(2 * CHUNK)),  # chunks 1 and 2
                image.compressed(4 * CHUNK, (b"semi-compressible " * 4000)[:CHUNK]),
                image.raw(6 * CHUNK + 512, os.urandom(1024)),  # part of chunk 6
                image.zero(CHUNK + 4096, 8192),  # zeros over part of chunk 1
                image.raw(LAST * CHUNK, os.urandom(3 * 512)),  # the whole short last chunk
            ]
            # 2 MiB more in 64 KiB frames over chunks 7-8, rewritten many times, so the
            # request queues behind real work.
            for round_ in range(16):
                writes += [image.raw((7 + round_ % 2) * CHUNK, os.urandom(CHUNK))]
            await peer.send(*writes)
            # Written, untouched (zeros), partly written, short last, past the end;
            # out of order, with a duplicate.
            chunks = [LAST, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2, LAST + 1, 2**40]
            reply = await peer.digests("d1", 1, chunks)
            assert reply.digests == image.expected(chunks)
            assert reply.digests[-1] == (LAST, chunk_digest(image.data[LAST * CHUNK :]))
            assert len(image.data[LAST * CHUNK :]) == 1536
            assert dict(reply.digests)[3] == chunk_digest(bytes(CHUNK))  # never written
            # The reply comes after the ACK of everything sent before the request.
            acks = [m.seq for m in peer.seen if isinstance(m, Ack)]
            assert acks and acks[-1] == image.seq

            # More writes, then at once another request: the new contents, not the old.
            before = dict(reply.digests)
            await peer.send(image.raw(3 * CHUNK, os.urandom(CHUNK)), image.zero(0, CHUNK))
            again = await peer.digests("d1", 2, [0, 3, 5])
            assert again.digests == image.expected([0, 3, 5])
            assert dict(again.digests)[0] != before[0]
            assert dict(again.digests)[3] != before[3]
            assert dict(again.digests)[5] == before[5]

            # A full-size request on a small disk: only the chunks inside are answered.
            full = await peer.digests("d1", 3, list(range(MAX_DIGEST_CHUNKS)))
            assert full.digests == image.expected(list(range(LAST + 1)))

            # The connection stays responsive: a ping sent right behind a request is
            # answered, and so is the request.
            await peer.send(DigestRequest("d1", 4, CHUNK, tuple(range(LAST + 1))), Ping(7))
            await peer.until(DigestReply)
            assert Pong(7) in peer.seen
        finally:
            peer.close()

    uvloop.run(run())


def test_digest_checkpoint_survives_kill_9(daemon: RoleDaemon, tls: TlsMaterial) -> None:
    """What a reply described was durable: after kill -9 the replica still holds it."""
    image = Image("d2")

    async def write_and_ask() -> DigestReply:
        peer = await Peer.connect(daemon, tls)
        try:
            await peer.open("d2")
            await peer.send(*(image.raw(i * CHUNK, os.urandom(CHUNK)) for i in range(5)))
            return await peer.digests("d2", 1, list(range(LAST + 1)))
        finally:
            peer.close()

    async def reopen_and_ask() -> tuple[DiskOpened, DigestReply]:
        peer = await Peer.connect(daemon, tls)
        try:
            opened = await peer.open("d2")
            return opened, await peer.digests("d2", 2, list(range(LAST + 1)))
        finally:
            peer.close()

    first = uvloop.run(write_and_ask())
    assert first.digests == image.expected(list(range(LAST + 1)))
    daemon.kill()
    daemon.start()
    opened, second = uvloop.run(reopen_and_ask())
    assert opened.durable_seq == image.seq == 5
    assert second.digests == first.digests


def test_a_disk_not_opened_on_the_connection_is_a_named_error(
    daemon: RoleDaemon, tls: TlsMaterial
) -> None:
    async def ask_without_opening(disk_id: str) -> PeerError:
        peer = await Peer.connect(daemon, tls)
        try:
            await peer.send(DigestRequest(disk_id, 1, CHUNK, (0,)))
            with pytest.raises(PeerError) as caught:
                await peer.until(DigestReply)
            return caught.value
        finally:
            peer.close()

    async def run() -> None:
        # Never opened at all: UNKNOWN_DISK, as for DATA.
        assert (await ask_without_opening("nodisk")).code == ErrorCode.UNKNOWN_DISK
        # Opened and streamed by another connection: that stream's, not ours to query.
        owner = await Peer.connect(daemon, tls)
        try:
            await owner.open("d3")
            error = await ask_without_opening("d3")
            assert error.code == ErrorCode.PROTOCOL_VIOLATION
            assert "not open on this connection" in error.message
            # The owner's stream is untouched by the other connection's mistake.
            reply = await owner.digests("d3", 5, [0])
            assert reply.digests == ((0, chunk_digest(bytes(CHUNK))),)
        finally:
            owner.close()

    uvloop.run(run())
