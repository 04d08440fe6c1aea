"""DirtyMap against a plain set-of-chunks model, and its persisted layout."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.discovery import Disk
from agent.trackers import CHUNK, DirtyMap, Tracker
from agent.trackers.scan import ScanTracker

CHUNKS = st.sampled_from([512, 4096, CHUNK])


@st.composite
def geometry_and_ranges(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int]]]:
    chunk = draw(CHUNKS)
    size = draw(st.integers(0, 70 * chunk))  # ragged ends: sizes not a chunk multiple
    ranges = draw(
        st.lists(
            st.tuples(st.integers(0, size + 2 * chunk), st.integers(0, 20 * chunk)),
            max_size=12,
        )
    )
    return size, chunk, ranges


def model_of(size: int, chunk: int, ranges: list[tuple[int, int]]) -> set[int]:
    """Chunks overlapping any range, ignoring bytes past the end of the disk."""
    chunks = set()
    for offset, length in ranges:
        end = min(offset + length, size)
        if offset < end:
            chunks.update(range(offset // chunk, -(-end // chunk)))
    return chunks


def build(size: int, chunk: int, ranges: list[tuple[int, int]]) -> DirtyMap:
    dirty = DirtyMap(size, chunk)
    for offset, length in ranges:
        dirty.mark(offset, length)
    return dirty


@settings(max_examples=300, deadline=None)
@given(geometry_and_ranges())
def test_mark_chunks_extents_match_the_set_model(
    case: tuple[int, int, list[tuple[int, int]]],
) -> None:
    size, chunk, ranges = case
    dirty = build(size, chunk, ranges)
    model = model_of(size, chunk, ranges)
    assert list(dirty.chunks()) == sorted(model)
    assert dirty.count == len(model)
    assert bool(dirty) == bool(model)
    assert all(index in dirty for index in model)
    extents = list(dirty.extents())
    # Extents cover exactly the model's chunks, clipped to the disk, ascending, coalesced.
    covered = {
        index
        for offset, length in extents
        for index in range(offset // chunk, -(-(offset + length) // chunk))
    }
    assert covered == model
    for offset, length in extents:
        assert length > 0 and offset % chunk == 0 and offset + length <= size
    for (a, alen), (b, _) in itertools.pairwise(extents):
        assert a + alen < b  # a gap between consecutive extents, else they would merge


@settings(max_examples=200, deadline=None)
@given(geometry_and_ranges(), st.data())
def test_merge_is_union_and_bytes_round_trip(
    case: tuple[int, int, list[tuple[int, int]]], data: st.DataObject
) -> None:
    size, chunk, ranges = case
    other_ranges = data.draw(
        st.lists(st.tuples(st.integers(0, size + chunk), st.integers(0, 9 * chunk)), max_size=6)
    )
    left = build(size, chunk, ranges)
    right = build(size, chunk, other_ranges)
    before_right = right.copy()
    left.merge(right)
    assert set(left.chunks()) == model_of(size, chunk, ranges) | model_of(size, chunk, other_ranges)
    assert right == before_right  # merge does not touch its argument
    assert DirtyMap.from_bytes(left.to_bytes(), size, chunk) == left


def test_full_clear_copy_and_discard() -> None:
    size = 10 * CHUNK + 1  # 11 chunks, the last one a single byte
    full = DirtyMap.full(size)
    assert full.count == 11
    assert list(full.extents()) == [(0, size)]
    copy = full.copy()
    copy.discard_chunk(3)
    assert list(copy.extents()) == [(0, 3 * CHUNK), (4 * CHUNK, size - 4 * CHUNK)]
    assert full.count == 11  # the copy is independent
    copy.clear()
    assert not copy and copy.count == 0 and list(copy.chunks()) == []
    assert not DirtyMap(0) and list(DirtyMap(0).extents()) == []


def test_dense_map_of_a_large_disk_is_fast_enough() -> None:
    dirty = DirtyMap(2 << 40)  # 2 TiB: 32 Mi chunks, 4 MiB of bitmap
    dirty.mark(0, 2 << 40)
    assert list(dirty.extents()) == [(0, 2 << 40)]
    assert dirty.count == 32 << 20


def test_bad_input_is_refused() -> None:
    dirty = DirtyMap(3 * CHUNK)
    with pytest.raises(ValueError):
        dirty.mark(-1, 10)
    with pytest.raises(IndexError):
        dirty.mark_chunk(3)
    with pytest.raises(ValueError, match="cannot merge"):
        dirty.merge(DirtyMap(4 * CHUNK))
    with pytest.raises(ValueError, match="bitmap of 2 bytes"):
        DirtyMap.from_bytes(b"\x00\x00", 3 * CHUNK)
    with pytest.raises(ValueError, match="past the last chunk"):
        DirtyMap.from_bytes(b"\x08", 3 * CHUNK)  # bit 3 of a 3-chunk map
    dirty.mark(3 * CHUNK, CHUNK)  # entirely past the end: dropped
    assert not dirty


def test_scan_tracker_satisfies_the_protocol(tmp_path: Path) -> None:
    # mypy proves the signatures (agent/trackers/scan.py); this proves the names at runtime.
    disk = Disk("loop9", Path("/dev/loop9"), 7, 9, 4 * CHUNK, 512, 512, False, False, False)
    tracker = ScanTracker(disk, tmp_path / "digests")
    assert isinstance(tracker, Tracker) and tracker.name == "scan"
