"""A full disk: StorageFull, a consistent disk, and a clean resume once space returns."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.storage.faults import FaultPoint, set_fault_hook
from appliance.target.errors import StorageFull
from appliance.target.replica import DiskReplica
from appliance.target.store import ReplicaStore, StoreSettings
from tests.loopfs import small_ext4
from tests.target.conftest import SMALL
from tests.target.model import Op, Tag, apply, flat_of, image, random_stream

SIZE = 256 << 10


def enospc_at(point: FaultPoint, hit: int, *, also: FaultPoint | None = None) -> None:
    """Fail the ``hit``-th ``point`` (and from then on every ``also``) with ENOSPC."""
    seen = 0
    full = False

    def hook(p: FaultPoint) -> None:
        nonlocal seen, full
        if p is point:
            seen += 1
            full = full or seen == hit
            if seen == hit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if full and p is also:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    set_fault_hook(hook)


def apply_until_full(replica: DiskReplica, ops: list[Op]) -> int:
    """Apply until StorageFull; returns the seq that failed."""
    for op in ops[replica.applied_seq :]:
        try:
            apply(replica, [op])
        except StorageFull:
            return op.seq
    replica.checkpoint()  # the failure may come with the last flush
    raise AssertionError("the disk never filled up")


def resume_and_check(store: ReplicaStore, replica: DiskReplica, ops: list[Op], out: Path) -> None:
    """Consistent now; resending from applied_seq + 1 completes the stream correctly."""
    assert replica.applied_seq == replica.durable_seq
    assert replica.flat.read_bytes() == image(SIZE, ops, replica.durable_seq)
    apply(replica, ops[replica.applied_seq :])
    replica.checkpoint()
    assert replica.flat.read_bytes() == image(SIZE, ops, len(ops))
    out.mkdir(exist_ok=True)
    for op in ops:
        if isinstance(op, Tag):
            path = store.materialize_disk(replica.disk_id, op.tag_id, out, op.tag_id)
            assert flat_of(path).read_bytes() == image(SIZE, ops, op.seq), op.tag_id


CASES = [
    (FaultPoint.JOURNAL_WRITE, 7, None),
    (FaultPoint.JOURNAL_ROLLOVER, 2, None),
    (FaultPoint.REPLICA_WRITE, 30, None),  # half a batch is in the replica already
    (FaultPoint.REPLICA_SYNCED, 3, None),  # fdatasync of the replica failed
    # ...and the rollback to the checkpoint cannot run until space returns:
    (FaultPoint.REPLICA_WRITE, 30, FaultPoint.RECOVERY_RESTORE),
]


@pytest.mark.parametrize(("point", "hit", "also"), CASES, ids=[f"{p}-{h}-{a}" for p, h, a in CASES])
def test_enospc_is_storage_full_and_consistent(
    store: ReplicaStore, tmp_path: Path, point: FaultPoint, hit: int, also: FaultPoint | None
) -> None:
    ops = random_stream(5, SIZE, 200, max_sectors=32, tag_every=15)
    replica = store.open_disk("d", "m", SIZE)
    enospc_at(point, hit, also=also)
    failed = apply_until_full(replica, ops)
    assert replica.applied_seq < failed
    if also is not None:
        with pytest.raises(StorageFull):  # still full: the disk refuses to go on
            replica.write(replica.applied_seq + 1, 0, b"x" * 512)
    set_fault_hook(None)  # space is back
    if also is not None:
        # The postponed rollback runs first thing on the next call (here: the one the
        # server makes after an apply error).
        assert replica.recover() == replica.durable_seq
    resume_and_check(store, replica, ops, tmp_path / "out")


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB ext4 filesystem on a loop device, mounted at tmp_path/mnt."""
    with small_ext4(tmp_path, 32) as mnt:
        yield mnt


@pytest.mark.root
@pytest.mark.slow
def test_a_real_full_filesystem(tiny_fs: Path, tmp_path: Path) -> None:
    size = 4 << 20
    ops = random_stream(6, size, 900, max_sectors=128, tag_every=25, zero_share=0.05)
    store = ReplicaStore(tiny_fs / "state", tiny_fs / "datastore", SMALL)
    try:
        replica = store.open_disk("d", "m", size)
        # Leave ~1.5 MiB free: the replica and its journal will run out of room.
        ballast = tiny_fs / "ballast"
        free = os.statvfs(tiny_fs).f_bavail * os.statvfs(tiny_fs).f_frsize
        with open(ballast, "wb") as f:
            f.write(b"\xff" * (free - (3 << 19)))
            os.fsync(f.fileno())
        failed = 0
        for op in ops:
            try:
                apply(replica, [op])
            except StorageFull:
                failed = op.seq
                break
        assert failed, "the filesystem never filled up"
        assert replica.applied_seq == replica.durable_seq
        assert replica.flat.read_bytes() == image(size, ops, replica.durable_seq)
        ballast.unlink()  # space returns
        apply(replica, ops[replica.applied_seq :])
        replica.checkpoint()
        assert replica.flat.read_bytes() == image(size, ops, len(ops))
        out = tmp_path / "out"
        out.mkdir()
        tags = [op for op in ops if isinstance(op, Tag)]
        for op in tags[:: max(1, len(tags) // 8)]:
            path = store.materialize_disk("d", op.tag_id, out, op.tag_id)
            assert flat_of(path).read_bytes() == image(size, ops, op.seq), op.tag_id
    finally:
        store.close()
    again = ReplicaStore(tiny_fs / "state", tiny_fs / "datastore", StoreSettings())
    try:
        assert again.disk("d").flat.read_bytes() == image(size, ops, len(ops))
    finally:
        again.close()
