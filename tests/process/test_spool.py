"""The spool's contract without faults: round trips, sequence rules, release, figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance.process.errors import (
    InvalidAck,
    InvalidName,
    InvalidSettings,
    InvalidSize,
    ProcessError,
    SequenceGap,
    SpoolFull,
    StreamClosed,
    StreamMismatch,
    UnknownStream,
)
from appliance.process.records import READ_RECORDS
from appliance.process.spool import SpoolSettings, validate_name
from appliance.storage.segments import SEGMENT_HEADER
from appliance.target.errors import InvalidName as TargetInvalidName
from appliance.target.vmdk import validate_name as target_validate_name
from appliance.wire.messages import (
    MAX_EXTENTS_PER_MESSAGE,
    Data,
    Encoding,
    Extent,
    Extents,
    Tag,
    TagKind,
)
from tests.process.conftest import (
    DISK,
    MACHINE,
    SIZE,
    SpoolFactory,
    messages,
    payload,
    read_all,
    segment_files,
    segment_seqs,
)

MSGS = messages(300, seed=7)


def fill(open_spool: SpoolFactory, msgs: list = MSGS, every: int = 23):  # type: ignore[no-untyped-def]
    spool = open_spool()
    stream = spool.stream(DISK, MACHINE, SIZE)
    for i, msg in enumerate(msgs, 1):
        assert stream.append(msg)
        if i % every == 0:
            stream.commit()
    assert stream.commit() == msgs[-1].seq
    return spool, stream


def test_roundtrip_across_segments(open_spool: SpoolFactory, tmp_path: Path) -> None:
    spool, stream = fill(open_spool)
    encodings = {Encoding.RAW, Encoding.ZSTD, Encoding.ZERO}
    assert {m.encoding for m in MSGS if isinstance(m, Data)} == encodings
    assert any(isinstance(m, Tag) for m in MSGS)
    files = segment_files(tmp_path / "spool" / DISK)
    assert len(files) > 5, "the stream should span many segments"
    assert [s for f in files for s in segment_seqs(f)] == list(range(1, 301))
    assert read_all(stream) == MSGS
    assert stream.read(0, 1 << 30) == MSGS
    assert spool.total_bytes == stream.disk_bytes == sum(f.stat().st_size for f in files)
    spool.close()
    again = open_spool().get(DISK)
    assert (again.appended_seq, again.durable_seq, again.corrupt_at_seq) == (300, 300, None)
    assert read_all(again) == MSGS


def test_read_boundaries(open_spool: SpoolFactory) -> None:
    _, stream = fill(open_spool)
    assert stream.read(300, 1 << 20) == []
    assert stream.read(10**9, 1 << 20) == []
    for after in (0, 1, 8, 9, 150, 299):
        assert stream.read(after, 1 << 20)[0] == MSGS[after]
    # max_bytes counts payload: never exceeded unless one record alone does.
    for after in range(0, 300, 13):
        batch = stream.read(after, 20_000)
        size = payload(batch)
        assert size <= 20_000 or len(batch) == 1
        if after + len(batch) < 300:
            assert size + payload([MSGS[after + len(batch)]]) > 20_000
    assert [len(stream.read(a, 0)) for a in range(0, 300, 50)] == [1] * 6
    # Appended but not committed: not readable, not durable.
    extra = messages(3, seed=8, start=301)
    for msg in extra:
        stream.append(msg)
    assert (stream.appended_seq, stream.durable_seq) == (303, 300)
    assert stream.read(300, 1 << 20) == []
    stream.commit()
    assert stream.read(300, 1 << 20) == extra


def test_reads_of_records_without_payload_are_bounded(open_spool: SpoolFactory) -> None:
    """Payload bytes alone would not bound a read of records that carry none: tags, and
    all-ZERO EXTENTS whose tables alone reach ~213 KB. A read also stops at
    READ_RECORDS records and at max_bytes of whole records, from memory as from disk."""
    tables = [
        Extents.of(DISK, seq, [Extent(i * 8192, 4096, Encoding.ZERO)
                               for i in range(MAX_EXTENTS_PER_MESSAGE)], b"")
        for seq in range(1, 21)
    ]  # fmt: skip
    tags = [
        Tag(DISK, seq, f"t{seq}", TagKind.CRASH, seq) for seq in range(21, 21 + 3 * READ_RECORDS)
    ]
    spool, stream = fill(open_spool, [*tables, *tags], every=1000)
    for source in ("memory", "disk"):
        if source == "disk":
            spool.close()
            stream = open_spool().get(DISK)
        first = stream.read(0, 1 << 20)  # 1 MiB: four tables of ~213 KB, not all twenty
        assert 1 <= len(first) <= 5 and first == tables[: len(first)], source
        assert len(stream.read(0, 0)) == 1  # a record larger than the budget still goes
        batch = stream.read(20, 1 << 30)
        assert batch == tags[:READ_RECORDS], source
        assert read_all(stream) == [*tables, *tags], source


def test_release_deletes_exactly_the_acked_segments(
    open_spool: SpoolFactory, tmp_path: Path
) -> None:
    spool, stream = fill(open_spool)
    directory = tmp_path / "spool" / DISK
    ranges = {f: segment_seqs(f) for f in segment_files(directory)}
    last = max(ranges)
    assert stream.backlog_bytes == payload(MSGS)
    assert stream.backlog_records == 300
    before = spool.total_bytes
    for acked in (0, 40, 41, 170, 171, 171, 250):
        freed = stream.release(acked)
        assert stream.target_acked_seq == max(acked, 0)
        expected = {f for f, seqs in ranges.items() if seqs[-1] > acked or f == last}
        assert set(segment_files(directory)) == expected, acked
        assert spool.total_bytes == sum(f.stat().st_size for f in expected)
        assert before - spool.total_bytes == freed
        before = spool.total_bytes
        assert stream.backlog_bytes == payload(MSGS[acked:])
        assert stream.backlog_records == 300 - acked
        assert read_all(stream, acked) == MSGS[acked:]
    spool.close()
    spool = open_spool()
    stream = spool.get(DISK)
    assert (stream.durable_seq, stream.appended_seq) == (300, 300)
    assert stream.target_acked_seq >= min(seqs[0] for seqs in ranges.values() if seqs[-1] > 250) - 1
    assert read_all(stream, 250) == MSGS[250:]
    assert spool.total_bytes == sum(f.stat().st_size for f in segment_files(directory))
    # Everything acked: the active segment stays until reclaimed (or the spool is
    # full); the sequence survives a reopen without any record left to carry it.
    assert stream.release(300) > 0
    (active,) = segment_files(directory)
    size = active.stat().st_size
    assert len(segment_seqs(active)) > 0
    assert spool.reclaim() == size - SEGMENT_HEADER.size
    assert [f.stat().st_size for f in segment_files(directory)] == [SEGMENT_HEADER.size]
    assert (stream.backlog_bytes, stream.backlog_records, stream.oldest_unforwarded_ns) == (
        0, 0, None,
    )  # fmt: skip
    spool.close()
    stream = open_spool().get(DISK)
    assert (stream.appended_seq, stream.durable_seq, stream.target_acked_seq) == (300, 300, 300)
    assert read_all(stream) == []
    nxt = messages(2, seed=9, start=301)
    assert stream.append(nxt[0])
    with pytest.raises(SequenceGap):
        stream.append(messages(1, start=303)[0])
    stream.commit()
    assert read_all(stream, 300) == nxt[:1]


def test_sequence_rules(open_spool: SpoolFactory) -> None:
    stream = open_spool().stream(DISK, MACHINE, SIZE)
    msgs = messages(6, seed=3)
    for msg in msgs[:5]:
        assert stream.append(msg) is True
    backlog = (stream.backlog_bytes, stream.backlog_records)
    assert stream.append(msgs[2]) is False  # a resend: ignored
    with pytest.raises(SequenceGap) as gap:
        stream.append(messages(1, start=7)[0])
    assert (gap.value.expected, gap.value.got) == (6, 7)
    assert (stream.appended_seq, stream.durable_seq) == (5, 0)
    assert (stream.backlog_bytes, stream.backlog_records) == backlog
    assert stream.commit() == 5
    assert stream.append(msgs[0]) is False
    assert stream.append(msgs[5]) is True
    stream.commit()
    assert read_all(stream) == msgs
    with pytest.raises(StreamMismatch):
        stream.append(messages(1, start=7, disk_id="other")[0])


def test_figures_follow_receive_times(open_spool: SpoolFactory) -> None:
    stream = open_spool().stream(DISK, MACHINE, SIZE)
    assert stream.oldest_unforwarded_ns is None
    msgs = messages(40, seed=4)
    for msg in msgs[:30]:
        stream.append(msg, received_ns=1000 + msg.seq)
    assert stream.oldest_unforwarded_ns == 1001  # pending records count: received already
    assert stream.backlog_bytes == payload(msgs[:30])
    stream.commit()
    for msg in msgs[30:]:
        stream.append(msg, received_ns=1000 + msg.seq)
    assert stream.backlog_bytes == payload(msgs)
    assert stream.backlog_records == 40
    stream.release(12)
    assert stream.oldest_unforwarded_ns == 1013
    assert stream.backlog_bytes == payload(msgs[12:])
    stream.release(30)
    assert stream.oldest_unforwarded_ns == 1031  # the first record still pending
    stream.commit()
    stream.release(40)
    assert stream.oldest_unforwarded_ns is None
    assert (stream.backlog_bytes, stream.backlog_records) == (0, 0)


def test_stream_metadata_and_names(open_spool: SpoolFactory, tmp_path: Path) -> None:
    spool = open_spool()
    stream = spool.stream(DISK, MACHINE, SIZE)
    assert spool.stream(DISK, MACHINE, SIZE) is stream
    assert spool.get(DISK) is stream
    with pytest.raises(StreamMismatch):
        spool.stream(DISK, "machine-1", SIZE)
    with pytest.raises(ValueError, match="bytes"):
        spool.stream(DISK, MACHINE, SIZE * 2)
    with pytest.raises(InvalidSize):
        spool.stream("disk-1", MACHINE, 1000)
    with pytest.raises(UnknownStream):
        spool.get("disk-9")
    meta = json.loads((tmp_path / "spool" / DISK / "meta.json").read_text())
    assert meta == {
        "version": 1, "disk_id": DISK, "machine_id": MACHINE, "size": SIZE,
        "target_acked_seq": 0,
    }  # fmt: skip
    spool.stream("disk-1", MACHINE, 4096)
    spool.close()
    (tmp_path / "spool" / "lost+found").mkdir()  # the root of a dedicated filesystem
    (tmp_path / "spool" / "stray-file").write_text("x")
    (tmp_path / "spool" / "half-made").mkdir()  # a creation that crashed before its meta
    again = open_spool()
    assert sorted(s.disk_id for s in again.streams()) == ["disk-0", "disk-1"]
    assert not (tmp_path / "spool" / "half-made").exists()
    assert again.get("disk-1").size == 4096


NAMES = ["a", "disk-0", "A.b_c-d", "x" * 64, "", ".x", "-x", "a..b", "a/b", "x" * 65,
         "é", "a b", "..", "sda1"]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_names_follow_the_target_rule(open_spool: SpoolFactory, name: str) -> None:
    spool = open_spool()
    try:
        target_validate_name(name)
        target_ok = True
    except TargetInvalidName:
        target_ok = False
    try:
        validate_name(name)
        spool.stream(name, MACHINE, SIZE)
        ok = True
    except InvalidName as exc:
        assert isinstance(exc, ValueError) and isinstance(exc, ProcessError)
        ok = False
    assert ok == target_ok


def test_spool_limit_is_back_pressure(open_spool: SpoolFactory) -> None:
    settings = SpoolSettings(segment_bytes=64 << 10, limit_bytes=256 << 10)
    spool = open_spool(settings)
    stream = spool.stream(DISK, MACHINE, SIZE)
    msgs = messages(400, seed=5)
    refused = None
    for msg in msgs:
        try:
            stream.append(msg)
        except SpoolFull:
            refused = msg.seq
            break
        if msg.seq % 10 == 0:
            stream.commit()
    assert refused is not None, "the limit was never reached"
    assert stream.appended_seq == refused - 1  # nothing appended by the refused call
    stream.commit()
    assert spool.total_bytes <= settings.limit_bytes
    with pytest.raises(SpoolFull):
        stream.append(msgs[refused - 1])
    # The target catches up: whole segments go and the agent may go on.
    assert stream.release(stream.durable_seq) > 0
    assert not spool.full()
    assert stream.append(msgs[refused - 1])
    stream.commit()
    assert read_all(stream, refused - 1) == [msgs[refused - 1]]


def test_base_moves_to_what_the_target_has(open_spool: SpoolFactory) -> None:
    spool = open_spool()
    stream = spool.stream(DISK, MACHINE, SIZE)
    # A new spool for a disk the target already holds up to 1000.
    assert stream.release(1000) == 0
    assert (stream.appended_seq, stream.durable_seq, stream.target_acked_seq) == (1000,) * 3
    first = messages(5, seed=6, start=1001)
    assert stream.append(first[0])
    with pytest.raises(InvalidAck):  # records pending: the base cannot jump under them
        stream.release(5000)
    stream.commit()
    # With records on disk that the target now has too.
    for msg in first[1:]:
        stream.append(msg)
    stream.commit()
    stream.release(2000)
    assert (stream.appended_seq, stream.durable_seq) == (2000, 2000)
    assert read_all(stream, 0) == []
    spool.close()
    stream = open_spool().get(DISK)
    assert (stream.appended_seq, stream.target_acked_seq) == (2000, 2000)
    assert stream.append(messages(1, start=2001)[0])


def test_settings_are_validated() -> None:
    assert SpoolSettings().segment_bytes == 16 << 20
    bad_settings = [
        {"segment_bytes": 1024},
        {"segment_bytes": 2 << 30},
        {"limit_bytes": 32 << 20},  # fewer than four default segments
        {"segment_bytes": True},
        {"limit_bytes": 1.5},
        {"recent_bytes": -1},
        {"recent_bytes": 1.5},
    ]
    for bad in bad_settings:
        with pytest.raises(InvalidSettings):
            SpoolSettings(**bad)  # type: ignore[arg-type]


def test_remove_reclaim_and_close(open_spool: SpoolFactory, tmp_path: Path) -> None:
    spool, stream = fill(open_spool, messages(60, seed=2), every=7)
    assert stream.commit() == 60  # nothing pending: no I/O, same answer
    other = spool.stream("disk-1", MACHINE, SIZE)
    for seq in range(1, 6):
        other.append(Tag("disk-1", seq, f"t{seq}", TagKind.CRASH, seq))
    other.commit()
    other.release(5)  # a small active segment stays...
    kept = other.disk_bytes
    assert kept > SEGMENT_HEADER.size
    assert spool.reclaim() == kept - SEGMENT_HEADER.size  # ...until reclaimed
    total = spool.total_bytes
    assert spool.remove(DISK) == total - other.disk_bytes
    assert not (tmp_path / "spool" / DISK).exists()
    assert spool.total_bytes == other.disk_bytes
    with pytest.raises(StreamClosed):
        stream.commit()
    with pytest.raises(UnknownStream):
        spool.remove(DISK)
    other.append(Tag("disk-1", 6, "t6", TagKind.CRASH, 6))
    spool.close()
    with pytest.raises(StreamClosed):
        other.read(0, 1)
    assert os.listdir(tmp_path / "spool") == ["disk-1"]
