"""Read requests (failback) against a real secondsite-targetd: the replica's bytes as the
connection's stream has them, in the cheapest encoding, and the named errors."""

from __future__ import annotations

import os

import pytest
import uvloop

from appliance.wire.errors import ErrorCode, PeerError
from appliance.wire.messages import (
    MAX_READ,
    Ack,
    Encoding,
    Ping,
    Pong,
    ReadReply,
    ReadRequest,
)
from tests.conftest import TlsMaterial
from tests.integration.daemons import RoleDaemon
from tests.integration.test_targetd_digest import CHUNK, SIZE, Image, Peer, daemon

pytestmark = pytest.mark.integration
__all__ = ["daemon"]  # the fixture, shared with the digest tests


async def read(peer: Peer, disk_id: str, request_id: int, offset: int, length: int) -> ReadReply:
    await peer.send(ReadRequest(disk_id, request_id, offset, length))
    reply = await peer.until(ReadReply)
    assert isinstance(reply, ReadReply)
    assert (reply.disk_id, reply.request_id, reply.offset, reply.length) == (
        disk_id, request_id, offset, length,
    )  # fmt: skip
    return reply


def test_reads_return_the_stream_sent_before_them(daemon: RoleDaemon, tls: TlsMaterial) -> None:
    async def run() -> None:
        peer = await Peer.connect(daemon, tls)
        try:
            await peer.open("r1")
            image = Image("r1")
            noise = os.urandom(3 * CHUNK)
            # Not waited for: the reads right behind must still see every write.
            await peer.send(
                image.raw(0, noise),
                image.compressed(4 * CHUNK, (b"failback " * 8000)[:CHUNK]),
                image.zero(CHUNK, 4096),
            )
            whole = await read(peer, "r1", 1, 0, SIZE - SIZE % 512)
            assert bytes(whole.decoded()) == bytes(image.data)
            acks = [m.seq for m in peer.seen if isinstance(m, Ack)]
            assert acks and acks[-1] == image.seq  # the reply follows the checkpoint's ACK

            noisy = await read(peer, "r1", 2, 0, CHUNK)
            assert noisy.encoding is Encoding.RAW and bytes(noisy.payload) == noise[:CHUNK]
            text = await read(peer, "r1", 3, 4 * CHUNK, CHUNK)
            assert text.encoding is Encoding.ZSTD and text.wire_size < CHUNK // 10
            assert bytes(text.decoded()) == image.data[4 * CHUNK : 5 * CHUNK]
            never = await read(peer, "r1", 4, 6 * CHUNK, 2 * CHUNK)
            assert (never.encoding, never.wire_size) == (Encoding.ZERO, 0)
            last = await read(peer, "r1", 5, SIZE - 512, 512)  # the disk's last sector
            assert bytes(last.decoded()) == image.data[-512:]

            # Pipelined requests and a ping: all answered, in any order.
            for i in range(4):
                await peer.send(ReadRequest("r1", 10 + i, i * CHUNK, CHUNK))
            await peer.send(Ping(3))
            got: dict[int, bytes] = {}
            while len(got) < 4:
                reply = await peer.until(ReadReply)
                assert isinstance(reply, ReadReply)
                got[reply.request_id] = bytes(reply.decoded())
            assert got == {10 + i: bytes(image.data[i * CHUNK : (i + 1) * CHUNK]) for i in range(4)}
            assert Pong(3) in peer.seen
        finally:
            peer.close()

    uvloop.run(run())


@pytest.mark.parametrize(
    "case",
    [
        ("nodisk", 0, 512, ErrorCode.UNKNOWN_DISK),  # never opened
        ("r2", SIZE - 512, 1024, ErrorCode.INVALID_REQUEST),  # runs past the end
        ("r2", SIZE // 512 * 512 + 512 * 64, 512, ErrorCode.INVALID_REQUEST),  # beyond it
        ("r2", 2**64 - 512, MAX_READ, ErrorCode.INVALID_REQUEST),  # offset + length wraps u64
    ],
)
def test_bad_reads_are_named_errors(
    daemon: RoleDaemon, tls: TlsMaterial, case: tuple[str, int, int, ErrorCode]
) -> None:
    disk_id, offset, length, code = case

    async def run() -> None:
        peer = await Peer.connect(daemon, tls)
        try:
            await peer.open("r2")
            await peer.send(ReadRequest(disk_id, 1, offset, length))
            with pytest.raises(PeerError) as caught:
                await peer.until(ReadReply)
            assert caught.value.code == code, caught.value
        finally:
            peer.close()

    uvloop.run(run())


def test_a_disk_streamed_by_another_connection_is_not_ours_to_read(
    daemon: RoleDaemon, tls: TlsMaterial
) -> None:
    async def run() -> None:
        owner = await Peer.connect(daemon, tls)
        other = await Peer.connect(daemon, tls)
        try:
            await owner.open("r3")
            await other.send(ReadRequest("r3", 1, 0, 512))
            with pytest.raises(PeerError) as caught:
                await other.until(ReadReply)
            assert caught.value.code == ErrorCode.PROTOCOL_VIOLATION
            assert bytes((await read(owner, "r3", 2, 0, 512)).decoded()) == bytes(512)
        finally:
            owner.close()
            other.close()

    uvloop.run(run())
