"""A point asked for now (SIGUSR1's `request_tag`) after random 4 KiB writes: it comes
without waiting for the schedule, the delta is about the bytes written (not 64 KiB per
write) and goes in a few EXTENTS messages (not one per extent), and the point
materialized on the master target equals the frozen device."""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

import agent.replicator
from agent.capture import capture_machine
from agent.discovery import Disk
from agent.errors import DeviceResized
from agent.lead_in import Pacing
from agent.replicator import AckRelay, Replicator
from agent.replicator_disk import DiskRun
from agent.trackers.tracefs import TracefsTracker
from appliance.wire.sender import StreamSender
from tests.agent.helpers import write_file
from tests.agent.test_replicator import (
    MACHINE,
    device_sha256,
    make_sender,
    materialized_sha256,
    target_durable,
)
from tests.agent.test_replicator import disk as disk  # noqa: PLC0414 - the fixture
from tests.conftest import TlsMaterial
from tests.integration.daemons import RoleDaemon

pytestmark = [pytest.mark.root, pytest.mark.integration, pytest.mark.slow]
BLOCK = 4096


def random_writes(path: Path, count: int, seed: int) -> dict[int, bool]:
    """`count` 4 KiB O_DIRECT overwrites at random blocks of `path` (every 8th all
    zeros: they go as ZERO extents), then fsync; each block written, and whether it
    holds zeros now."""
    rng = random.Random(seed)
    written: dict[int, bool] = {}
    blocks = path.stat().st_size // BLOCK
    buffer = mmap.mmap(-1, BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for i in range(count):
            zero = i % 8 == 0
            buffer[:] = bytes(BLOCK) if zero else rng.randbytes(BLOCK)
            block = rng.randrange(blocks)
            os.pwrite(fd, buffer, block * BLOCK)
            written[block] = zero
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()
    return written


async def first_point(
    process: RoleDaemon,
    tls: TlsMaterial,
    source: Disk,
    tmp_path: Path,
    frozen: dict[str, str],
    *,
    freeze_timeout: float = 1.0,
) -> tuple[Replicator, StreamSender, str]:
    """A replicator of `source` whose points come only when asked (after the first,
    which this waits for), recording the frozen device's hash of each in `frozen`."""
    acks = AckRelay()
    sender = make_sender(process, tls, acks)
    rep = Replicator(
        [source], sender, TracefsTracker, tmp_path / "agent", machine_id=MACHINE,
        acks=acks, tag_interval=3600.0, app_interval=None, freeze_timeout=freeze_timeout,
        on_frozen=lambda tag_id: frozen.__setitem__(tag_id, device_sha256(source)),
    )  # fmt: skip
    (disk_id,) = rep.disk_ids
    await sender.start()
    await rep.start()
    await rep.wait_initial(timeout=60)
    async with asyncio.timeout(30):  # the first point comes by itself
        while not rep.tags(disk_id):
            await asyncio.sleep(0.05)
    return rep, sender, disk_id


def test_a_requested_point_after_random_4k_writes_is_exact(
    sites: tuple[RoleDaemon, RoleDaemon],
    disk: tuple[Disk, Path],
    tls: TlsMaterial,
    tmp_path: Path,
) -> None:
    process, target = sites
    source, mnt = disk
    write_file(mnt, "data", 16 << 20)
    frozen: dict[str, str] = {}

    async def run() -> None:
        rep, sender, disk_id = await first_point(process, tls, source, tmp_path, frozen)
        for seed in range(2):
            before = rep.status()[disk_id]
            seen, sent = set(rep.tags(disk_id)), before["bytes_sent"]
            blocks = await asyncio.to_thread(random_writes, mnt / "data", 500, seed)
            rep.request_tag()
            async with asyncio.timeout(30):  # not the hour tag_interval says
                while not set(rep.tags(disk_id)) - seen:
                    await asyncio.sleep(0.05)
            (tag_id,) = set(rep.tags(disk_id)) - seen
            delta = rep.status()[disk_id]["bytes_sent"] - sent
            # The written blocks, plus a little metadata; a small ext4 has 1 KiB blocks,
            # so a file's 4 KiB block may straddle two of the device's. At 64 KiB chunks
            # it would be ~30 MiB.
            written = len(blocks) * BLOCK
            nonzero = sum(not zero for zero in blocks.values()) * BLOCK
            assert nonzero <= delta <= 2 * written + (1 << 20), (nonzero, delta)
            # Packed into EXTENTS: a few sequence numbers, not one per 4 KiB extent.
            seqs = rep.status()[disk_id]["submitted_seq"] - before["submitted_seq"]
            assert seqs <= 20, f"{seqs} messages for {len(blocks)} written blocks"
            await target_durable(target, tls, disk_id, rep.tags(disk_id)[tag_id])
            image = await materialized_sha256(target, tls, tag_id, f"-fine{seed}", tmp_path)
            assert image == frozen[tag_id]
        await rep.stop()
        await sender.close()

    uvloop.run(run())


class Rewriter(threading.Thread):
    """4 KiB O_DIRECT overwrites of random blocks of `path` as fast as they go, until
    stopped; each blocks while the filesystem is frozen and lands the moment it thaws."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.halt = threading.Event()
        self.writes = 0

    def run(self) -> None:
        rng = random.Random(7)
        blocks = self.path.stat().st_size // BLOCK
        buffer = mmap.mmap(-1, BLOCK)
        fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
        try:
            while not self.halt.is_set():
                buffer[:] = rng.randbytes(BLOCK)
                os.pwrite(fd, buffer, rng.randrange(blocks) * BLOCK)
                self.writes += 1
        finally:
            os.close(fd)
            buffer.close()


def test_reads_overlapping_the_freeze_end_before_the_thaw(
    sites: tuple[RoleDaemon, RoleDaemon],
    disk: tuple[Disk, Path],
    tls: TlsMaterial,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last live reads before a point run while FIFREEZE is being taken (all of
    them here: the pacing is forced), and the capture keeps the filesystem frozen until
    they have ended. With those reads slowed down (injected) and a writer rewriting
    blocks the moment the filesystem thaws, every point still equals the frozen device;
    reads slower than the freeze bound cost the point (untagged, with the reason),
    never its exactness."""
    process, target = sites
    source, mnt = disk
    write_file(mnt, "data", 16 << 20)
    frozen: dict[str, str] = {}
    delay = [0.0]
    read_extents = DiskRun.read_extents

    def slow_read(run: DiskRun, extents: list[tuple[int, int]]) -> memoryview:
        time.sleep(delay[0])  # a slow disk: the bytes are read after the wait
        return read_extents(run, extents)

    monkeypatch.setattr(DiskRun, "read_extents", slow_read)
    monkeypatch.setattr(Pacing, "tail_bytes", lambda self, limit: limit)
    writer = Rewriter(mnt / "data")

    async def run() -> None:
        rep, sender, disk_id = await first_point(
            process, tls, source, tmp_path, frozen, freeze_timeout=1.0
        )
        writer.start()
        delay[0] = 0.3  # longer than taking the freeze and copying: the gate must hold
        checked = 0
        while checked < 2:
            seen = set(rep.tags(disk_id))
            rep.request_tag()
            async with asyncio.timeout(30):
                while not set(rep.tags(disk_id)) - seen:
                    await asyncio.sleep(0.05)
            (tag_id,) = set(rep.tags(disk_id)) - seen
            await target_durable(target, tls, disk_id, rep.tags(disk_id)[tag_id])
            image = await materialized_sha256(target, tls, tag_id, f"-gate{checked}", tmp_path)
            assert image == frozen[tag_id]
            checked += 1
        delay[0] = 1.5  # past the 1 s bound: no point, and it says why
        before = rep.status()[disk_id]["untagged_rounds"]
        rep.request_tag()
        async with asyncio.timeout(30):
            while rep.status()[disk_id]["untagged_rounds"] == before:
                await asyncio.sleep(0.05)
        reason = str(rep.status()[disk_id]["last_untagged_reason"])
        assert "did not end inside the freeze bound" in reason
        writer.halt.set()
        await asyncio.to_thread(writer.join)
        await rep.stop()
        await sender.close()
        assert writer.writes > 0

    try:
        uvloop.run(run())
    finally:
        writer.halt.set()


def test_a_failed_read_during_the_freeze_gives_the_point_up_and_thaws(
    sites: tuple[RoleDaemon, RoleDaemon],
    disk: tuple[Disk, Path],
    tls: TlsMaterial,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read overlapped with the freeze that fails (injected: the device shrank) ends
    replication with that error, and only after the capture has given the point up and
    thawed: no freeze is left running behind the error, and the filesystem takes writes."""
    process, _ = sites
    source, mnt = disk
    write_file(mnt, "data", 16 << 20)
    capturing, armed = threading.Event(), threading.Event()
    in_round: list[bool] = []
    failed_in_capture: list[bool] = []
    read_extents = DiskRun.read_extents
    split_tail = agent.replicator.split_tail

    def shrunk_while_capturing(run: DiskRun, extents: list[tuple[int, int]]) -> memoryview:
        # The tail's reads (all of the round's: the pacing is forced) wait for the
        # capture to be running, then fail: a read overlapping the freeze.
        if in_round and capturing.wait(10):
            failed_in_capture.append(True)
            raise DeviceResized(str(run.disk.path), run.disk.size, run.disk.size // 2)
        return read_extents(run, extents)

    def tag_round_reads(*args: Any) -> Any:
        if armed.is_set():  # a round after the first point
            in_round.append(True)
        return split_tail(*args)

    def capture(*args: Any, **kwargs: Any) -> Any:
        capturing.set()
        try:
            return capture_machine(*args, **kwargs)
        finally:
            capturing.clear()

    monkeypatch.setattr(DiskRun, "read_extents", shrunk_while_capturing)
    monkeypatch.setattr(agent.replicator, "capture_machine", capture)
    monkeypatch.setattr(agent.replicator, "split_tail", tag_round_reads)
    monkeypatch.setattr(Pacing, "tail_bytes", lambda self, limit: limit)
    writer = Rewriter(mnt / "data")

    async def run() -> None:
        rep, sender, _ = await first_point(process, tls, source, tmp_path, {})
        armed.set()
        writer.start()  # so the drain before the next point has something to read
        rep.request_tag()
        with pytest.raises(DeviceResized):
            async with asyncio.timeout(30):
                await rep.wait()
        assert failed_in_capture and not capturing.is_set()  # the capture had returned
        assert rep.phase == "failed" and isinstance(rep.error, DeviceResized)
        writer.halt.set()
        await asyncio.to_thread(writer.join, 10)
        assert not writer.is_alive(), "the writer is stuck: the filesystem stayed frozen"
        await rep.stop()
        await sender.close()

    try:
        uvloop.run(run())
    finally:
        writer.halt.set()
