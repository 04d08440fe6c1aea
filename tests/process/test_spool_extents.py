"""EXTENTS records in the spool: one record per message (kind 17, the wire body), read
back the same from memory and from disk, a torn one cut at its CRC after kill -9 and
accepted again when resent, a damaged one reported, never dropped."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from appliance.process import spoolio
from appliance.process.errors import SpoolCorrupt
from appliance.process.records import (
    RECORD_HEADER,
    PendingRecord,
    RecordKind,
    decode_body,
    parse_header,
)
from appliance.process.spool import Spool
from appliance.storage.faults import FaultPoint
from appliance.wire.messages import Encoding, Extents, Tag
from tests.forked import CRASHED, crash_where, in_child
from tests.process.conftest import (
    DISK,
    MACHINE,
    SIZE,
    SMALL,
    SpoolFactory,
    extents_message,
    messages,
    read_all,
    records_in,
    segment_files,
)


def body(msg: Extents) -> bytes:
    return b"".join(bytes(p) for p in msg.encode())


def big_extents(seq: int, count: int = 1536) -> Extents:
    """Up to 4 KiB extents, ~2 MiB of them RAW."""
    return extents_message(random.Random(seq), DISK, seq, count=count)


def test_one_record_per_message_with_the_wire_body(
    open_spool: SpoolFactory, tmp_path: Path
) -> None:
    rnd = random.Random(5)
    msgs = [extents_message(rnd, DISK, seq, compressed=seq % 2 == 0) for seq in range(1, 7)]
    assert {m.encoding for m in msgs} == {Encoding.RAW, Encoding.ZSTD}
    keep = dataclasses.replace(SMALL, recent_bytes=1 << 20)
    stream = open_spool(keep).stream(DISK, MACHINE, SIZE)
    for msg in msgs:
        assert stream.append(msg)
    stream.commit()
    assert stream.backlog_bytes == sum(m.wire_size for m in msgs)
    assert stream.backlog_records == 6
    found = [(f, *r) for f in segment_files(tmp_path / "spool" / DISK) for r in records_in(f)]
    assert [seq for _, seq, _, _ in found] == [1, 2, 3, 4, 5, 6]
    for path, seq, offset, size in found:
        msg = msgs[seq - 1]
        raw = path.read_bytes()[offset : offset + size]
        header = parse_header(raw[: RECORD_HEADER.size], header_pos(path, offset))
        assert header is not None and header.kind is RecordKind.EXTENTS == 17
        assert header.payload_len == msg.wire_size
        assert raw[RECORD_HEADER.size :] == body(msg)
    assert read_all(stream) == msgs  # from memory (the first read)
    assert read_all(stream) == msgs  # from the segments


def header_pos(path: Path, offset: int) -> int:
    from appliance.storage.segments import SEGMENT_HEADER

    return int(path.stem, 16) + offset - SEGMENT_HEADER.size


def test_a_record_that_decodes_wrong_is_corruption() -> None:
    msg = extents_message(random.Random(1), DISK, 3, count=4)
    header = parse_header(PendingRecord.of(msg, 1).header(0), 0)
    assert header is not None
    assert decode_body(header, body(msg), DISK) == msg
    bad = bytearray(body(msg))
    bad[-1 - msg.wire_size] ^= 0xFF  # the last extent's kind: not RAW, ZERO or SAME
    with pytest.raises(SpoolCorrupt, match="undecodable"):
        decode_body(header, bad, DISK)
    with pytest.raises(SpoolCorrupt, match="holds"):
        decode_body(header, body(extents_message(random.Random(1), "other", 3)), DISK)


def crash_in_child(tmp_path: Path, before: list, torn: Extents) -> int:  # type: ignore[type-arg]
    """Fork: commit ``before`` (noting the acked seq), then append ``torn`` and die
    (like kill -9) after the first piece of its commit reached the file."""

    def body() -> None:
        spool = Spool(tmp_path / "spool", SMALL)
        stream = spool.stream(DISK, MACHINE, SIZE)
        for msg in before:
            stream.append(msg)
        (tmp_path / "acked").write_text(str(stream.commit()))
        writes = 0

        def second_write(point: FaultPoint) -> bool:
            nonlocal writes
            writes += point is FaultPoint.SPOOL_WRITE
            return writes == 2

        crash_where(second_write)
        stream.append(torn)
        stream.commit()

    return in_child(body)


def test_kill9_mid_extents_record_cuts_it_and_takes_the_resend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spoolio, "WRITE_CHUNK", 64 << 10)  # (the child inherits it)
    before = messages(20, seed=8)
    torn = big_extents(21)
    assert torn.wire_size > 2 * spoolio.WRITE_CHUNK  # the crash lands inside it
    assert crash_in_child(tmp_path, before, torn) == CRASHED
    acked = int((tmp_path / "acked").read_text())
    last = segment_files(tmp_path / "spool" / DISK)[-1]
    torn_size = last.stat().st_size
    spool = Spool(tmp_path / "spool", SMALL)
    try:
        stream = spool.get(DISK)
        assert acked == 20 and stream.durable_seq == stream.appended_seq == 20
        assert stream.corrupt_at_seq is None
        assert last.stat().st_size < torn_size  # cut at the last intact record
        assert read_all(stream) == before
        assert stream.append(torn)  # the agent's resend is taken
        assert stream.commit() == 21
        again = read_all(stream, 20)
        assert again == [torn]
        assert [bytes(d) for _, d in again[0].pieces() if d is not None] == [
            bytes(d) for _, d in torn.pieces() if d is not None
        ]
    finally:
        spool.close()
    reopened = Spool(tmp_path / "spool", SMALL)
    try:
        assert read_all(reopened.get(DISK)) == [*before, torn]
    finally:
        reopened.close()


def test_damaged_extents_record_before_intact_ones_is_reported(tmp_path: Path) -> None:
    msgs = [*messages(4, seed=9), big_extents(5, count=8), Tag(DISK, 6, "t", 0, 1)]
    msgs.append(extents_message(random.Random(7), DISK, 7))
    spool = Spool(tmp_path / "spool", SMALL)
    stream = spool.stream(DISK, MACHINE, SIZE)
    for msg in msgs:
        stream.append(msg)
    stream.commit()
    spool.close()
    found = [(f, *r) for f in segment_files(tmp_path / "spool" / DISK) for r in records_in(f)]
    path, _, offset, size = found[4]
    with open(path, "r+b") as f:  # one bit of the EXTENTS' payload rots
        f.seek(offset + size - 100)
        byte = f.read(1)
        f.seek(offset + size - 100)
        f.write(bytes([byte[0] ^ 1]))
    spool = Spool(tmp_path / "spool", SMALL)
    try:
        stream = spool.get(DISK)
        assert stream.durable_seq == 7  # nothing after it was dropped
        assert stream.read(0, 1 << 30) == msgs[:4]  # the good ones before it
        with pytest.raises(SpoolCorrupt) as err:
            stream.read(4, 1 << 30)
        assert err.value.seq == 5 and stream.corrupt_at_seq == 5
    finally:
        spool.close()
