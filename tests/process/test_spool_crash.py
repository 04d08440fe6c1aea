"""Crash recovery: a forked child spools a stream and dies with os._exit() (no cleanup,
like kill -9) at a chosen fault point; the parent reopens the spool and checks that
every acknowledged record is intact, the torn tail is gone, and the stream goes on.
A torn tail made by hand stands in for power loss (unsynced bytes lost or garbled).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.process import spoolio
from appliance.process.records import SEGMENT_MAGIC, SEGMENT_VERSION, SUFFIX, StreamMeta
from appliance.process.spool import Spool
from appliance.process.stream import SpoolStream
from appliance.storage.faults import FaultPoint, set_fault_hook
from appliance.storage.segments import SEGMENT_HEADER, create_segment
from tests import forked
from tests.forked import CRASHED, crash_where
from tests.process.conftest import (
    DISK,
    MACHINE,
    SIZE,
    SMALL,
    messages,
    read_all,
    scan_file,
    segment_files,
)

MSGS = messages(240, seed=21)
BATCHES = [random.Random(3).randrange(1, 14) for _ in range(60)]


def run_stream(spool: Spool, stream: SpoolStream, acked: Path) -> None:
    """Commit MSGS in BATCHES; after each commit note what the agent may be acked (and
    let the target ack half of it, releasing segments)."""
    seq = stream.appended_seq
    for size in BATCHES:
        for msg in MSGS[seq : seq + size]:
            stream.append(msg)
        seq = min(seq + size, len(MSGS))
        durable = stream.commit()
        acked.write_text(str(durable))
        stream.release(durable // 2)
        if seq == len(MSGS):
            return


def in_child(tmp_path: Path, crash: Callable[[FaultPoint], bool]) -> int:
    """Fork; in the child open the spool, install a hook that exits where ``crash``
    says, run the stream. Returns the child's exit code."""

    def body() -> None:
        crash_where(crash)
        spool = Spool(tmp_path / "spool", SMALL)
        run_stream(spool, spool.stream(DISK, MACHINE, SIZE), tmp_path / "acked")

    return forked.in_child(body)


def at_hit(point: FaultPoint | None, hit: int) -> Callable[[FaultPoint], bool]:
    """Crash at the ``hit``-th time ``point`` (any point if None) is reached."""
    seen = 0

    def crash(p: FaultPoint) -> bool:
        nonlocal seen
        if point is None or p is point:
            seen += 1
        return seen == hit

    return crash


