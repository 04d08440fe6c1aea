"""Retention by journal size and by age; what must never be dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.storage.faults import FaultPoint, set_fault_hook
from appliance.target.catalogue import Catalogue
from appliance.target.errors import UnknownPoint
from appliance.target.journal import SEGMENT_HEADER
from appliance.target.retention import prune_disk
from appliance.target.store import ReplicaStore, StoreSettings
from tests.target.conftest import StoreFactory
from tests.target.model import Op, Tag, apply, flat_of, image, random_stream

SIZE = 256 << 10
KIB = 1 << 10


def settings(**kw: int) -> StoreSettings:
    return StoreSettings(batch_bytes=16 * KIB, segment_bytes=64 * KIB, **kw)


def history(store: ReplicaStore) -> list[Op]:
    """Fill the disk with data (so undo records are full size), then overwrite it with
    tags every ~12 ops; returns every op applied."""
    base = random_stream(1, SIZE, 40, max_sectors=64, tag_every=10**9, zero_share=0)
    ops = random_stream(2, SIZE, 500, max_sectors=32, tag_every=12, first_seq=41)
    replica = store.open_disk("d", "m", SIZE)
    apply(replica, base + ops)
    replica.checkpoint()
    assert len(replica.journal.segment_bounds()) > 8
    return base + ops


def point_lsns(state: Path) -> dict[str, int]:
    catalogue = Catalogue(state / "catalogue.db")
    try:
        return {p.tag_id: p.lsn for p in catalogue.points(disk_id="d")}
    finally:
        catalogue.close()


def check_remaining(store: ReplicaStore, ops: list[Op], out: Path) -> list[str]:
    out.mkdir(exist_ok=True)
    remaining = [p.tag_id for p in store.points(disk_id="d")]
    for tag in remaining:
        seq = next(op.seq for op in ops if isinstance(op, Tag) and op.tag_id == tag)
        path = store.materialize_disk("d", tag, out, tag)
        assert flat_of(path).read_bytes() == image(SIZE, ops, seq), tag
    return remaining


@pytest.mark.slow
def test_prune_by_size(open_store: StoreFactory, tmp_path: Path) -> None:
    budget = 200 * KIB
    store = open_store(settings(retention_bytes=budget))
    ops = history(store)
    journal = store.disk("d").journal
    bounds = journal.segment_bounds()
    lsns = point_lsns(tmp_path / "state")
    # The oldest segments go until the journal fits (the active one always stays).
    total, keep_from = journal.total_bytes, bounds[0][0]
    for start, end in bounds[:-1]:
        if total <= budget:
            break
        total -= SEGMENT_HEADER.size + end - start
        keep_from = end
    report = store.prune(now_ns=0)  # nothing is old by age
    assert journal.start_lsn == keep_from
    assert journal.total_bytes == total <= budget
    gone = {tag for tag, lsn in lsns.items() if lsn < keep_from}
    assert gone and len(gone) < len(lsns)
    assert report.points_removed == len(gone)
    assert report.bytes_freed > 0 and report.segments_removed > 0
    remaining = check_remaining(store, ops, tmp_path / "out")
    assert set(remaining) == set(lsns) - gone
    with pytest.raises(UnknownPoint):
        store.materialize_disk("d", sorted(gone)[0], tmp_path / "out", "gone")
    assert store.prune(now_ns=0).bytes_freed == 0  # idempotent


@pytest.mark.slow
def test_prune_by_age(open_store: StoreFactory, tmp_path: Path) -> None:
    store = open_store(settings(retention_seconds=1))
    ops = history(store)
    tags = [op for op in ops if isinstance(op, Tag)]
    keep = tags[len(tags) // 2]
    lsns = point_lsns(tmp_path / "state")
    # Points younger than one second before "now" stay: "now" is one second after keep.
    report = store.prune(now_ns=keep.time_ns + 1_000_000_000)
    journal = store.disk("d").journal
    assert report.points_removed == tags.index(keep)
    assert [p.tag_id for p in store.points(disk_id="d")] == [
        t.tag_id for t in tags[tags.index(keep) :]
    ]
    # Whole segments before the oldest remaining point went; the one holding it stayed.
    assert journal.start_lsn <= lsns[keep.tag_id]
    assert all(end > lsns[keep.tag_id] for _, end in journal.segment_bounds())
    assert report.bytes_freed > 0
    check_remaining(store, ops, tmp_path / "out")


def test_records_after_the_checkpoint_are_never_dropped(
    store: ReplicaStore, tmp_path: Path
) -> None:
    ops = random_stream(4, SIZE, 300, max_sectors=64, tag_every=10**9, zero_share=0)
    replica = store.open_disk("d", "m", SIZE)
    apply(replica, ops[:100])
    replica.checkpoint()
    apply(replica, ops[100:])  # flushed batch by batch, not checkpointed
    assert replica.journal.end_lsn > replica.checkpoint_lsn
    assert len(replica.journal.segment_bounds()) > 3
    catalogue = Catalogue(tmp_path / "state" / "catalogue.db")
    try:
        # Everything is too old and the budget is one byte: only the checkpoint holds.
        prune_disk(replica, catalogue, now_ns=10**18, retention_seconds=1, retention_bytes=1)
    finally:
        catalogue.close()
    assert replica.journal.start_lsn <= replica.checkpoint_lsn
    assert replica.journal.start_lsn > 0
    assert replica.recover() == 100  # crash recovery still has every record it needs
    assert replica.flat.read_bytes() == image(SIZE, ops, 100)


def test_pinned_records_stay_and_an_interrupted_prune_completes(
    open_store: StoreFactory, tmp_path: Path
) -> None:
    store = open_store(settings(retention_bytes=1))
    ops = history(store)
    journal = store.disk("d").journal
    lsns = point_lsns(tmp_path / "state")
    oldest = min(lsns, key=lambda t: lsns[t])
    token = journal.pin(lsns[oldest])  # a materialisation of the oldest point is running
    store.prune(now_ns=0)
    assert journal.start_lsn <= lsns[oldest]
    assert oldest in [p.tag_id for p in store.points(disk_id="d")]
    journal.unpin(token)

    def interrupt(point: FaultPoint) -> None:
        if point is FaultPoint.RETENTION_DROP:
            raise KeyboardInterrupt

    set_fault_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        store.prune(now_ns=0)
    set_fault_hook(None)
    # The points went first; their segments are still there and go next time.
    assert len(journal.segment_bounds()) > 1
    store.prune(now_ns=0)
    assert len(journal.segment_bounds()) == 1
    check_remaining(store, ops, tmp_path / "out")
