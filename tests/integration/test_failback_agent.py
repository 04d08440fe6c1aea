"""The agent's side of failback against a real secondsite-targetd: a plain file stands in
for the original machine's disk, a stream written to the target for the replica the
failed-over VM changed, fenced as a failover leaves it. Only the differing chunks
travel, and the disk ends equal."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from agent import failback as failback_module
from agent.discovery import Disk, Mount, discover
from agent.failback import (
    FailbackDisk,
    FailbackRefused,
    FailbackResult,
    TargetReader,
    check_unused,
    failback,
)
from agent.failback import run as run_agent_failback
from agent.trackers.base import CHUNK
from appliance.wire.errors import ErrorCode, PeerError
from appliance.wire.messages import Data, Ping, Pong, Tag, TagKind
from appliance.wire.tls import client_context
from tests.conftest import TlsMaterial
from tests.integration.daemons import RoleDaemon, rpc
from tests.integration.test_targetd_digest import Peer, daemon
from tests.loopfs import loop_device

pytestmark = pytest.mark.integration
__all__ = ["daemon"]  # the fixture, shared with the digest tests

SIZE = 8 * 1024 * 1024 + 3 * 512  # a short last chunk
MACHINE = "m1"  # what tests.integration.test_targetd_digest.Peer.open sends


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def stream(
    daemon: RoleDaemon,
    tls: TlsMaterial,
    disk_id: str,
    writes: list[tuple[int, bytes]],
    size: int = SIZE,
) -> str:
    """Write `writes` to the replica (as a process server would), tagged, durable; the
    tag's id."""
    peer = await Peer.connect(daemon, tls)
    try:
        return await send(peer, disk_id, writes, size)
    finally:
        peer.close()


async def send(peer: Peer, disk_id: str, writes: list[tuple[int, bytes]], size: int = SIZE) -> str:
    opened = await peer.open(disk_id, size)
    seq = opened.durable_seq
    for offset, payload in writes:
        seq += 1
        await peer.send(Data.raw(disk_id, seq, offset, payload))
    tag = f"t{seq + 1}"
    await peer.send(Tag(disk_id, seq + 1, tag, TagKind.CRASH, 1))
    await peer.digests(disk_id, 1, [0])  # a checkpoint: everything above is durable
    return tag


def fence(daemon: RoleDaemon, tls: TlsMaterial, tag: str) -> None:
    """What a failover does: roll the machine's replicas back to `tag`, fencing them."""
    uvloop.run(rpc(daemon, tls, "rollback", machine_id=MACHINE, tag_id=tag))


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
    fence(daemon, tls, uvloop.run(stream(daemon, tls, "fb-1", changes)))

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
    # Never streamed: no replica to read, and a failback reader does not create one.
    with pytest.raises(PeerError, match="no replica disk 'fb-new'") as caught:
        uvloop.run(run_failback(daemon, tls, [FailbackDisk("fb-new", disk, SIZE)]))
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    tag = uvloop.run(stream(daemon, tls, "fb-2", [(0, os.urandom(CHUNK))]))
    # Not failed over: the process server's stream may still change it under the reads.
    with pytest.raises(PeerError, match="fb-2 is not failed over") as caught:
        uvloop.run(run_failback(daemon, tls, [FailbackDisk("fb-2", disk, SIZE)]))
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    fence(daemon, tls, tag)
    with pytest.raises(PeerError) as caught:  # the target refuses another size
        uvloop.run(run_failback(daemon, tls, [FailbackDisk("fb-2", disk, SIZE + 512)]))
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert sha(disk.read_bytes()) == before
    assert not list(daemon.datastore.rglob("fb-new*"))


