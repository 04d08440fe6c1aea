"""Materialising points beside a running apply, machine-level copies, failover rollback."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from appliance.target.errors import AlreadyExists, InvalidName, TargetError, UnknownPoint
from appliance.target.points import Coverage
from appliance.target.store import ReplicaStore, StoreSettings
from tests.target.conftest import StoreFactory
from tests.target.model import Op, Tag, apply, flat_of, image, random_stream, renumber


def test_coverage_claims_only_new_bytes() -> None:
    cov = Coverage()
    assert cov.claim(10, 20) == [(10, 20)]
    assert cov.claim(30, 40) == [(30, 40)]
    assert cov.claim(5, 45) == [(5, 10), (20, 30), (40, 45)]
    assert len(cov) == 1
    assert cov.claim(45, 50) == [(45, 50)]  # touching merges
    assert len(cov) == 1
    assert cov.claim(0, 50) == [(0, 5)]
    assert cov.claim(60, 70) == [(60, 70)]
    assert cov.claim(12, 13) == []


@pytest.mark.slow
def test_materialize_while_apply_runs(open_store: StoreFactory, tmp_path: Path) -> None:
    """A writer thread keeps applying while the main thread materialises each point as
    soon as it exists; every copy must equal the model at its point."""
    size = 1 << 20
    # Prefill so undo records carry real data, then a long stream of overwrites.
    base = random_stream(1, size, 200, max_sectors=128, tag_every=10_000, zero_share=0)
    ops = random_stream(2, size, 1500, max_sectors=128, tag_every=40, first_seq=201)
    store = open_store(StoreSettings(batch_bytes=64 << 10, segment_bytes=256 << 10))
    replica = store.open_disk("d", "m", size)
    apply(replica, base)
    replica.checkpoint()
    every = base + ops
    tags = [op for op in ops if isinstance(op, Tag)]
    done = threading.Event()
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            for op in ops:
                apply(replica, [op])
        except (OSError, TargetError, AssertionError) as exc:  # reported by the main thread
            failure.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    out = tmp_path / "out"
    out.mkdir()
    checked = 0
    try:
        for tag in tags:
            while not done.is_set() and replica.durable_seq < tag.seq:
                done.wait(0.001)
            if done.is_set() and checked > len(tags) // 3:
                break  # enough copies were made while the writer was running
            path = store.materialize_disk("d", tag.tag_id, out, tag.tag_id)
            concurrent = not done.is_set()
            assert flat_of(path).read_bytes() == image(size, every, tag.seq), tag.tag_id
            checked += concurrent
    finally:
        thread.join()
    assert not failure, failure
    assert checked >= 5  # at least a few copies really overlapped with apply


def test_machine_materialize_makes_one_vmdk_per_disk(store: ReplicaStore, tmp_path: Path) -> None:
    size = 128 << 10
    streams = {d: random_stream(seed, size, 60, tag_every=1_000_000) for seed, d in enumerate("ab")}
    for disk_id, ops in streams.items():
        replica = store.open_disk(disk_id, "vm1", size)
        apply(replica, ops)
        replica.tag(61, "boot", "app", 7)
        apply(replica, random_stream(9, size, 30, first_seq=62, tag_every=1_000_000))
    out = tmp_path / "vm1-test"
    out.mkdir()
    paths = store.materialize("vm1", "boot", out, "-tfo")
    assert [p.name for p in paths] == ["a-tfo.vmdk", "b-tfo.vmdk"]
    for path, (_, ops) in zip(paths, sorted(streams.items()), strict=True):
        assert flat_of(path).read_bytes() == image(size, ops, 60)
    with pytest.raises(AlreadyExists):  # never clobbers; and leaves nothing half-made
        store.materialize("vm1", "boot", out, "-tfo")
    assert sorted(p.name for p in out.iterdir()) == [
        "a-tfo-flat.vmdk", "a-tfo.vmdk", "b-tfo-flat.vmdk", "b-tfo.vmdk",
    ]  # fmt: skip
    with pytest.raises(InvalidName):
        store.materialize("vm1", "boot", out, "/../x")
    with pytest.raises(UnknownPoint):
        store.materialize("vm1", "nope", out, "-x")
    with pytest.raises(UnknownPoint):
        store.materialize("no-such-vm", "boot", out, "-x")
    # the cleanup of a test failover: only the copies go, the replicas stay
    replicas = {d: store.disk(d).flat.read_bytes() for d in "ab"}
    (out / "a-other.vmdk").write_text("someone else's")
    removed = store.discard("vm1", out, "-tfo")
    assert sorted(p.name for p in removed) == [
        "a-tfo-flat.vmdk", "a-tfo.vmdk", "b-tfo-flat.vmdk", "b-tfo.vmdk",
    ]  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["a-other.vmdk"]
    assert store.discard("vm1", out, "-tfo") == []  # again: nothing, no error
    with pytest.raises(ValueError, match="never discarded"):
        store.discard("vm1", out, "")
    with pytest.raises(InvalidName):
        store.discard("vm1", out, "/../x")
    assert {d: store.disk(d).flat.read_bytes() for d in "ab"} == replicas


def test_partial_machine_materialize_is_removed(store: ReplicaStore, tmp_path: Path) -> None:
    for disk_id in ("a", "b"):
        replica = store.open_disk(disk_id, "vm", 64 << 10)
        replica.tag(1, "t", "crash", 0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "b-x-flat.vmdk").write_bytes(b"someone else's")  # the second copy will collide
    with pytest.raises(AlreadyExists):
        store.materialize("vm", "t", out, "-x")
    assert [p.name for p in out.iterdir()] == ["b-x-flat.vmdk"]


def tagged_stream(
    seed: int, size: int, count: int, tags: dict[int, str], first_seq: int = 1
) -> list[Op]:
    """``count`` writes with ``Tag(tag_id)`` inserted before write index ``i`` for each
    ``i: tag_id`` in ``tags``; sequence numbers renumbered from ``first_seq``."""
    raw = random_stream(seed, size, count, tag_every=1_000_000)
    ops: list[Op] = []
    for i, op in enumerate(raw):
        if i in tags:
            ops.append(Tag(0, tags[i], 1000 * (first_seq + i)))  # source clock
        ops.append(op)
    return [renumber(op, first_seq + n) for n, op in enumerate(ops)]


def test_rollback_for_failover(store: ReplicaStore, tmp_path: Path) -> None:
    size = 256 << 10
    names = {50: "early", 100: "middle", 150: "late"}
    streams = {d: tagged_stream(20 + i, size, 200, names) for i, d in enumerate("xy")}
    for disk_id, ops in streams.items():
        apply(store.open_disk(disk_id, "vm", size), ops)
    with pytest.raises(UnknownPoint):
        store.rollback("vm", "nope")
    store.open_disk("x", "vm", size).tag(204, "only-x", "crash", 1)
    with pytest.raises(UnknownPoint):  # y lacks it: refused before touching x
        store.rollback("vm", "only-x")
    assert store.disk("x").durable_seq == 204

    before = {d: store.disk(d).applied_seq for d in streams}  # all of it: applied
    store.rollback("vm", "middle")
    out = tmp_path / "out"
    out.mkdir()
    for disk_id, ops in streams.items():
        replica = store.disk(disk_id)
        middle = next(op.seq for op in ops if isinstance(op, Tag) and op.tag_id == "middle")
        # The image is the point's; the numbering goes on where it was (no gap for the
        # senders), and the disk is fenced.
        resume = before[disk_id]
        assert replica.durable_seq == replica.applied_seq == resume > middle
        assert replica.fenced
        assert replica.flat.read_bytes() == image(size, ops, middle)
        assert replica.journal.end_lsn == replica.checkpoint_lsn
        assert [p.tag_id for p in store.points(disk_id=disk_id)] == ["early", "middle"]
        # Fenced: what still arrives is acknowledged and dropped, tags make no points.
        stale = tagged_stream(41, size, 30, {10: "stale"}, first_seq=resume + 1)
        apply(replica, stale)
        replica.checkpoint()
        assert replica.durable_seq == stale[-1].seq
        assert replica.flat.read_bytes() == image(size, ops, middle)
        assert [p.tag_id for p in store.points(disk_id=disk_id)] == ["early", "middle"]
    assert sorted(store.unfence("vm")) == ["x", "y"]
    assert store.unfence("vm") == []
    for disk_id, ops in streams.items():
        replica = store.disk(disk_id)
        middle = next(op.seq for op in ops if isinstance(op, Tag) and op.tag_id == "middle")
        # Unfenced, apply continues; old and new points both materialise.
        more = tagged_stream(40, size, 60, {30: "after"}, first_seq=replica.durable_seq + 1)
        apply(replica, more)
        replica.checkpoint()
        history = [op for op in ops if op.seq <= middle] + more
        assert replica.flat.read_bytes() == image(size, history, history[-1].seq)
        for tag in ("early", "middle", "after"):
            path = store.materialize_disk(disk_id, tag, out, f"{disk_id}-{tag}")
            seq = next(op.seq for op in history if isinstance(op, Tag) and op.tag_id == tag)
            assert flat_of(path).read_bytes() == image(size, history, seq), (disk_id, tag)
    assert [p.tag_id for p in store.points("vm")] == ["early", "middle", "after"]


def test_rollback_survives_reopen(open_store: StoreFactory) -> None:
    size = 64 << 10
    ops = tagged_stream(3, size, 80, {40: "p"})
    store = open_store()
    apply(store.open_disk("d", "m", size), ops)
    store.rollback_disk("d", "p")
    store.close()
    again = open_store().disk("d")
    assert again.durable_seq == ops[-1].seq  # the numbering continues after a rollback
    assert again.flat.read_bytes() == image(size, ops, 41)
