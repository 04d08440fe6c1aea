"""The store across restarts: damaged disks kept aside, crash windows repaired."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.target.catalogue import Catalogue, DiskRow
from appliance.target.errors import JournalCorrupt, ReplicaMissing
from appliance.target.store import StoreSettings
from tests.target.conftest import StoreFactory
from tests.target.model import apply, image, random_stream


def test_settings_are_validated() -> None:
    for bad in (
        {"journal_level": 0}, {"journal_level": 23}, {"segment_bytes": 4096},
        {"batch_bytes": 1000}, {"batch_bytes": 0}, {"retention_seconds": 0},
        {"retention_bytes": -1},
    ):  # fmt: skip
        with pytest.raises(ValueError):
            StoreSettings(**bad)
    assert StoreSettings().segment_bytes == 64 << 20


def test_catalogue_row_without_files_is_repaired(tmp_path: Path, open_store: StoreFactory) -> None:
    """A crash between the catalogue insert and the file creation of a new disk."""
    (tmp_path / "state").mkdir()
    cat = Catalogue(tmp_path / "state" / "catalogue.db")
    cat.add_disk(DiskRow("d", "m", 1 << 20, "unused", 0, 0, 1))
    cat.close()
    store = open_store()
    replica = store.open_disk("d", "m", 1 << 20)
    replica.write(1, 0, b"x" * 512)
    assert replica.checkpoint() == 1


def test_a_damaged_disk_is_kept_aside(tmp_path: Path, open_store: StoreFactory) -> None:
    store = open_store()
    ops = random_stream(1, 64 << 10, 50)
    for disk_id in ("good", "bad"):
        apply(store.open_disk(disk_id, "m", 64 << 10), ops)
    store.close()
    journal = tmp_path / "state" / "journal" / "bad"
    for segment in journal.glob("*.undo"):
        segment.unlink()
    (journal / "0000000000000000.undo").write_bytes(b"not a segment")
    again = open_store()
    assert again.disk("good").flat.read_bytes() == image(64 << 10, ops, 50)
    with pytest.raises(JournalCorrupt):
        again.disk("bad")
    assert [d.disk_id for d in again.disks()] == ["good"]


def test_lost_replica_files_are_reported(tmp_path: Path, open_store: StoreFactory) -> None:
    store = open_store()
    apply(store.open_disk("d", "m", 64 << 10), random_stream(1, 64 << 10, 20))
    store.close()
    (tmp_path / "datastore" / "d" / "d-flat.vmdk").unlink()
    again = open_store()
    with pytest.raises(ReplicaMissing):
        again.disk("d")