def test_a_failed_read_closes_the_disk_only_after_every_write_returned(
    daemon: RoleDaemon, tls: TlsMaterial, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read fails while writes of earlier reads are still in their threads: the
    failback stops, but the disk's descriptor stays open until they have all returned
    (a pwrite after the close could land in a file that reuses the number)."""
    replica = os.urandom(SIZE)
    steps = [*range(0, SIZE - 1536, 1 << 20), SIZE - 1536]
    tag = uvloop.run(
        stream(daemon, tls, "fb-slow", [(i, replica[i : i + (1 << 20)]) for i in steps])
    )
    fence(daemon, tls, tag)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(SIZE))  # every chunk differs

    writes: list[tuple[str, bool]] = []  # (phase, descriptor still open)
    real_write = failback_module._pwrite_all

    def slow_write(fd: int, data: bytes | memoryview, offset: int) -> None:
        writes.append(("start", True))
        time.sleep(0.3)  # still writing when the failing read's error arrives
        try:
            os.fstat(fd)
            still_open = True
        except OSError:
            still_open = False
        real_write(fd, data, offset)
        writes.append(("end", still_open))

    real_read = TargetReader.read
    reads = 0

    async def failing_read(self: TargetReader, disk_id: str, offset: int, length: int) -> Any:
        nonlocal reads
        reads += 1
        if reads == 2:
            await asyncio.sleep(0.05)  # after the first read's write has started
            raise PeerError(ErrorCode.STORAGE_FAILURE, "injected: the replica read failed")
        return await real_read(self, disk_id, offset, length)

    monkeypatch.setattr(failback_module, "_pwrite_all", slow_write)
    monkeypatch.setattr(TargetReader, "read", failing_read)
    with pytest.raises(PeerError, match="injected"):
        uvloop.run(run_failback(daemon, tls, [FailbackDisk("fb-slow", disk, SIZE)]))
    started = [w for w in writes if w[0] == "start"]
    ended = [w for w in writes if w[0] == "end"]
    assert started, "no write was in flight when the read failed: the test proves nothing"
    assert len(ended) == len(started)  # none still running after failback returned
    assert all(still_open for _, still_open in ended)


def test_the_reader_and_the_process_server_do_not_cut_each_other(
    daemon: RoleDaemon, tls: TlsMaterial, tmp_path: Path
) -> None:
    """The flake this fixes: the failback's OPEN_DISK took the stream over, closing the
    process server's connection; its reconnect opened the disk again and closed the
    failback's connection ("shutting_down: peer closed the connection")."""
    replica = os.urandom(SIZE)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(SIZE))
    disks = [FailbackDisk("fb-3", disk, SIZE)]

    async def run() -> None:
        process = await Peer.connect(daemon, tls)  # the process server, still attached
        again = None
        try:
            pieces = [(i, replica[i : i + (1 << 20)]) for i in range(0, SIZE, 1 << 20)]
            tag = await send(process, "fb-3", pieces)
            await rpc(daemon, tls, "rollback", machine_id=MACHINE, tag_id=tag)
            ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
            reader = await TargetReader.connect(f"localhost:{daemon.port}", ctx, MACHINE)
            try:
                assert await reader.open("fb-3", SIZE) > 0
                await process.send(Ping(1))  # its connection is still open
                assert isinstance(await process.until(Pong), Pong)
                # It reconnects (as after any cut) and opens every disk again: the
                # reader goes on, and fails back in full.
                again = await Peer.connect(daemon, tls)
                await again.open("fb-3", SIZE)
                result = await failback(reader, disks)
                assert result.disks[0].differ == -(-SIZE // CHUNK)
                # Unfenced (the failback job's next step): reads would no longer see
                # the replica as the VM left it, so they fail.
                await rpc(daemon, tls, "unfence", machine_id=MACHINE)
                with pytest.raises(PeerError, match="fb-3 is not failed over"):
                    await reader.digests("fb-3", CHUNK, [0])
            finally:
                await reader.close()
        finally:
            process.close()
            if again is not None:
                again.close()

    uvloop.run(run())
    assert disk.read_bytes() == replica


def test_a_mounted_disk_is_refused() -> None:
    disk = Disk("loop9", Path("/dev/loop9"), 7, 9, SIZE, 512, 512, False, False, False)
    mounted = Mount(Path("/srv"), "ext4", "/dev/loop9p1", "loop9p1", "/", read_only=True)
    with pytest.raises(FailbackRefused, match="/dev/loop9p1 on /srv"):
        check_unused(disk, lambda d: Disk(**{**d.__dict__, "mounts": (mounted,)}))
    check_unused(disk, lambda d: d)  # nothing mounted: fine


@pytest.mark.root
def test_a_disk_still_mounted_in_another_mount_namespace_is_refused(
    daemon: RoleDaemon, tls: TlsMaterial, tmp_path: Path
) -> None:
    """The silent loss this fixes: a mount namespace made while the disk was mounted (a
    container, a service with private mounts; in the tests, another suite's `ip netns
    exec` or `unshare`) keeps its filesystem alive after the umount here. The failback
    rewrote the device under it, and mounting the disk again shared that filesystem's
    cache: a file the VM rewrote in place read as before the failover."""
    if shutil.which("unshare") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs unshare and mkfs.ext4")
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(image) as device:
        size = os.stat(image).st_size
        fence(daemon, tls, uvloop.run(stream(daemon, tls, "fb-4", [(0, os.urandom(CHUNK))], size)))
        subprocess.run(["mount", str(device), str(mnt)], check=True)
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sleep", "600"]
        )
        try:
            # The holder's namespace has its copy of the mount once unshare execs sleep.
            while os.readlink(f"/proc/{holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
                assert holder.poll() is None
            subprocess.run(["umount", str(mnt)], check=True)
            before = sha(device.read_bytes())
            (disk,) = [d for d in discover() if d.path == device]
            check_unused(disk)  # nothing mounted in this namespace
            ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
            address = f"localhost:{daemon.port}"
            with pytest.raises(FailbackRefused, match="another mount namespace"):
                uvloop.run(run_agent_failback(address, ctx, MACHINE, [(disk, "fb-4")]))
            assert sha(device.read_bytes()) == before
        finally:
            holder.kill()
            holder.wait()
            if os.path.ismount(mnt):  # failed before its umount: the device must detach
                subprocess.run(["umount", str(mnt)], check=True)
