"""Crash recovery, deterministically: a forked child applies a stream and dies with
os._exit() (no cleanup, like kill -9) at a chosen fault point; the parent reopens the
store and checks the replica equals the model at ``durable_seq`` bit for bit, that
every point still materialises, and that the stream continues to a correct end.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.storage.faults import FaultPoint, set_fault_hook
from appliance.target.journal import SEGMENT_HEADER
from appliance.target.replica import DiskReplica
from appliance.target.store import ReplicaStore
from tests import forked
from tests.forked import CRASHED, FINISHED, crash_where
from tests.target.conftest import SMALL
from tests.target.model import Many, Op, Tag, apply, flat_of, image, random_stream, with_many

SIZE = 192 << 10
OPS = random_stream(2024, SIZE, 160, max_sectors=48, tag_every=10)


def in_child(tmp_path: Path, body: Callable[[ReplicaStore, DiskReplica], None],
             crash: Callable[[FaultPoint], bool]) -> int:  # fmt: skip
    """Fork; in the child open the store, install a hook that exits where ``crash``
    says, run ``body``. Returns the child's exit code."""

    def run() -> None:
        crash_where(crash)
        store = ReplicaStore(tmp_path / "state", tmp_path / "datastore", SMALL)
        body(store, store.open_disk("d", "m", SIZE))

    return forked.in_child(run)


def at_hit(point: FaultPoint | None, hit: int) -> Callable[[FaultPoint], bool]:
    """Crash at the ``hit``-th time ``point`` (any point if None) is reached."""
    seen = 0

    def crash(p: FaultPoint) -> bool:
        nonlocal seen
        if point is None or p is point:
            seen += 1
        return seen == hit

    return crash


def run_stream(store: ReplicaStore, replica: DiskReplica) -> None:
    apply(replica, OPS[replica.applied_seq :])
    replica.checkpoint()


def check_recovered(tmp_path: Path, ops: list[Op] = OPS) -> int:
    """Reopen, compare with the model, materialise every point, finish the stream."""
    store = ReplicaStore(tmp_path / "state", tmp_path / "datastore", SMALL)
    try:
        replica = store.open_disk("d", "m", SIZE)
        durable = replica.durable_seq
        assert replica.applied_seq == durable
        assert replica.flat.read_bytes() == image(SIZE, ops, durable)
        assert replica.journal.end_lsn == replica.checkpoint_lsn
        out = tmp_path / f"out{durable}"
        out.mkdir()
        for point in store.points(disk_id="d"):
            assert point.usable
            (seq,) = point.seqs
            assert seq <= durable
            path = store.materialize_disk("d", point.tag_id, out, point.tag_id)
            assert flat_of(path).read_bytes() == image(SIZE, ops, seq), point.tag_id
        expected_tags = [op.tag_id for op in ops if isinstance(op, Tag) and op.seq <= durable]
        assert [p.tag_id for p in store.points(disk_id="d")] == expected_tags
        apply(replica, ops[durable:])
        replica.checkpoint()
        assert replica.flat.read_bytes() == image(SIZE, ops, len(ops))
        return durable
    finally:
        store.close()


TARGETED = [
    (FaultPoint.JOURNAL_WRITE, 5),
    (FaultPoint.JOURNAL_WRITTEN, 3),
    (FaultPoint.JOURNAL_WRITTEN, 21),
    (FaultPoint.JOURNAL_ROLLOVER, 2),
    (FaultPoint.JOURNAL_SYNCED, 1),
    (FaultPoint.JOURNAL_SYNCED, 17),
    (FaultPoint.REPLICA_WRITE, 2),  # mid-batch: part of the batch is in the replica
    (FaultPoint.REPLICA_WRITE, 45),
    (FaultPoint.REPLICA_WRITTEN, 9),
    (FaultPoint.REPLICA_SYNCED, 3),
    (FaultPoint.CATALOGUE_COMMIT, 1),  # before the first checkpoint ever
    (FaultPoint.CATALOGUE_COMMIT, 6),
]


# The same stream with 40 % of its writes EXTENTS changes (up to 24 extents under one seq).
MANY_OPS = with_many(7, OPS, SIZE, share=0.4)
MANY_TARGETED = [
    (FaultPoint.JOURNAL_SYNCED, 4),
    (FaultPoint.REPLICA_WRITE, 7),  # mid-batch: part of the batch is in the replica
    (FaultPoint.REPLICA_WRITE, 130),
    (FaultPoint.REPLICA_SYNCED, 2),
    (FaultPoint.CATALOGUE_COMMIT, 5),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "hit"), MANY_TARGETED, ids=[f"{p}-{h}" for p, h in MANY_TARGETED]
)
def test_crash_mid_extents(tmp_path: Path, point: FaultPoint, hit: int) -> None:
    assert sum(isinstance(op, Many) for op in MANY_OPS) > 30

    def run(store: ReplicaStore, replica: DiskReplica) -> None:
        apply(replica, MANY_OPS[replica.applied_seq :])
        replica.checkpoint()

    assert in_child(tmp_path, run, at_hit(point, hit)) == CRASHED
    check_recovered(tmp_path, MANY_OPS)


