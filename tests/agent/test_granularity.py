"""Fine tracking: random 4 KiB writes come back from both trackers as 4 KiB blocks
(adjacent ones as one extent), and applying those extents, read from the device, onto
the previous image gives the device, bit for bit."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.discovery import Disk
from agent.errors import TrackerUnavailable
from agent.extents import pread_extents
from agent.replicator_disk import batches
from agent.trackers.base import CHUNK, FINE, DirtyMap, fine_chunk
from agent.trackers.scan import ScanTracker
from agent.trackers.tracefs import TracefsTracker
from tests.agent.helpers import digests_of, find, read_all

MIB = 1 << 20
SIZE = 32 * MIB
BLOCK = 4096


def test_fine_chunk_is_4k_until_the_bitmap_would_pass_its_cap() -> None:
    assert fine_chunk(2 << 30) == FINE == 4096
    assert fine_chunk(256 << 30) == 4096  # 8 MiB of bitmap
    assert fine_chunk((256 << 30) + 1) == 8192
    assert fine_chunk(2 << 40) == 32 * 1024
    assert fine_chunk(1 << 20, max_bitmap=1) == 128 * 1024


def test_batches_split_long_extents_and_group_short_ones() -> None:
    extents = [(0, 4096), (8192, 3 * MIB), (10 * MIB, 4096)]
    got = list(batches(extents, piece=MIB, limit=2 * MIB))
    assert got == [
        [(0, 4096), (8192, MIB)],
        [(8192 + MIB, MIB), (8192 + 2 * MIB, MIB)],
        [(10 * MIB, 4096)],
    ]
    flat = [piece for batch in got for piece in batch]
    assert sum(length for _, length in flat) == sum(length for _, length in extents)
    assert list(batches([], MIB, MIB)) == []


@pytest.fixture
def raw_disk(tmp_path: Path) -> Iterator[Disk]:
    """A loop device over random bytes, no filesystem: every write is the test's."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop device")
    image = tmp_path / "raw.img"
    image.write_bytes(os.urandom(SIZE))
    device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        yield find(Path(device))
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


def random_writes(disk: Disk, seed: int) -> set[int]:
    """200 random 4 KiB O_DIRECT writes plus a run of 8 adjacent ones; the blocks."""
    rng = random.Random(seed)
    blocks = {rng.randrange(SIZE // BLOCK) for _ in range(200)}
    run_start = rng.randrange(SIZE // BLOCK - 8)
    blocks |= set(range(run_start, run_start + 8))
    buffer = mmap.mmap(-1, BLOCK)
    fd = os.open(disk.path, os.O_WRONLY | os.O_DIRECT)
    try:
        for block in sorted(blocks, key=lambda _: rng.random()):
            buffer[:] = rng.randbytes(BLOCK)
            os.pwrite(fd, buffer, block * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()
    return blocks


def apply(disk: Disk, replica: bytearray, dirty: DirtyMap) -> int:
    """What the replicator does with a drain: the device's bytes at each extent."""
    fd = os.open(disk.path, os.O_RDONLY)
    try:
        sent = 0
        for offset, length in dirty.extents():
            replica[offset : offset + length] = os.pread(fd, length, offset)
            sent += length
        return sent
    finally:
        os.close(fd)


def check(disk: Disk, drain: DirtyMap, before: bytearray, blocks: set[int]) -> None:
    assert drain.chunk == BLOCK
    assert set(drain.chunks()) == blocks  # exactly the written blocks, nothing coarser
    extents = list(drain.extents())
    runs = sum(1 for b in blocks if b - 1 not in blocks)
    assert len(extents) == runs  # adjacent dirty blocks leave as one extent
    sent = apply(disk, before, drain)
    assert sent == len(blocks) * BLOCK
    assert before == read_all(disk.path, disk.size)


@pytest.mark.root
def test_tracefs_reports_4k_blocks_and_the_replica_follows(raw_disk: Disk) -> None:
    tracker = TracefsTracker(raw_disk)
    try:
        tracker.start()
    except TrackerUnavailable as err:
        pytest.skip(f"tracefs tracker unavailable here: {err}")
    try:
        tracker.drain()
        assert tracker.needs_resync() == DirtyMap.full(raw_disk.size, CHUNK)  # resync at 64 KiB
        for seed in range(3):
            replica = bytearray(read_all(raw_disk.path, raw_disk.size))
            blocks = random_writes(raw_disk, seed)
            check(raw_disk, tracker.drain(), replica, blocks)
    finally:
        tracker.stop()


@pytest.mark.root
def test_scan_reports_4k_blocks_and_the_replica_follows(raw_disk: Disk, tmp_path: Path) -> None:
    tracker = ScanTracker(raw_disk, tmp_path / "digests")
    tracker.start()
    assert tracker.fine == BLOCK and tracker.chunk == CHUNK
    try:
        assert not tracker.drain()
        for seed in range(3):  # the first change of a chunk is as fine as the later ones
            replica = bytearray(read_all(raw_disk.path, raw_disk.size))
            blocks = random_writes(raw_disk, seed)
            check(raw_disk, tracker.drain(), replica, blocks)
            # The persisted state stays at chunk granularity: what may differ remotely.
            assert set(tracker.uncertain.chunks()) >= {b * BLOCK // CHUNK for b in blocks}
    finally:
        tracker.stop()


@pytest.mark.root
def test_scan_reports_a_chunk_written_while_stopped_whole(raw_disk: Disk, tmp_path: Path) -> None:
    """No fine digests describe what the replica holds for a chunk written while no
    agent ran: it is reported whole, never just the blocks that moved since start."""
    state = tmp_path / "digests"
    first = ScanTracker(raw_disk, state)
    first.start()
    image = read_all(raw_disk.path, raw_disk.size)
    first.commit(digests_of(image))
    first.stop()
    random_writes(raw_disk, 7)  # while stopped
    second = ScanTracker(raw_disk, state)
    second.start()
    assert second.needs_resync() is None
    dirty = second.drain()
    replica = bytearray(image)
    sent = apply(raw_disk, replica, dirty)
    assert replica == read_all(raw_disk.path, raw_disk.size)
    assert sent % CHUNK == 0  # whole chunks
    # From then on every chunk is known finely: those read at start, and those sent whole.
    blocks = random_writes(raw_disk, 8)
    check(raw_disk, second.drain(), replica, blocks)
    second.stop()


def test_pread_extents_reads_each_extent_into_its_place(tmp_path: Path) -> None:
    data = os.urandom(4 * MIB)
    (tmp_path / "f").write_bytes(data)
    rng = random.Random(1)
    extents = sorted({(rng.randrange(1024) * BLOCK, BLOCK) for _ in range(300)})
    extents.append((3 * MIB, MIB))  # one long one among them
    total = sum(length for _, length in extents)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        for readers in (1, 4):  # in this thread, and split over four
            buffer = bytearray(total)
            assert pread_extents(fd, extents, memoryview(buffer), readers=readers) is None
            assert bytes(buffer) == b"".join(data[o : o + n] for o, n in extents)
        short = pread_extents(fd, [(4 * MIB - BLOCK, 2 * BLOCK)], memoryview(bytearray(8192)))
        assert short is not None and "short read" in short
        late = pread_extents(fd, extents, memoryview(bytearray(total)), expired=lambda: True)
        assert late is not None and "freeze bound" in late
    finally:
        os.close(fd)