def check_recovered(tmp_path: Path) -> int:
    """Reopen: acked records intact, no torn tail left, the stream completes."""
    acked_file = tmp_path / "acked"
    acked = int(acked_file.read_text()) if acked_file.exists() else 0
    spool = Spool(tmp_path / "spool", SMALL)
    try:
        stream = spool.get(DISK)
        durable = stream.durable_seq
        assert stream.appended_seq == durable >= acked
        assert stream.corrupt_at_seq is None
        base = stream.target_acked_seq
        assert read_all(stream, base) == MSGS[base:durable]
        # Every segment holds whole records only: the torn tail was cut.
        for path in segment_files(tmp_path / "spool" / DISK):
            assert path.stat().st_size == scan_file(path)[1], path.name
        for msg in MSGS[durable:]:
            assert stream.append(msg)
        assert stream.commit() == len(MSGS)
        assert read_all(stream, base) == MSGS[base:]
        return durable
    finally:
        spool.close()


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Write commits in 5000-byte pieces, so a crash between two tears a record."""
    monkeypatch.setattr(spoolio, "WRITE_CHUNK", 5000)


TARGETED = [
    (FaultPoint.SPOOL_WRITE, 1),  # before the first write ever
    (FaultPoint.SPOOL_WRITE, 9),
    (FaultPoint.SPOOL_WRITE, 40),
    (FaultPoint.SPOOL_WRITTEN, 1),  # written, not synced: kill -9 keeps the page cache
    (FaultPoint.SPOOL_WRITTEN, 17),
    (FaultPoint.SPOOL_ROLLOVER, 3),
    (FaultPoint.SPOOL_SYNCED, 1),  # durable, but the agent was never acked
    (FaultPoint.SPOOL_SYNCED, 23),
    (FaultPoint.SPOOL_RELEASE, 4),
]


@pytest.mark.slow
@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize(("point", "hit"), TARGETED, ids=[f"{p}-{h}" for p, h in TARGETED])
def test_crash_at_a_step(tmp_path: Path, point: FaultPoint, hit: int) -> None:
    assert in_child(tmp_path, at_hit(point, hit)) == CRASHED
    durable = check_recovered(tmp_path)
    acked = int((tmp_path / "acked").read_text()) if hit > 1 else 0
    if point in (FaultPoint.SPOOL_WRITTEN, FaultPoint.SPOOL_SYNCED):
        # The whole batch reached the page cache: it is all there after kill -9.
        assert durable == min(len(MSGS), sum(BATCHES[:hit]))
    if point is FaultPoint.SPOOL_WRITE and hit == 1:
        assert durable == acked == 0


@pytest.mark.slow
@pytest.mark.usefixtures("small_chunks")
def test_crash_mid_write_tears_a_record(tmp_path: Path) -> None:
    """A crash between two pieces of a commit leaves half a record: cut on open."""
    for hit in range(2, 40):
        case = tmp_path / f"hit{hit}"
        case.mkdir()
        assert in_child(case, at_hit(FaultPoint.SPOOL_WRITE, hit)) == CRASHED
        last = segment_files(case / "spool" / DISK)[-1]
        whole = scan_file(last)[1]
        if last.stat().st_size > whole:  # found a torn one
            check_recovered(case)  # checks the file was cut to exactly `whole`
            return
    raise AssertionError("no crash landed inside a record")


@pytest.mark.slow
@pytest.mark.usefixtures("small_chunks")
def test_crash_at_any_instant(tmp_path: Path) -> None:
    """Sweep: crash at the n-th fault point of any kind, n across the whole run."""
    counted = 0

    def count(_: FaultPoint) -> None:
        nonlocal counted
        counted += 1

    set_fault_hook(count)
    probe = tmp_path / "probe"
    probe.mkdir()
    spool = Spool(probe / "spool", SMALL)
    run_stream(spool, spool.stream(DISK, MACHINE, SIZE), probe / "acked")
    spool.close()
    set_fault_hook(None)
    assert counted > 100
    durables = set()
    for i, n in enumerate(random.Random(5).sample(range(1, counted), 10)):
        case = tmp_path / f"case{i}"
        case.mkdir()
        assert in_child(case, at_hit(None, n)) == CRASHED
        durables.add(check_recovered(case))
    assert len(durables) > 5  # the crashes really landed at different places


def test_crash_inside_a_rebase_is_finished_on_open(tmp_path: Path) -> None:
    """release() beyond everything held: new empty segment, meta.json, then the old
    segments go. A crash before they went is finished when the spool opens."""
    spool = Spool(tmp_path / "spool", SMALL)
    stream = spool.stream(DISK, MACHINE, SIZE)
    for msg in MSGS[:50]:
        stream.append(msg)
    stream.commit()
    spool.close()
    directory = tmp_path / "spool" / DISK
    old = segment_files(directory)
    assert len(old) > 2
    end = int(old[-1].name.removesuffix(".spool"), 16) + old[-1].stat().st_size
    create_segment(directory, end - SEGMENT_HEADER.size, magic=SEGMENT_MAGIC,
                   version=SEGMENT_VERSION, owner=DISK, suffix=SUFFIX)  # fmt: skip
    StreamMeta(DISK, MACHINE, SIZE, target_acked_seq=500).save(directory)
    spool = Spool(tmp_path / "spool", SMALL)
    try:
        stream = spool.get(DISK)
        assert (stream.appended_seq, stream.durable_seq, stream.target_acked_seq) == (500,) * 3
        assert [f.stat().st_size for f in segment_files(directory)] == [SEGMENT_HEADER.size]
        assert spool.total_bytes == SEGMENT_HEADER.size
        nxt = messages(1, start=501)[0]
        assert stream.append(nxt)
        stream.commit()
        assert read_all(stream) == [nxt]
    finally:
        spool.close()