@pytest.mark.slow
@pytest.mark.parametrize(("point", "hit"), TARGETED, ids=[f"{p}-{h}" for p, h in TARGETED])
def test_crash_at_a_step(tmp_path: Path, point: FaultPoint, hit: int) -> None:
    assert in_child(tmp_path, run_stream, at_hit(point, hit)) == CRASHED
    check_recovered(tmp_path)


@pytest.mark.slow
def test_crash_at_any_instant(tmp_path: Path) -> None:
    """Sweep: crash at the n-th fault point of any kind, for n across the whole run."""
    probe = tmp_path / "probe"
    counted = 0

    def count(_: FaultPoint) -> None:
        nonlocal counted
        counted += 1

    # Count in this process (no crash) to know how many instants there are.
    set_fault_hook(count)
    store = ReplicaStore(probe / "state", probe / "datastore", SMALL)
    run_stream(store, store.open_disk("d", "m", SIZE))
    store.close()
    set_fault_hook(None)
    assert counted > 200
    durables = set()
    for i, n in enumerate(random.Random(5).sample(range(1, counted), 14)):
        case = tmp_path / f"case{i}"
        assert in_child(case, run_stream, at_hit(None, n)) == CRASHED
        durables.add(check_recovered(case))
    assert len(durables) > 5  # the crashes really landed at different places


@pytest.mark.slow
@pytest.mark.parametrize("hit", [2, 9, 30])
def test_unsynced_journal_tail_lost(tmp_path: Path, hit: int) -> None:
    """Power loss after the journal write but before its fdatasync: the unsynced part
    of the last segment may be lost or torn; recovery must still be exact."""
    marker = tmp_path / "published"

    def body(store: ReplicaStore, replica: DiskReplica) -> None:
        def note(point: FaultPoint) -> bool:
            if point is FaultPoint.JOURNAL_WRITTEN:
                marker.write_text(str(replica.journal.end_lsn))
            return crash(point)

        set_fault_hook(lambda p: os._exit(CRASHED) if note(p) else None)
        run_stream(store, replica)

    crash = at_hit(FaultPoint.JOURNAL_WRITTEN, hit)
    assert in_child(tmp_path, body, lambda p: False) == CRASHED
    published = int(marker.read_text())
    last = sorted((tmp_path / "state" / "journal" / "d").glob("*.undo"))[-1]
    start = int(last.name.removesuffix(".undo"), 16)
    synced = SEGMENT_HEADER.size + max(published, start) - start
    size = last.stat().st_size
    assert size > synced
    cut = random.Random(hit).randrange(synced, size)
    with open(last, "r+b") as f:
        f.truncate(cut)
        f.seek(cut)
        f.write(os.urandom(random.Random(hit).randrange(0, 200)))  # a torn sector
    check_recovered(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "hit"),
    [
        (FaultPoint.RECOVERY_RESTORE, 2),
        (FaultPoint.RECOVERY_RESTORED, 1),
        (FaultPoint.JOURNAL_TRUNCATE, 1),
    ],
)
def test_crash_during_recovery(tmp_path: Path, point: FaultPoint, hit: int) -> None:
    assert in_child(tmp_path, run_stream, at_hit(FaultPoint.REPLICA_WRITE, 60)) == CRASHED
    # The second process crashes while rolling the first one's writes back.
    assert in_child(tmp_path, lambda s, r: None, at_hit(point, hit)) == CRASHED
    check_recovered(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "hit"),
    [
        (FaultPoint.CATALOGUE_COMMIT, 1),
        (FaultPoint.RECOVERY_RESTORE, 3),
        (FaultPoint.JOURNAL_TRUNCATE, 1),
    ],
)
def test_crash_during_failover_rollback(tmp_path: Path, point: FaultPoint, hit: int) -> None:
    tags = [op for op in OPS if isinstance(op, Tag)]
    target = tags[len(tags) // 2]
    apply_all = in_child(tmp_path, run_stream, lambda p: False)
    assert apply_all == FINISHED

    def failover(store: ReplicaStore, replica: DiskReplica) -> None:
        store.rollback("m", target.tag_id)

    # Everything was checkpointed, so the first commit is the rollback's own: crashing
    # there leaves the disk as it was; any later crash finishes the rollback on reopen.
    assert in_child(tmp_path, failover, at_hit(point, hit)) == CRASHED
    store = ReplicaStore(tmp_path / "state", tmp_path / "datastore", SMALL)
    try:
        replica = store.disk("d")
        expected = target.seq if point is not FaultPoint.CATALOGUE_COMMIT else len(OPS)
        assert replica.durable_seq == expected
        assert replica.flat.read_bytes() == image(SIZE, OPS, expected)
        later = [p.tag_id for p in store.points(disk_id="d") if p.seqs[0] > target.seq]
        assert (later == []) == (point is not FaultPoint.CATALOGUE_COMMIT)
        store.rollback("m", target.tag_id)  # finishing the failover works either way
        assert replica.flat.read_bytes() == image(SIZE, OPS, target.seq)
    finally:
        store.close()
