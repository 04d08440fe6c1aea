"""Damage on disk: a torn tail is cut to exactly the last intact record; a bad record
with intact ones after it, or any damage in a sealed segment, is corruption: reported
(corrupt_at_seq, SpoolCorrupt from read), never silently dropped."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from appliance.process.errors import SpoolCorrupt
from appliance.process.records import RECORD_HEADER
from appliance.process.spool import Spool
from tests.process.conftest import (
    DISK,
    MACHINE,
    SIZE,
    SMALL,
    SpoolFactory,
    messages,
    read_all,
    records_in,
    segment_files,
)

MSGS = messages(125, seed=31)


def spooled(tmp_path: Path) -> Path:
    """A closed spool holding MSGS (several segments); returns the stream directory."""
    spool = Spool(tmp_path / "spool", SMALL)
    stream = spool.stream(DISK, MACHINE, SIZE)
    for msg in MSGS:
        stream.append(msg)
        if msg.seq % 5 == 0:
            stream.commit()
    stream.commit()
    spool.close()
    directory = tmp_path / "spool" / DISK
    assert len(segment_files(directory)) > 3
    assert len(records_in(segment_files(directory)[-1])) >= 3
    return directory


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


TAILS = ["in-header", "in-body", "garbage-only", "zeroed-record", "half-header-zeros"]


@pytest.mark.parametrize("how", TAILS)
def test_torn_tail_is_cut_exactly(open_spool: SpoolFactory, tmp_path: Path, how: str) -> None:
    directory = spooled(tmp_path)
    last = segment_files(directory)[-1]
    records = records_in(last)
    seq, off, size = records[-2]  # tear the second-to-last record, lose the last
    rnd = random.Random(how)
    with open(last, "r+b") as f:
        if how == "in-header":
            f.truncate(off + rnd.randrange(1, RECORD_HEADER.size))
        elif how == "in-body":
            f.truncate(off + rnd.randrange(RECORD_HEADER.size + 1, size))
        elif how == "zeroed-record":  # full length on disk, contents never written
            f.seek(off)
            f.write(bytes(last.stat().st_size - off))
        elif how == "half-header-zeros":
            f.truncate(off + RECORD_HEADER.size // 2)
            f.seek(0, os.SEEK_END)
            f.write(bytes(4096))
        if how == "garbage-only":
            seq, off = records[-1][0] + 1, records[-1][1] + records[-1][2]
        f.seek(0, os.SEEK_END)
        f.write(rnd.randbytes(rnd.randrange(1, 3000)))  # a torn sector of noise
    stream = open_spool().get(DISK)
    assert last.stat().st_size == off  # exactly the tail, nothing before it
    assert (stream.durable_seq, stream.appended_seq) == (seq - 1, seq - 1)
    assert stream.corrupt_at_seq is None
    assert read_all(stream) == MSGS[: seq - 1]
    for msg in MSGS[seq - 1 :]:  # the agent resends what was never acknowledged
        assert stream.append(msg)
    stream.commit()
    assert read_all(stream) == MSGS


def test_bad_payload_in_a_sealed_segment_is_reported(
    open_spool: SpoolFactory, tmp_path: Path
) -> None:
    directory = spooled(tmp_path)
    seq, off, size = records_in(segment_files(directory)[1])[1]
    flip(directory / segment_files(directory)[1].name, off + size - 1)
    sizes = {p: p.stat().st_size for p in segment_files(directory)}
    stream = open_spool().get(DISK)
    assert stream.durable_seq == len(MSGS)  # opening walks headers only
    with pytest.raises(SpoolCorrupt) as err:
        read_all(stream)  # returns what precedes the damage, then raises
    assert err.value.seq == seq == stream.corrupt_at_seq
    assert stream.read(seq - 2, 1 << 30) == [MSGS[seq - 2]]  # ends before the damage
    with pytest.raises(SpoolCorrupt):
        stream.read(seq - 1, 1 << 30)
    assert read_all(stream, seq) == MSGS[seq:]  # what follows is intact and readable
    assert {p: p.stat().st_size for p in segment_files(directory)} == sizes
    stream.release(seq)  # the target has it after all (a resync, say)
    assert stream.corrupt_at_seq is None


def test_bad_header_in_a_sealed_segment_is_found_on_open(
    open_spool: SpoolFactory, tmp_path: Path
) -> None:
    directory = spooled(tmp_path)
    path = segment_files(directory)[0]
    seq, off, _ = records_in(path)[2]
    flip(path, off + 20)  # inside the seq field
    sizes = {p: p.stat().st_size for p in segment_files(directory)}
    stream = open_spool().get(DISK)
    assert stream.corrupt_at_seq == seq
    assert stream.durable_seq == len(MSGS)
    assert stream.read(0, 1 << 30) == MSGS[: seq - 1]  # up to the damage
    with pytest.raises(SpoolCorrupt):
        stream.read(seq - 1, 1)
    assert read_all(stream, seq) == MSGS[seq:]
    assert {p: p.stat().st_size for p in segment_files(directory)} == sizes


@pytest.mark.parametrize("where", ["body", "header"])
def test_bad_record_mid_last_segment_is_not_cut(
    open_spool: SpoolFactory, tmp_path: Path, where: str
) -> None:
    directory = spooled(tmp_path)
    last = segment_files(directory)[-1]
    seq, off, size = records_in(last)[0]  # intact records follow it
    flip(last, off + (size - 1 if where == "body" else 9))
    before = last.stat().st_size
    spool = open_spool()
    stream = spool.get(DISK)
    assert last.stat().st_size == before  # not treated as a torn tail
    assert stream.corrupt_at_seq == seq
    assert stream.durable_seq == len(MSGS)
    with pytest.raises(SpoolCorrupt):
        stream.read(seq - 1, 1 << 30)
    assert read_all(stream, seq) == MSGS[seq:]
    more = messages(1, start=len(MSGS) + 1)
    assert stream.append(more[0])  # the stream goes on meanwhile
    stream.commit()
    spool.close()
    again = open_spool().get(DISK)  # and the damage is still reported after a restart
    assert again.corrupt_at_seq == seq
    assert read_all(again, seq) == MSGS[seq:] + more


def test_structural_damage_names_the_stream(tmp_path: Path) -> None:
    directory = spooled(tmp_path)
    segments = segment_files(directory)
    hidden = tmp_path / "aside"
    segments[1].rename(hidden)  # a hole in the chain of segments
    with pytest.raises(SpoolCorrupt, match=DISK):
        Spool(tmp_path / "spool", SMALL)
    hidden.rename(segments[1])
    flip(segments[2], 3)  # a segment header
    with pytest.raises(SpoolCorrupt, match=DISK):
        Spool(tmp_path / "spool", SMALL)
    flip(segments[2], 3)
    meta = directory / "meta.json"
    good = meta.read_bytes()
    meta.write_text("{")
    with pytest.raises(SpoolCorrupt, match=r"meta\.json"):
        Spool(tmp_path / "spool", SMALL)
    meta.write_text(json.dumps({**json.loads(good), "disk_id": "other"}))
    with pytest.raises(SpoolCorrupt, match="names disk"):
        Spool(tmp_path / "spool", SMALL)
    meta.unlink()
    with pytest.raises(SpoolCorrupt, match=r"without meta\.json"):
        Spool(tmp_path / "spool", SMALL)
    meta.write_bytes(good)
    spool = Spool(tmp_path / "spool", SMALL)
    try:
        assert read_all(spool.get(DISK)) == MSGS
    finally:
        spool.close()
