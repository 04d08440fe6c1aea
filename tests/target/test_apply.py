"""The apply pipeline against a model: every point materialises to the model's image."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.storage.faults import FaultPoint, set_fault_hook
from appliance.target.errors import (
    AlreadyExists,
    DiskSizeMismatch,
    ExtentOutOfRange,
    InvalidName,
    InvalidSize,
    SequenceGap,
    UnknownDisk,
)
from appliance.target.points import PointKind
from appliance.target.store import ReplicaStore, StoreSettings
from tests.target.conftest import StoreFactory
from tests.target.model import Op, Tag, Write, Zero, apply, flat_of, image, random_stream

SECTOR = 512


def check_points(store: ReplicaStore, disk_id: str, size: int, ops: list[Op], out: Path) -> int:
    """Materialise every point of ``disk_id``; each must equal the model. Returns count."""
    out.mkdir(exist_ok=True)
    tags = [op for op in ops if isinstance(op, Tag)]
    for op in tags:
        descriptor = store.materialize_disk(disk_id, op.tag_id, out, f"{disk_id}-{op.tag_id}")
        assert flat_of(descriptor).read_bytes() == image(size, ops, op.seq), op.tag_id
    return len(tags)


def test_random_stream_every_point_and_the_latest(store: ReplicaStore, tmp_path: Path) -> None:
    size = 256 << 10
    ops = random_stream(11, size, 400)
    replica = store.open_disk("d0", "m0", size)
    apply(replica, ops)
    replica.checkpoint()
    assert replica.durable_seq == replica.applied_seq == 400
    assert replica.flat.read_bytes() == image(size, ops, 400)
    assert check_points(store, "d0", size, ops, tmp_path / "out") > 20
    # The latest point: tag the end of the stream and materialise it too.
    replica.tag(401, "latest", PointKind.APP, 10**12)
    latest = store.materialize_disk("d0", "latest", tmp_path / "out", "latest")
    assert flat_of(latest).read_bytes() == image(size, ops, 400)
    assert store.points(disk_id="d0")[-1].kind is PointKind.APP


OP = st.tuples(
    st.sampled_from(["w", "w", "w", "z", "t"]),
    st.integers(0, 255),  # first sector (of a 128 KiB disk)
    st.integers(1, 40),  # sectors
    st.integers(0, 255),  # fill byte
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OP, min_size=1, max_size=40))
def test_model_based(raw: list[tuple[str, int, int, int]]) -> None:
    size = 128 << 10
    ops: list[Op] = []
    for i, (kind, sector, sectors, fill) in enumerate(raw, start=1):
        offset = min(sector, size // SECTOR - sectors) * SECTOR
        if kind == "t":
            ops.append(Tag(i, f"t{i}", i))
        elif kind == "z":
            ops.append(Zero(i, offset, sectors * SECTOR))
        else:
            ops.append(Write(i, offset, bytes([fill, i % 256]) * (sectors * SECTOR // 2)))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        # 4 KiB batches: extents of up to 20 KiB are split, overlaps force flushes.
        store = ReplicaStore(
            base / "s", base / "ds", StoreSettings(batch_bytes=4096, segment_bytes=64 << 10)
        )
        try:
            replica = store.open_disk("d", "m", size)
            apply(replica, ops)
            apply(replica, ops[: len(ops) // 2])  # a replay changes nothing
            replica.checkpoint()
            assert replica.flat.read_bytes() == image(size, ops, len(ops))
            check_points(store, "d", size, ops, base / "out")
        finally:
            store.close()


def test_replay_is_ignored(store: ReplicaStore) -> None:
    size = 64 << 10
    replica = store.open_disk("d", "m", size)
    replica.write(1, 0, b"a" * 4096)
    replica.tag(2, "t2", "crash", 1)
    replica.write(3, 4096, b"b" * 4096)
    before = (replica.applied_seq, replica.pending_bytes)
    replica.write(1, 0, b"X" * 4096)
    replica.write_zero(3, 4096, 4096)
    replica.tag(2, "again", "app", 2)
    replica.write(2, 8192, b"Y" * 512)
    assert (replica.applied_seq, replica.pending_bytes) == before
    replica.checkpoint()
    expected = b"a" * 4096 + b"b" * 4096 + bytes(size - 8192)
    assert replica.flat.read_bytes() == expected
    assert [p.tag_id for p in store.points(disk_id="d")] == ["t2"]


def test_gap_raises_and_changes_nothing(store: ReplicaStore) -> None:
    replica = store.open_disk("d", "m", 64 << 10)
    replica.write(1, 0, b"a" * 512)
    with pytest.raises(SequenceGap) as info:
        replica.write(3, 0, b"b" * 512)
    assert (info.value.expected, info.value.got) == (2, 3)
    with pytest.raises(SequenceGap):
        replica.tag(5, "t", "crash", 0)
    with pytest.raises(SequenceGap):
        replica.write_zero(4, 0, 512)
    assert replica.applied_seq == 1
    replica.write(2, 512, b"c" * 512)
    replica.checkpoint()
    assert replica.flat.read_bytes()[:1024] == b"a" * 512 + b"c" * 512


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-512, 512), (64 << 10, 512), ((64 << 10) - 512, 1024), (100, 512), (0, 100), (0, 0),
     (512, 513)],
)  # fmt: skip
def test_out_of_range_raises_and_changes_nothing(
    store: ReplicaStore, offset: int, length: int
) -> None:
    size = 64 << 10
    replica = store.open_disk("d", "m", size)
    replica.write(1, 0, b"k" * 1024)
    replica.checkpoint()
    with pytest.raises(ExtentOutOfRange):
        replica.write(2, offset, b"z" * length)
    with pytest.raises(ExtentOutOfRange):
        replica.write_zero(2, offset, length)
    assert (replica.applied_seq, replica.durable_seq, replica.pending_bytes) == (1, 1, 0)
    replica.tag(2, "after", "crash", 0)  # seq 2 is still the next one
    assert replica.flat.read_bytes() == b"k" * 1024 + bytes(size - 1024)


def test_same_advances_the_sequence_and_changes_nothing(store: ReplicaStore) -> None:
    size = 64 << 10
    replica = store.open_disk("d", "m", size)
    replica.write(1, 0, b"a" * 4096)
    replica.same(2, 0, 4096)  # the sender saw seq 1's identical write still in flight
    replica.write(3, 4096, b"b" * 512)
    with pytest.raises(ExtentOutOfRange):
        replica.same(4, size, 512)
    with pytest.raises(SequenceGap):
        replica.same(9, 0, 512)
    assert replica.applied_seq == 3
    assert replica.checkpoint() == 3
    assert replica.flat.read_bytes() == b"a" * 4096 + b"b" * 512 + bytes(size - 4608)


def test_durability_bookkeeping(store: ReplicaStore) -> None:
    replica = store.open_disk("d", "m", 1 << 20)
    assert (replica.applied_seq, replica.durable_seq, replica.pending_bytes) == (0, 0, 0)
    replica.write(1, 0, b"x" * 8192)
    replica.write_zero(2, 8192, 4096)
    assert (replica.applied_seq, replica.durable_seq, replica.pending_bytes) == (2, 0, 12288)
    assert replica.checkpoint() == 2
    assert (replica.durable_seq, replica.pending_bytes) == (2, 0)
    assert replica.checkpoint() == 2  # nothing new: nothing to do
    replica.write(3, 0, b"y" * 512)
    replica.tag(4, "t", "app", 5)
    assert (replica.applied_seq, replica.durable_seq, replica.pending_bytes) == (4, 4, 0)
    assert replica.size == 1 << 20 and replica.machine_id == "m" and replica.disk_id == "d"
    assert replica.vmdk.name == "d.vmdk"


def test_large_write_is_split_into_batches(store: ReplicaStore) -> None:
    size = 1 << 20
    replica = store.open_disk("d", "m", size)
    blob = bytes(range(256)) * (600 << 10 >> 8)  # 600 KiB against 16 KiB batches
    replica.write(1, 0, b"\x01" * size)
    replica.tag(2, "before", "crash", 0)
    replica.write(3, 4096, blob)
    replica.checkpoint()
    assert replica.flat.read_bytes() == b"\x01" * 4096 + blob + b"\x01" * (size - 4096 - len(blob))


def test_caller_buffer_may_be_reused(store: ReplicaStore) -> None:
    replica = store.open_disk("d", "m", 64 << 10)
    buf = bytearray(b"a" * 4096)
    replica.write(1, 0, memoryview(buf))
    buf[:] = b"b" * 4096  # the server reuses its receive buffer
    replica.checkpoint()
    assert replica.flat.read_bytes()[:4096] == b"a" * 4096


def test_tag_validation_and_duplicate_ids(store: ReplicaStore) -> None:
    replica = store.open_disk("d", "m", 64 << 10)
    with pytest.raises(ValueError):
        replica.tag(1, "t", "bogus", 0)
    with pytest.raises(InvalidName):
        replica.tag(1, "", "crash", 0)
    with pytest.raises(InvalidName):
        replica.tag(1, "x" * 129, "crash", 0)
    replica.tag(1, "t", "crash", 10)
    replica.write(2, 0, b"q" * 512)
    replica.tag(3, "t", "app", 20)  # the same id again: the first point is kept
    assert replica.durable_seq == 3
    (point,) = store.points(disk_id="d")
    assert (point.seqs, point.kind, point.time_ns) == ((1,), PointKind.CRASH, 10)


def test_open_disk_rules(open_store: StoreFactory) -> None:
    store = open_store()
    replica = store.open_disk("d1", "m1", 1 << 20)
    assert store.open_disk("d1", "m1", 1 << 20) is replica
    assert store.disk("d1") is replica
    with pytest.raises(DiskSizeMismatch):
        store.open_disk("d1", "m1", 2 << 20)
    with pytest.raises(AlreadyExists):
        store.open_disk("d1", "other", 1 << 20)
    with pytest.raises(UnknownDisk):
        store.disk("nope")
    with pytest.raises(InvalidName):
        store.open_disk("../etc", "m1", 1 << 20)
    with pytest.raises(InvalidSize):
        store.open_disk("d2", "m1", 1000)
    store.open_disk("d2", "m1", 512)
    replica.write(1, 0, b"x" * 512)
    replica.tag(2, "t", "crash", 1)
    info = {d.disk_id: d for d in store.disks()}
    assert set(info) == {"d1", "d2"}
    assert (info["d1"].applied_seq, info["d1"].durable_seq, info["d1"].size) == (2, 2, 1 << 20)
    assert info["d1"].vmdk == replica.vmdk
    store.close()
    # Reopened, the store knows its disks without open_disk, and checks sizes again.
    again = open_store()
    assert again.disk("d1").durable_seq == 2
    with pytest.raises(DiskSizeMismatch):
        again.open_disk("d1", "m1", 4096)
    assert again.open_disk("d1", "m1", 1 << 20).applied_seq == 2


def test_machine_points_need_every_disk(store: ReplicaStore) -> None:
    a = store.open_disk("a", "vm", 64 << 10)
    b = store.open_disk("b", "vm", 64 << 10)
    store.open_disk("c", "other", 64 << 10).tag(1, "t1", "crash", 5)
    a.tag(1, "t1", "crash", 100)
    assert [p.tag_id for p in store.points("vm")] == []  # b has not applied t1 yet
    assert [p.tag_id for p in store.points(disk_id="a")] == ["t1"]
    b.write(1, 0, b"x" * 512)
    b.tag(2, "t1", "crash", 101)
    (point,) = store.points("vm")
    assert (point.tag_id, point.machine_id, point.disks, point.seqs) == (
        "t1",
        "vm",
        ("a", "b"),
        (1, 2),
    )
    assert point.usable and point.kind is PointKind.CRASH and point.time_ns == 100
    assert {(p.machine_id, p.tag_id) for p in store.points()} == {("vm", "t1"), ("other", "t1")}


def test_batches_flush_on_overlap_and_when_full(store: ReplicaStore) -> None:
    flushes = 0

    def count(point: FaultPoint) -> None:
        nonlocal flushes
        flushes += point is FaultPoint.JOURNAL_SYNCED

    def flushed(n: int) -> bool:
        """Batches are written by the disk's writer thread: give it a moment."""
        deadline = time.monotonic() + 5
        while flushes < n and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # and nothing more than n arrives
        return flushes == n

    set_fault_hook(count)
    replica = store.open_disk("d", "m", 1 << 20)  # SMALL: 16 KiB batches
    replica.write(1, 0, b"a" * 4096)
    replica.write(2, 8192, b"b" * 4096)  # no overlap: same batch
    replica.write_zero(3, 4096, 4096)  # touching is not overlapping
    assert flushed(0)
    replica.write(4, 2048, b"c" * 1024)  # overlaps the first write: flush first
    assert flushed(1)
    replica.write(5, 65536, b"d" * 16384)  # would pass 16 KiB: flush first
    assert flushed(2)
    replica.checkpoint()
    assert flushes == 3
    expected = bytearray(1 << 20)
    expected[0:4096] = b"a" * 4096
    expected[8192:12288] = b"b" * 4096
    expected[2048:3072] = b"c" * 1024
    expected[65536:81920] = b"d" * 16384
    assert replica.flat.read_bytes() == bytes(expected)
