"""Checksum resync: exactly the chunks that differ, in bounded requests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.digest import chunk_digest
from agent.resync import compare, differing_chunks
from agent.trackers import CHUNK, DirtyMap
from tests.agent.helpers import chunk_diff, digests_of, find, read_all, write_file
from tests.loopfs import loop_ext4


class Remote:
    """The master target's side of a digest request, answered from a replica image."""

    def __init__(self, image: bytes, chunk: int = CHUNK) -> None:
        self.digests = digests_of(image, chunk)
        self.requests: list[list[int]] = []

    def __call__(self, chunks: list[int]) -> dict[int, bytes]:
        self.requests.append(chunks)
        return {i: self.digests[i] for i in chunks if i in self.digests}


@pytest.mark.root
def test_exactly_the_chunks_that_differ_from_a_copy_of_the_device(tmp_path: Path) -> None:
    with loop_ext4(tmp_path, 32) as (device, mnt):
        disk = find(device)
        replica = read_all(device, disk.size)  # the master target's copy
        write_file(mnt, "a", 1 << 20)
        write_file(mnt, "b", 5000)
        remote = Remote(replica)
        result = compare(device, DirtyMap.full(disk.size), remote, batch=100)
        expected = chunk_diff(replica, read_all(device, disk.size))
        assert expected  # the writes reached the device
        assert set(result.differ.chunks()) == expected
        assert result.checked == disk.size // CHUNK
        assert all(len(r) <= 100 for r in remote.requests)
        assert sorted(i for r in remote.requests for i in r) == list(range(disk.size // CHUNK))


def image_pair(tmp_path: Path, size: int) -> tuple[Path, bytes, bytes]:
    """A local image file and a replica that differs in chunks 1, 5 and the short last."""
    local = bytearray(os.urandom(size))
    replica = bytearray(local)
    for offset in (CHUNK + 7, 5 * CHUNK, size - 1):
        replica[offset] ^= 0xFF
    path = tmp_path / "local.img"
    path.write_bytes(local)
    return path, bytes(local), bytes(replica)


def test_only_the_asked_ranges_are_read_and_requested(tmp_path: Path) -> None:
    size = 9 * CHUNK + 4096  # a short last chunk (index 9), hashed unpadded
    path, _, replica = image_pair(tmp_path, size)
    ranges = DirtyMap(size)
    ranges.mark(0, 2 * CHUNK)  # chunks 0, 1
    ranges.mark(7 * CHUNK, 3 * CHUNK)  # chunks 7, 8, 9
    remote = Remote(replica)
    result = compare(path, ranges, remote, batch=2, read_size=2 * CHUNK)
    assert list(result.differ.chunks()) == [1, 9]
    assert sorted(result.matched) == [0, 7, 8]
    assert result.matched[0] == chunk_digest(replica[:CHUNK])
    assert remote.requests == [[0, 1], [7, 8], [9]]


def test_a_chunk_the_replica_lacks_differs(tmp_path: Path) -> None:
    size = 6 * CHUNK
    path, local, _ = image_pair(tmp_path, size)
    remote = Remote(local[: 2 * CHUNK])  # a replica with only chunks 0 and 1
    assert list(differing_chunks(path, DirtyMap.full(size), remote).chunks()) == [2, 3, 4, 5]


def test_a_malformed_remote_answer_is_an_error_not_a_difference(tmp_path: Path) -> None:
    path, local, _ = image_pair(tmp_path, 6 * CHUNK)
    with pytest.raises(ValueError, match="has 8 bytes"):
        compare(path, DirtyMap.full(len(local)), lambda chunks: dict.fromkeys(chunks, b"12345678"))
