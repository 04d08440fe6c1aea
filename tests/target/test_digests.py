"""The replica's chunk digests are the agent's, byte for byte, whatever the request."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.digest import DeviceReader
from appliance.digest import chunk_digest
from appliance.target import digests
from appliance.target.digests import replica_digests

CHUNK = 64 << 10
# Seven full chunks and a short last one of three sectors.
SIZE = 7 * CHUNK + 3 * 512


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "d-flat.vmdk"
    path.write_bytes(data)
    return path, data


def agent_digests(path: Path, chunk: int = CHUNK) -> dict[int, bytes]:
    """What the agent's own reader computes for every chunk of the same file."""
    nchunks = -(-SIZE // chunk)
    out: dict[int, bytes] = {}
    with DeviceReader(path, SIZE) as reader:
        for first, joined in reader.digests([(0, nchunks)], chunk):
            for k in range(0, len(joined), 16):
                out[first + k // 16] = joined[k : k + 16]
    return out


def test_same_digests_as_the_agent_including_the_short_last_chunk(
    image: tuple[Path, bytes],
) -> None:
    path, data = image
    ours = dict(replica_digests(path, SIZE, CHUNK, range(8)))
    assert ours == agent_digests(path)
    assert ours[7] == chunk_digest(data[7 * CHUNK :])  # 1536 bytes, not padded
    assert ours[7] != chunk_digest(data[7 * CHUNK :] + bytes(CHUNK - 1536))


def test_runs_gaps_duplicates_and_chunks_past_the_end(
    image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = image
    # Two chunks per read: the runs 0-2 and 5-7 each take two preads, 4 its own.
    monkeypatch.setattr(digests, "READ_RUN", 2 * CHUNK)
    got = replica_digests(path, SIZE, CHUNK, [7, 2, 0, 1, 5, 6, 4, 2, 8, 2**40])
    assert [index for index, _ in got] == [0, 1, 2, 4, 5, 6, 7]  # ascending, distinct
    for index, digest in got:
        assert digest == chunk_digest(data[index * CHUNK : (index + 1) * CHUNK])
    assert replica_digests(path, SIZE, CHUNK, [8, 9]) == []
    assert replica_digests(path, SIZE, CHUNK, []) == []


def test_chunk_sizes_other_than_the_agents_default(image: tuple[Path, bytes]) -> None:
    path, data = image
    for chunk in (512, 4096, 3 * 4096, 1 << 20):
        n = -(-SIZE // chunk)
        got = dict(replica_digests(path, SIZE, chunk, range(n)))
        assert got == {i: chunk_digest(data[i * chunk : (i + 1) * chunk]) for i in range(n)}
    assert dict(replica_digests(path, SIZE, 4096, range(200))) == agent_digests(path, 4096)


def test_a_replica_shorter_than_its_disk_is_an_io_error(image: tuple[Path, bytes]) -> None:
    path, _ = image
    os.truncate(path, 2 * CHUNK)
    with pytest.raises(OSError, match="replica ends at"):
        replica_digests(path, SIZE, CHUNK, [1, 2])
