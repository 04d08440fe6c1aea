"""The agent's side of failback against a real secondsite-targetd: a plain file stands in
for the original machine's disk, a stream written to the target for the replica the
failed-over VM changed. Only the differing chunks travel, and the disk ends equal."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import uvloop

from agent.discovery import Disk, Mount
from agent.failback import (
    FailbackDisk,
    FailbackRefused,
    FailbackResult,
    TargetReader,
    check_unused,
    failback,
)
from agent.trackers.base import CHUNK
from appliance.wire.errors import ErrorCode, PeerError
from appliance.wire.messages import Data, Tag, TagKind
from appliance.wire.tls import client_context
from tests.conftest import TlsMaterial
from tests.integration.daemons import RoleDaemon
from tests.integration.test_targetd_digest import Peer, daemon

pytestmark = pytest.mark.integration
__all__ = ["daemon"]  # the fixture, shared with the digest tests

SIZE = 8 * 1024 * 1024 + 3 * 512  # a short last chunk
MACHINE = "m1"  # what tests.integration.test_targetd_digest.Peer.open sends


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def stream(
    daemon: RoleDaemon, tls: TlsMaterial, disk_id: str, writes: list[tuple[int, bytes]]
) -> None:
    """Write `writes` to the replica (as a process server would), tagged, durable."""
    peer = await Peer.connect(daemon, tls)
    try:
        opened = await peer.open(disk_id, SIZE)
        seq = opened.durable_seq
        for offset, payload in writes:
            seq += 1
            await peer.send(Data.raw(disk_id, seq, offset, payload))
        await peer.send(Tag(disk_id, seq + 1, f"t{seq + 1}", TagKind.CRASH, 1))
        await peer.digests(disk_id, 1, [0])  # a checkpoint: everything above is durable
    finally:
        peer.close()


async def run_failback(
    daemon: RoleDaemon, tls: TlsMaterial, disks: list[FailbackDisk]
) -> FailbackResult:
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    reader = await TargetReader.connect(f"localhost:{daemon.port}", ctx, MACHINE)
    try:
        return await failback(reader, disks)
    finally:
        await reader.close()


def test_only_the_chunks_that_differ_are_fetched(
    daemon: RoleDaemon, tls: TlsMaterial, tmp_path: Path
) -> None:
    base = bytearray(os.urandom(SIZE))
    base[2 << 20 : 4 << 20] = bytes(2 << 20)  # a zero stretch, as on any real disk
    # What the VM wrote after the failover: a few chunks here and there, the short last
    # chunk, a run of 1 MiB of compressible text, and zeros over random data.
    after = bytearray(base)
    changes = [
        (0, os.urandom(512)),  # part of chunk 0
        (5 * CHUNK, os.urandom(3 * CHUNK)),
        (1 << 20, (b"written after failover " * 50000)[: 1 << 20]),
        (6 << 20, bytes(CHUNK)),
        (SIZE - 1536, os.urandom(1536)),
    ]
    for offset, payload in changes:
        after[offset : offset + len(payload)] = payload
    changed_chunks = {
        c
        for offset, p in changes
        for c in range(offset // CHUNK, (offset + len(p) - 1) // CHUNK + 1)
    }
    disk = tmp_path / "disk.img"
    disk.write_bytes(base)

    # The replica as the failover found it (equal to the disk), then the VM's writes.
    steps = [*range(0, SIZE - 1536, 1 << 20), SIZE - 1536]
    uvloop.run(stream(daemon, tls, "fb-1", [(i, bytes(base[i : i + (1 << 20)])) for i in steps]))
    uvloop.run(stream(daemon, tls, "fb-1", changes))

    result = uvloop.run(run_failback(daemon, tls, [FailbackDisk("fb-1", disk, SIZE)]))
    assert sha(disk.read_bytes()) == sha(bytes(after))
    (outcome,) = result.disks
    assert outcome.chunks == -(-SIZE // CHUNK)
    assert outcome.differ == len(changed_chunks)
    assert outcome.bytes_written == sum(min(CHUNK, SIZE - c * CHUNK) for c in changed_chunks)
    # The text compresses and the zeros cost nothing: less than what was written.
    assert 0 < outcome.bytes_received < outcome.bytes_written
    # Everything on the wire: digests (24 bytes a chunk) and the fetched chunks.
    assert result.wire_bytes_in < outcome.bytes_written + 64 * 1024

    again = uvloop.run(run_failback(daemon, tls, [FailbackDisk("fb-1", disk, SIZE)]))
    assert (again.disks[0].differ, again.bytes_received, again.bytes_written) == (0, 0, 0)


def test_an_empty_or_mismatched_replica_is_refused_before_anything_is_written(
    daemon: RoleDaemon, tls: TlsMaterial, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(SIZE))
    before = sha(disk.read_bytes())
    # Never streamed: opening creates it empty; failing back from it would wipe the disk.
    with pytest.raises(FailbackRefused, match="never received"):
        uvloop.run(run_failback(daemon, tls, [FailbackDisk("fb-new", disk, SIZE)]))
    uvloop.run(stream(daemon, tls, "fb-2", [(0, os.urandom(CHUNK))]))
    with pytest.raises(PeerError) as caught:  # the target refuses another size
        uvloop.run(run_failback(daemon, tls, [FailbackDisk("fb-2", disk, SIZE + 512)]))
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert sha(disk.read_bytes()) == before


def test_a_mounted_disk_is_refused() -> None:
    disk = Disk("loop9", Path("/dev/loop9"), 7, 9, SIZE, 512, 512, False, False, False)
    mounted = Mount(Path("/srv"), "ext4", "/dev/loop9p1", "loop9p1", "/", read_only=True)
    with pytest.raises(FailbackRefused, match="/dev/loop9p1 on /srv"):
        check_unused(disk, lambda d: Disk(**{**d.__dict__, "mounts": (mounted,)}))
    check_unused(disk, lambda d: d)  # nothing mounted: fine
