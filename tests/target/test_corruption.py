"""A damaged record in the middle of the journal: exactly the points that need it go."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.target.catalogue import Catalogue
from appliance.target.errors import PointUnusable
from appliance.target.journal import RECORD_HEADER, SEGMENT_HEADER, UndoRecord
from appliance.target.store import ReplicaStore
from tests.target.conftest import StoreFactory
from tests.target.model import Op, Tag, apply, flat_of, image, random_stream

SIZE = 256 << 10


def build(store: ReplicaStore) -> list[Op]:
    base = random_stream(7, SIZE, 40, max_sectors=64, tag_every=10**9, zero_share=0)
    ops = random_stream(8, SIZE, 300, max_sectors=32, tag_every=10, first_seq=41)
    apply(store.open_disk("d", "m", SIZE), base + ops)
    return base + ops


def damage_middle_record(store: ReplicaStore) -> UndoRecord:
    """Flip one byte in the stored data of a record in the middle of a middle segment."""
    journal = store.disk("d").journal
    bounds = journal.segment_bounds()
    seg_start, seg_end = bounds[len(bounds) // 2]
    victim = next(
        r for r in journal.read(seg_start, seg_end)
        if r.lsn > (seg_start + seg_end) // 2 and len(r.stored) > 64
    )  # fmt: skip
    path = journal.directory / f"{seg_start:016x}.undo"
    with open(path, "r+b") as f:
        f.seek(SEGMENT_HEADER.size + victim.lsn - seg_start + RECORD_HEADER.size + 33)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))
    return victim


def point_lsns(state: Path) -> dict[str, int]:
    catalogue = Catalogue(state / "catalogue.db")
    try:
        return {p.tag_id: p.lsn for p in catalogue.points(disk_id="d")}
    finally:
        catalogue.close()


def seq_of(ops: list[Op], tag: str) -> int:
    return next(op.seq for op in ops if isinstance(op, Tag) and op.tag_id == tag)


@pytest.mark.slow
def test_scrub_marks_exactly_the_points_that_need_the_record(
    store: ReplicaStore, tmp_path: Path
) -> None:
    ops = build(store)
    lsns = point_lsns(tmp_path / "state")
    assert store.scrub().damaged == ()
    victim = damage_middle_record(store)
    needing = {t for t, lsn in lsns.items() if lsn <= victim.lsn}
    assert needing and len(needing) < len(lsns)
    report = store.scrub()
    assert report.damaged == (("d", victim.lsn),)
    assert report.points_marked_unusable == len(needing)
    assert report.disks_checked == 1
    usable = {p.tag_id: p.usable for p in store.points(disk_id="d")}
    assert {t for t, ok in usable.items() if not ok} == needing
    assert all(p.usable == (p.tag_id not in needing) for p in store.points("m"))
    out = tmp_path / "out"
    out.mkdir()
    for tag in lsns:
        if tag in needing:
            with pytest.raises(PointUnusable):
                store.materialize_disk("d", tag, out, tag)
        else:
            path = store.materialize_disk("d", tag, out, tag)
            assert flat_of(path).read_bytes() == image(SIZE, ops, seq_of(ops, tag)), tag
    assert sorted(p.name for p in out.iterdir()) == sorted(
        n for t in set(lsns) - needing for n in (f"{t}.vmdk", f"{t}-flat.vmdk")
    )  # failed copies were removed
    assert store.scrub().points_marked_unusable == 0  # already marked


@pytest.mark.slow
def test_materialize_and_rollback_find_the_damage_themselves(
    store: ReplicaStore, tmp_path: Path
) -> None:
    ops = build(store)
    store.disk("d").checkpoint()
    lsns = point_lsns(tmp_path / "state")
    victim = damage_middle_record(store)
    needing = sorted((t for t, lsn in lsns.items() if lsn <= victim.lsn), key=lambda t: lsns[t])
    later = sorted((t for t, lsn in lsns.items() if lsn > victim.lsn), key=lambda t: lsns[t])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PointUnusable):  # found while copying: marks every point needing it
        store.materialize_disk("d", needing[-1], out, "x")
    assert list(out.iterdir()) == []
    assert {p.tag_id for p in store.points(disk_id="d") if not p.usable} == set(needing)
    replica = store.disk("d")
    before = replica.flat.read_bytes()
    with pytest.raises(PointUnusable):
        store.rollback("m", needing[0])
    assert replica.flat.read_bytes() == before  # refused before anything changed
    assert replica.durable_seq == len(ops)
    store.rollback("m", later[0])  # a point after the damage is fine
    assert replica.flat.read_bytes() == image(SIZE, ops, seq_of(ops, later[0]))


def test_rollback_verifies_before_it_changes_anything(
    open_store: StoreFactory, tmp_path: Path
) -> None:
    store = open_store()
    ops = build(store)
    store.disk("d").checkpoint()
    lsns = point_lsns(tmp_path / "state")
    victim = damage_middle_record(store)
    first = min((t for t, lsn in lsns.items() if lsn <= victim.lsn), key=lambda t: lsns[t])
    with pytest.raises(PointUnusable):
        store.rollback_disk("d", first)
    store.close()
    # Nothing changed on disk either: a reopen recovers to the same state.
    again = open_store().disk("d")
    assert again.durable_seq == len(ops)
    assert again.flat.read_bytes() == image(SIZE, ops, len(ops))
