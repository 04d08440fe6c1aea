"""EXTENTS through the storage engine: many changes under one sequence number."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.target.errors import ExtentOutOfRange, SequenceGap
from appliance.target.store import ReplicaStore, StoreSettings
from appliance.wire.errors import MalformedBody
from appliance.wire.messages import Encoding, Extent, Extents
from tests.target.model import Many, Op, Tag, Write, apply, flat_of, image, random_stream, with_many
from tests.target.test_apply import check_points

KIB = 1024
RAW, ZERO, SAME = Encoding.RAW, Encoding.ZERO, Encoding.SAME


def mixed(seq: int, *, zstd: bool) -> Many:
    """RAW, ZERO and SAME extents, two of them back to back, over data written before."""
    extents = (
        Extent(0, 4 * KIB, RAW),
        Extent(4 * KIB, 8 * KIB, ZERO),
        Extent(16 * KIB, 4 * KIB, SAME),
        Extent(24 * KIB, 1 * KIB, RAW),
        Extent(60 * KIB, 4 * KIB, RAW),
    )
    data = b"a" * (4 * KIB) + b"b" * KIB + bytes(range(256)) * 16
    return Many(seq, extents, data, zstd=zstd)


@pytest.mark.parametrize("zstd", [False, True], ids=["raw", "zstd"])
def test_mixed_extents_apply_as_one_change(store: ReplicaStore, tmp_path: Path, zstd: bool) -> None:
    size = 64 * KIB
    replica = store.open_disk("d", "m", size)
    ops: list[Op] = [Write(1, 0, b"\x07" * size)]
    apply(replica, ops)
    replica.tag(2, "before", "crash", 1)
    many = mixed(3, zstd=zstd)
    assert many.message().encoding is (Encoding.ZSTD if zstd else Encoding.RAW)
    replica.write_extents(3, many.message())
    assert replica.applied_seq == 3
    assert replica.pending_bytes == 4 * KIB + 8 * KIB + KIB + 4 * KIB  # SAME writes nothing
    replica.tag(4, "after", "app", 2)
    ops += [many]
    expected = image(size, ops, 3)
    assert expected[16 * KIB : 20 * KIB] == b"\x07" * (4 * KIB)  # SAME left it alone
    assert expected[4 * KIB : 12 * KIB] == bytes(8 * KIB)
    assert replica.flat.read_bytes() == expected
    assert replica.durable_seq == 4
    # Both points materialise: the one before the EXTENTS rolls all of it back at once.
    out = tmp_path / "out"
    out.mkdir()
    before = store.materialize_disk("d", "before", out, "before")
    after = store.materialize_disk("d", "after", out, "after")
    assert flat_of(before).read_bytes() == b"\x07" * size
    assert flat_of(after).read_bytes() == expected


def test_one_bad_extent_changes_nothing(store: ReplicaStore) -> None:
    size = 64 * KIB
    replica = store.open_disk("d", "m", size)
    replica.write(1, 0, b"k" * size)
    replica.checkpoint()
    bad = [
        Extents.of("d", 2, [Extent(0, 512, RAW), Extent(size, 512, RAW)], b"x" * 1024),
        Extents.of("d", 2, [Extent(0, 512, RAW), Extent(1000, 512, ZERO)], b"x" * 512),
        Extents.of("d", 2, [Extent(0, 512, ZERO), Extent(4096, 100, SAME)], b""),
        Extents.of("d", 2, [Extent(0, 512, ZERO), Extent(size - 512, 1024, ZERO)], b""),
    ]
    for msg in bad:
        with pytest.raises(ExtentOutOfRange):
            replica.write_extents(2, msg)
        assert (replica.applied_seq, replica.pending_bytes) == (1, 0)
    lying = Extents("d", 2, (Extent(0, 4096, RAW),), Encoding.ZSTD, zstandard.compress(b"z" * 5000))
    with pytest.raises(MalformedBody, match="bad zstd payload"):
        replica.write_extents(2, lying)
    with pytest.raises(SequenceGap):
        replica.write_extents(5, Extents.of("d", 5, [Extent(0, 512, ZERO)], b""))
    assert (replica.applied_seq, replica.pending_bytes) == (1, 0)
    assert replica.checkpoint() == 1
    assert replica.flat.read_bytes() == b"k" * size
    replica.write_extents(2, Extents.of("d", 2, [Extent(512, 512, ZERO)], b""))  # still next
    assert replica.checkpoint() == 2


def test_replay_of_the_same_seq_is_ignored(store: ReplicaStore) -> None:
    size = 64 * KIB
    replica = store.open_disk("d", "m", size)
    first = Extents.of("d", 1, [Extent(0, 512, RAW), Extent(4096, 512, RAW)], b"a" * 1024)
    replica.write_extents(1, first)
    replica.checkpoint()
    replica.write_extents(1, first)  # resent after a reconnect: durable already
    replica.write_extents(2, Extents.of("d", 2, [Extent(8192, 512, RAW)], b"b" * 512))
    before = (replica.applied_seq, replica.pending_bytes)
    replica.write_extents(2, Extents.of("d", 2, [Extent(8192, 512, RAW)], b"X" * 512))
    replica.write_extents(1, Extents.of("d", 1, [Extent(0, 4096, ZERO)], b""))
    assert (replica.applied_seq, replica.pending_bytes) == before
    replica.checkpoint()
    data = replica.flat.read_bytes()
    assert data[:512] + data[4096:4608] + data[8192:8704] == b"a" * 1024 + b"b" * 512
    assert data[512:4096] == bytes(3584)


def test_the_receive_buffer_may_be_reused(store: ReplicaStore) -> None:
    replica = store.open_disk("d", "m", 64 * KIB)
    buf = bytearray(b"a" * 8192)
    extents = [Extent(0, 4096, RAW), Extent(16384, 4096, RAW)]
    replica.write_extents(1, Extents.of("d", 1, extents, memoryview(buf)))
    buf[:] = b"b" * 8192  # the connection reads the next frame into it
    replica.checkpoint()
    data = replica.flat.read_bytes()
    assert data[:4096] + data[16384:20480] == b"a" * 8192


def test_a_fenced_replica_drops_extents(store: ReplicaStore) -> None:
    size = 64 * KIB
    replica = store.open_disk("d", "m", size)
    replica.write(1, 0, b"v" * size)
    replica.fence(True)
    msg = Extents.of("d", 2, [Extent(0, 4096, RAW), Extent(8192, 4096, ZERO)], b"n" * 4096)
    replica.write_extents(2, msg)
    assert (replica.applied_seq, replica.pending_bytes) == (2, 0)  # acknowledged, unused
    assert replica.checkpoint() == 2
    assert replica.flat.read_bytes() == b"v" * size
    with pytest.raises(ExtentOutOfRange):  # a bad message is refused all the same
        replica.write_extents(3, Extents.of("d", 3, [Extent(size, 512, ZERO)], b""))
    replica.fence(False)
    replica.write_extents(3, msg.__class__.of("d", 3, msg.extents, msg.payload))
    replica.checkpoint()
    assert replica.flat.read_bytes()[:12288] == b"n" * 4096 + b"v" * 4096 + bytes(4096)


def test_extents_overlapping_the_batch_and_larger_than_it() -> None:
    """Extents that overlap writes already batched start a new batch; one larger than a
    batch is split; every point still materialises."""
    size = 256 * KIB
    ops: list[Op] = [Write(1, 0, bytes(range(256)) * (size // 256))]
    ops.append(Write(2, 8 * KIB, b"w" * (8 * KIB)))
    big = b"B" * (40 * KIB)  # 40 KiB against 16 KiB batches
    ops.append(Many(3, (Extent(4 * KIB, 8 * KIB, RAW), Extent(20 * KIB, 40 * KIB, RAW)),
                    b"o" * (8 * KIB) + big))  # fmt: skip
    ops.append(Tag(4, "t4", 4))
    ops.append(Many(5, (Extent(0, 64 * KIB, ZERO), Extent(128 * KIB, 4 * KIB, RAW)),
                    b"z" * (4 * KIB), zstd=True))  # fmt: skip
    ops.append(Tag(6, "t6", 6))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        store = ReplicaStore(base / "s", base / "ds", StoreSettings(batch_bytes=16 * KIB,
                             segment_bytes=64 * KIB))  # fmt: skip
        try:
            replica = store.open_disk("d", "m", size)
            apply(replica, ops)
            assert replica.flat.read_bytes() == image(size, ops, 6)
            assert check_points(store, "d", size, ops, base / "out") == 2
        finally:
            store.close()


def test_random_streams_with_extents_every_point() -> None:
    size = 256 * KIB
    ops = with_many(3, random_stream(31, size, 300, tag_every=6), size, share=0.4)
    assert sum(isinstance(op, Many) for op in ops) > 60
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        store = ReplicaStore(
            base / "s", base / "ds", StoreSettings(batch_bytes=16 * KIB, segment_bytes=64 * KIB)
        )
        try:
            replica = store.open_disk("d", "m", size)
            apply(replica, ops)
            apply(replica, ops[: len(ops) // 2])  # replays change nothing
            replica.checkpoint()
            assert replica.flat.read_bytes() == image(size, ops, len(ops))
            assert check_points(store, "d", size, ops, base / "out") > 30
        finally:
            store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.sampled_from([512, 4096, 16 * KIB]))
def test_model_based_with_extents(seed: int, batch: int) -> None:
    size = 128 * KIB
    ops = with_many(seed, random_stream(seed, size, 30, max_sectors=24), size, share=0.5)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        store = ReplicaStore(
            base / "s", base / "ds", StoreSettings(batch_bytes=batch, segment_bytes=64 * KIB)
        )
        try:
            replica = store.open_disk("d", "m", size)
            cut = rng.randrange(len(ops))
            apply(replica, ops[:cut])
            replica.checkpoint()
            apply(replica, ops[cut:])
            replica.checkpoint()
            assert replica.flat.read_bytes() == image(size, ops, len(ops))
            check_points(store, "d", size, ops, base / "out")
        finally:
            store.close()
