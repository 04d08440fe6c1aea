"""Undo records of extents that are holes in the replica: ZEROS, without reading them."""

from __future__ import annotations

from appliance.target.journal import Encoding
from appliance.target.points import PointKind
from appliance.target.store import ReplicaStore

KIB = 1024


def test_holes_give_zeros_undo_and_data_is_still_read(store: ReplicaStore) -> None:
    size = 1024 * KIB
    replica = store.open_disk("d0", "m0", size)
    replica.write(1, 0, b"a" * (64 * KIB))  # a hole before
    replica.tag(2, "one", PointKind.CRASH, 1)
    replica.write(3, 0, b"b" * (64 * KIB))  # data before, in the page cache or on disk
    replica.write(4, 512 * KIB, b"c" * (4 * KIB))  # a hole again
    # Partly data, partly hole: read, and the data half is in its undo.
    replica.write(5, 60 * KIB, b"d" * (8 * KIB))
    replica.checkpoint()
    records = list(replica.journal.read(0))
    undo = {(r.seq, r.offset): r for r in records}
    assert all(r.encoding is Encoding.ZEROS for r in records if r.seq in (1, 4))
    assert {r.seq for r in records} == {1, 3, 4, 5}
    data3 = b"".join(r.data() for r in records if r.seq == 3)
    assert data3 == b"a" * (64 * KIB)
    assert undo[(5, 60 * KIB)].data() == b"b" * (4 * KIB) + bytes(4 * KIB)


def test_rollback_through_zeros_undo_restores_the_holes(store: ReplicaStore) -> None:
    size = 256 * KIB
    replica = store.open_disk("d0", "m0", size)
    replica.write(1, 64 * KIB, b"x" * (16 * KIB))
    replica.tag(2, "before", PointKind.CRASH, 1)
    replica.write(3, 0, b"y" * (128 * KIB))  # over a hole, the data and another hole
    replica.checkpoint()
    store.rollback_disk("d0", "before")
    expected = bytearray(size)
    expected[64 * KIB : 80 * KIB] = b"x" * (16 * KIB)
    assert replica.flat.read_bytes() == bytes(expected)
