"""A full disk: StorageFull, segments cut back to their last good record, pending records
kept, and the same records committed once space returns. The spool's own limit is in
test_spool.py (test_spool_limit_is_back_pressure)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.process import spoolio
from appliance.process.errors import StorageFull
from appliance.process.spool import Spool
from appliance.storage.faults import FaultPoint, set_fault_hook
from appliance.wire.messages import Data
from tests.loopfs import small_ext4
from tests.process.conftest import (
    DISK,
    MACHINE,
    SIZE,
    SMALL,
    SpoolFactory,
    messages,
    read_all,
    scan_file,
    segment_files,
)

MSGS = messages(160, seed=41)


def enospc_at(point: FaultPoint, hit: int, *, sticky: bool) -> None:
    """Fail the ``hit``-th ``point`` with ENOSPC (and every later one if ``sticky``)."""
    seen = 0

    def hook(p: FaultPoint) -> None:
        nonlocal seen
        if p is point:
            seen += 1
            if seen == hit or (sticky and seen > hit):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    set_fault_hook(hook)


CASES = [
    (FaultPoint.SPOOL_WRITE, 1, False),  # the first write of the batch
    (FaultPoint.SPOOL_WRITE, 30, False),  # after rollovers, with half a record written
    (FaultPoint.SPOOL_ROLLOVER, 2, True),  # no room for the next segment, and still none
    (FaultPoint.SPOOL_WRITTEN, 1, False),  # the fdatasync failed
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_enospc_cuts_back_and_keeps_pending(
    open_spool: SpoolFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[FaultPoint, int, bool],
) -> None:
    point, hit, sticky = case
    monkeypatch.setattr(spoolio, "WRITE_CHUNK", 5000)
    spool = open_spool()
    stream = spool.stream(DISK, MACHINE, SIZE)
    for msg in MSGS[:60]:
        stream.append(msg)
    stream.commit()
    directory = tmp_path / "spool" / DISK
    before = {p.name: p.stat().st_size for p in segment_files(directory)}
    total = spool.total_bytes
    for msg in MSGS[60:]:
        stream.append(msg)
    enospc_at(point, hit, sticky=sticky)
    with pytest.raises(StorageFull):
        stream.commit()
    # What fitted (a prefix, found by halving the batch) is durable; the rest pends.
    durable = stream.durable_seq
    assert 60 <= durable < len(MSGS) and stream.appended_seq == len(MSGS)
    assert stream.read(60, 1 << 30) == MSGS[60:durable]
    for path in segment_files(directory):
        assert path.stat().st_size == scan_file(path)[1]  # cut back to whole records
    if durable == 60:
        assert {p.name: p.stat().st_size for p in segment_files(directory)} == before
        assert spool.total_bytes == total
    if sticky:
        with pytest.raises(StorageFull):  # still full: refused again, nothing lost
            stream.commit()
        assert durable <= stream.durable_seq < len(MSGS)  # a smaller prefix may still fit
    set_fault_hook(None)  # space is back
    assert stream.commit() == len(MSGS)
    assert read_all(stream) == MSGS
    for path in segment_files(directory):
        assert path.stat().st_size == scan_file(path)[1]
    spool.close()
    assert read_all(open_spool().get(DISK)) == MSGS


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB ext4 filesystem on a loop device, mounted at tmp_path/mnt."""
    with small_ext4(tmp_path, 8) as mnt:
        yield mnt


@pytest.mark.root
@pytest.mark.slow
def test_a_real_full_filesystem(tiny_fs: Path, tmp_path: Path) -> None:
    msgs = [Data.raw(DISK, seq, seq << 14, os.urandom(16 << 10)) for seq in range(1, 1000)]
    spool = Spool(tiny_fs, SMALL)  # the mount's root: lost+found is not a stream
    try:
        stream = spool.stream(DISK, MACHINE, SIZE)
        durable = 0
        for msg in msgs:
            stream.append(msg)
            if msg.seq % 8:
                continue
            try:
                durable = stream.commit()
            except StorageFull:
                break
        else:
            raise AssertionError("the filesystem never filled up")
        # The last commit made durable what fitted of its 8 records, no more.
        assert durable <= stream.durable_seq < durable + 8
        durable = stream.durable_seq
        assert durable > 100
        assert read_all(stream) == msgs[:durable]  # every CRC checks out
        for path in segment_files(tiny_fs / DISK):  # whole records only, no garbage
            assert path.stat().st_size == scan_file(path)[1]
        copy = tmp_path / "copy"  # what a restart would find, opened beside this spool
        shutil.copytree(tiny_fs / DISK, copy / DISK)
        reopened = Spool(copy, SMALL)
        try:
            again = reopened.get(DISK)
            assert (again.durable_seq, again.corrupt_at_seq) == (durable, None)
            assert read_all(again) == msgs[:durable]
        finally:
            reopened.close()
        # The master target catches up: segments go, the kept records commit.
        assert stream.release(durable // 2) > 0
        end = stream.appended_seq
        assert stream.commit() == end
        assert read_all(stream, durable // 2) == msgs[durable // 2 : end]
    finally:
        spool.close()
    spool = Spool(tiny_fs, SMALL)
    try:
        assert spool.get(DISK).durable_seq == end
    finally:
        spool.close()
