"""The SQLite catalogue: schema migrations, WAL, one connection per thread."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from appliance.target.catalogue import MIGRATIONS, Catalogue, DiskRow, PointRow
from appliance.target.errors import AlreadyExists, TargetError


def disk(disk_id: str = "d", machine: str = "m") -> DiskRow:
    return DiskRow(disk_id, machine, 1 << 20, f"/ds/{disk_id}/{disk_id}.vmdk", 0, 0, 1)


def test_fresh_database_is_migrated_and_in_wal_mode(tmp_path: Path) -> None:
    cat = Catalogue(tmp_path / "catalogue.db")
    try:
        raw = sqlite3.connect(tmp_path / "catalogue.db")
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"disks", "points", "schema_version"} <= tables
        raw.close()
    finally:
        cat.close()
    # Reopening does not migrate again.
    Catalogue(tmp_path / "catalogue.db").close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    Catalogue(tmp_path / "catalogue.db").close()
    raw = sqlite3.connect(tmp_path / "catalogue.db")
    raw.execute("UPDATE schema_version SET version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(TargetError, match="newer than this software"):
        Catalogue(tmp_path / "catalogue.db")


def test_points_checkpoints_and_rollback(tmp_path: Path) -> None:
    cat = Catalogue(tmp_path / "catalogue.db")
    try:
        cat.add_disk(disk())
        with pytest.raises(AlreadyExists):
            cat.add_disk(disk())
        for seq in (1, 5, 9):
            point = PointRow("d", f"t{seq}", seq, seq * 100, seq * 10, "crash", True)
            assert cat.add_point(point, seq, seq * 100)
        assert not cat.add_point(PointRow("d", "t5", 10, 1000, 1, "app", True), 10, 1000)
        row = cat.disk("d")
        assert row is not None and (row.durable_seq, row.checkpoint_lsn) == (10, 1000)
        assert [p.tag_id for p in cat.points(disk_id="d")] == ["t1", "t5", "t9"]
        assert cat.mark_unusable("d", 500) == 2
        assert [p.usable for p in cat.points(machine_id="m")] == [False, False, True]
        assert cat.rollback_to("d", 5, 500) == 1
        row = cat.disk("d")
        assert row is not None and (row.durable_seq, row.checkpoint_lsn) == (5, 500)
        assert cat.delete_points_before("d", 200) == 1
        assert cat.delete_points_older("d", 51) == 1
        assert cat.points() == []
        with pytest.raises(sqlite3.IntegrityError):  # kinds are a closed set
            cat.add_point(PointRow("d", "x", 11, 1, 1, "weird", True), 11, 1)
    finally:
        cat.close()


def test_each_thread_has_its_own_connection(tmp_path: Path) -> None:
    cat = Catalogue(tmp_path / "catalogue.db")
    cat.add_disk(disk())
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(20):
                seq = n * 100 + i
                cat.add_point(PointRow("d", f"t{seq}", seq, seq, seq, "crash", True), seq, seq)
        except (sqlite3.Error, TargetError) as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cat.points(disk_id="d")) == 80
    assert len(cat._conns) == 5  # the main thread's and one per worker
    cat.close()
