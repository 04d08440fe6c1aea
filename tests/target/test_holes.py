"""HoleMap: the same answers as one lseek(SEEK_DATA) per extent, with far fewer calls."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from appliance.target.holes import HoleMap

KIB = 1024
SIZE = 4096 * KIB


def one_lseek(fd: int, offset: int, length: int) -> bool:
    """The per-extent question HoleMap replaces."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        assert exc.errno == errno.ENXIO
        return True


@pytest.fixture
def sparse(tmp_path: Path) -> int:
    """A 4 MiB file: data in a few runs (at 64 KiB granularity, so holes stay holes)."""
    fd = os.open(tmp_path / "sparse", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    for start, n in ((0, 64), (256, 128), (1024, 64), (2048, 1024)):  # in KiB
        os.pwrite(fd, b"d" * (n * KIB), start * KIB)
    os.fsync(fd)
    probe = os.lseek(fd, 64 * KIB, os.SEEK_DATA)
    if probe != 256 * KIB:
        os.close(fd)
        pytest.skip(f"this filesystem reports no holes at 64 KiB granularity ({probe})")
    yield fd
    os.close(fd)


def test_same_answers_as_asking_each_time(sparse: int) -> None:
    rng = random.Random(7)
    offsets = sorted(rng.sample(range(SIZE // 4096), 600))
    extents = [(o * 4096, 4096 * rng.randint(1, 8)) for o in offsets]
    extents = [(o, min(n, SIZE - o)) for o, n in extents]
    holes = HoleMap(sparse)
    got = [holes.is_hole(o, n) for o, n in extents]
    assert got == [one_lseek(sparse, o, n) for o, n in extents]
    assert True in got and False in got
    # Four data runs (eight boundaries): a few lseeks per boundary, not one per extent.
    assert holes.queries <= 32, holes.queries


def test_extent_partly_data_is_not_a_hole(sparse: int) -> None:
    holes = HoleMap(sparse)
    assert holes.is_hole(192 * KIB, 64 * KIB)
    assert not holes.is_hole(192 * KIB, 68 * KIB)  # its last 4 KiB are data
    assert not holes.is_hole(380 * KIB, 8 * KIB)  # starts in data, ends in a hole
    assert holes.is_hole(SIZE - 4096, 4096) is one_lseek(sparse, SIZE - 4096, 4096)


def test_out_of_order_questions_stay_correct(sparse: int) -> None:
    rng = random.Random(3)
    extents = [(rng.randrange(SIZE // 4096) * 4096, 4096) for _ in range(300)]
    holes = HoleMap(sparse)
    assert [holes.is_hole(o, n) for o, n in extents] == [
        one_lseek(sparse, o, n) for o, n in extents
    ]
