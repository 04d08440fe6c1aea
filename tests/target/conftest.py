"""Fixtures for the storage-engine tests: small settings, a store in tmp_path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.storage.faults import set_fault_hook
from appliance.target.store import ReplicaStore, StoreSettings

# Small batches and segments so a few hundred KiB of writes exercise many flushes and
# segment rollovers.
SMALL = StoreSettings(batch_bytes=16 << 10, segment_bytes=64 << 10)

StoreFactory = Callable[..., ReplicaStore]


@pytest.fixture(autouse=True)
def _no_fault_hook() -> Iterator[None]:
    yield
    set_fault_hook(None)


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[StoreFactory]:
    """Open (or reopen) the store of this test; every store is closed at teardown."""
    opened: list[ReplicaStore] = []

    def factory(settings: StoreSettings = SMALL) -> ReplicaStore:
        store = ReplicaStore(tmp_path / "state", tmp_path / "datastore", settings)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()  # closing twice is harmless


@pytest.fixture
def store(open_store: StoreFactory) -> ReplicaStore:
    return open_store()
