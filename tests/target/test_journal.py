"""The undo journal: records, segments, torn tails, corruption, truncation, pins."""

from __future__ import annotations

import errno
import itertools
import os
import random
import threading
import time
from pathlib import Path

import pytest

from appliance.storage.faults import FaultPoint, set_fault_hook
from appliance.target.errors import JournalCorrupt
from appliance.target.journal import (
    RECORD_HEADER,
    SEGMENT_HEADER,
    Encoding,
    Journal,
    PendingRecord,
    encode,
)

SEG = 64 << 10


def records_for(rng: random.Random, seq: int, count: int) -> list[PendingRecord]:
    out: list[PendingRecord] = []
    for i in range(count):
        n = rng.choice([512, 4096, 20_000 // 512 * 512])
        kind = rng.randrange(3)
        data = rng.randbytes(n) if kind == 0 else bytes(n) if kind == 1 else b"ab" * (n // 2)
        out.extend(encode(seq + i, rng.randrange(0, 1 << 20, 512), data, 1))
    return out


def fill(journal: Journal, batches: int, seed: int = 1) -> list[tuple[int, bytes]]:
    """Append ``batches`` batches; return (seq, old contents) of every record in order."""
    rng = random.Random(seed)
    expected: list[tuple[int, bytes]] = []
    for b in range(batches):
        batch = records_for(rng, 1000 * b, rng.randint(1, 6))
        journal.append(batch)
        for rec in batch:
            payload = rec.stored
            if rec.encoding is Encoding.ZEROS:
                payload = bytes(rec.raw_len)
            elif rec.encoding is Encoding.ZSTD:
                payload = b""  # checked through UndoRecord.data() below
            expected.append((rec.seq, payload))
    return expected


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.undo"))


def test_encode_picks_the_smallest_encoding() -> None:
    zeros, = encode(1, 0, bytes(4096), 1)  # fmt: skip
    text, = encode(2, 4096, b"abcd" * 1024, 1)  # fmt: skip
    noise, = encode(3, 8192, os.urandom(4096), 1)  # fmt: skip
    assert (zeros.encoding, zeros.stored) == (Encoding.ZEROS, b"")
    assert text.encoding is Encoding.ZSTD and len(text.stored) < 200
    assert noise.encoding is Encoding.RAW and len(noise.stored) == 4096
    big = encode(4, 0, os.urandom(3 << 20), 1)
    assert [(r.offset, r.raw_len) for r in big] == [
        (0, 1 << 20),
        (1 << 20, 1 << 20),
        (2 << 20, 1 << 20),
    ]


def test_append_and_read_roundtrip(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "disk", segment_bytes=1 << 30)
    rng = random.Random(7)
    originals = []
    for b in range(5):
        datas = [rng.randbytes(4096), bytes(1024), b"xyz" * 1000 + b"\0" * 72]
        batch = [r for i, d in enumerate(datas) for r in encode(b * 10 + i, i * 8192, d, 1)]
        originals.extend(datas)
        end = journal.append(batch)
        assert end == journal.end_lsn
    got = list(journal.read(0))
    assert [r.data() for r in got] == originals
    assert [r.seq for r in got] == [b * 10 + i for b in range(5) for i in range(3)]
    assert got[0].lsn == 0
    assert all(a.end_lsn == b.lsn for a, b in itertools.pairwise(got))
    assert got[-1].end_lsn == journal.end_lsn
    # A window that starts on a record boundary reads just that window.
    window = list(journal.read(got[3].lsn, got[6].lsn))
    assert [r.lsn for r in window] == [got[3].lsn, got[4].lsn, got[5].lsn]
    journal.close()
    again = Journal(tmp_path, "disk", segment_bytes=1 << 30)
    assert again.end_lsn == journal.end_lsn
    assert [r.data() for r in again.read(0)] == originals


def test_segments_roll_over_and_chain(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "disk", segment_bytes=SEG)
    expected = fill(journal, 60)
    files = segment_files(tmp_path)
    assert len(files) > 3
    bounds = journal.segment_bounds()
    assert [f.name for f in files] == [f"{start:016x}.undo" for start, _ in bounds]
    for (_, end), (start, _) in itertools.pairwise(bounds):
        assert end == start
    for path, (start, end) in zip(files, bounds, strict=True):
        assert path.stat().st_size == SEGMENT_HEADER.size + end - start
        assert end - start <= SEG or end - start == RECORD_HEADER.size + 20_000 // 512 * 512
    assert journal.total_bytes == sum(f.stat().st_size for f in files)
    got = list(journal.read(0))
    assert [r.seq for r in got] == [seq for seq, _ in expected]
    for rec, (_, payload) in zip(got, expected, strict=True):
        if payload:
            assert rec.data() == payload
    journal.close()
    reopened = Journal(tmp_path, "disk", segment_bytes=SEG)
    assert reopened.segment_bounds() == bounds


@pytest.mark.parametrize("cut", [1, RECORD_HEADER.size - 1, RECORD_HEADER.size + 7, -1])
def test_torn_tail_is_cut_on_open(tmp_path: Path, cut: int) -> None:
    journal = Journal(tmp_path, "disk", segment_bytes=1 << 30)
    fill(journal, 5)
    good_end = journal.end_lsn
    rng = random.Random(3)
    journal.append(encode(99_999, 0, rng.randbytes(4096), 1))  # the batch that will tear
    journal.close()
    last = segment_files(tmp_path)[-1]
    torn_at = SEGMENT_HEADER.size + good_end + (cut if cut > 0 else RECORD_HEADER.size + 4095)
    os.truncate(last, torn_at)
    reopened = Journal(tmp_path, "disk", segment_bytes=1 << 30)
    assert reopened.end_lsn == good_end
    assert last.stat().st_size == SEGMENT_HEADER.size + good_end  # the tail is gone
    assert 99_999 not in [r.seq for r in reopened.read(0)]
    reopened.append(encode(100, 0, b"q" * 512, 1))  # appending continues cleanly
    assert [r.seq for r in reopened.read(good_end)] == [100]


def test_garbage_after_the_last_record_is_cut(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "disk", segment_bytes=1 << 30)
    fill(journal, 5)
    end = journal.end_lsn
    journal.close()
    last = segment_files(tmp_path)[-1]
    with open(last, "ab") as f:
        f.write(os.urandom(3000))
    assert Journal(tmp_path, "disk", segment_bytes=1 << 30).end_lsn == end
    with open(last, "ab") as f:
        f.write(bytes(5000))  # zero-filled blocks, as after a crash with delayed allocation
    assert Journal(tmp_path, "disk", segment_bytes=1 << 30).end_lsn == end


def _flip(journal_dir: Path, bounds: list[tuple[int, int]], lsn: int) -> None:
    for path, (start, end) in zip(segment_files(journal_dir), bounds, strict=True):
        if start <= lsn < end:
            with open(path, "r+b") as f:
                f.seek(SEGMENT_HEADER.size + lsn - start)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0x40]))
            return
    raise AssertionError(f"lsn {lsn} not in any segment")


def test_verify_finds_mid_journal_corruption(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "disk", segment_bytes=SEG)
    fill(journal, 40)
    records = list(journal.read(0))
    assert journal.verify() is None
    victim = next(r for r in records[len(records) // 2 :] if len(r.stored) > 100)
    bounds = journal.segment_bounds()
    _flip(tmp_path, bounds, victim.lsn + RECORD_HEADER.size + 50)  # in the stored bytes
    assert journal.verify() == victim.lsn
    assert journal.scan_corruption() == [victim.lsn]
    with pytest.raises(JournalCorrupt) as info:
        list(journal.read(0))
    assert info.value.lsn == victim.lsn
    assert len(list(journal.read(victim.end_lsn))) == len(records) - records.index(victim) - 1
    # A damaged header is found too, and the scan resynchronises after it.
    other = records[3]
    _flip(tmp_path, bounds, other.lsn + 20)  # inside the header's offset field
    assert journal.scan_corruption() == [other.lsn, victim.lsn]
    journal.close()
    # Reopening does not mistake mid-journal damage for a torn tail.
    assert Journal(tmp_path, "disk", segment_bytes=SEG).end_lsn == journal.end_lsn


def test_damage_below_the_checkpoint_in_the_last_segment_is_not_cut(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "disk", segment_bytes=1 << 30)
    fill(journal, 10)
    records = list(journal.read(0))
    end = journal.end_lsn
    journal.close()
    victim = records[4]
    _flip(tmp_path, journal.segment_bounds(), victim.lsn + 1)  # the magic
    reopened = Journal(tmp_path, "disk", segment_bytes=1 << 30, durable_lsn=end)
    assert reopened.end_lsn == end
    assert reopened.verify() == victim.lsn
    reopened.close()
    # Without knowing the checkpoint it would look like a torn tail: that is what the
    # durable_lsn argument is for.
    assert Journal(tmp_path, "disk", segment_bytes=1 << 30).end_lsn == victim.lsn


def test_journal_shorter_than_its_checkpoint_is_corrupt(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "disk", segment_bytes=1 << 30)
    fill(journal, 3)
    end = journal.end_lsn
    journal.close()
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path, "disk", segment_bytes=1 << 30, durable_lsn=end + 1)


def test_truncate_and_drop(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "disk", segment_bytes=SEG)
    fill(journal, 60)
    records = list(journal.read(0))
    bounds = journal.segment_bounds()
    cut = records[len(records) // 2].lsn
    journal.truncate(cut)
    assert journal.end_lsn == cut
    assert [r.lsn for r in journal.read(0)] == [r.lsn for r in records if r.lsn < cut]
    assert all(start < cut or start == 0 for start, _ in journal.segment_bounds())
    journal.close()
    reopened = Journal(tmp_path, "disk", segment_bytes=SEG)
    assert reopened.end_lsn == cut
    # Dropping stops at whole segments that end at or before the asked LSN.
    target = bounds[2][1] + 10
    freed = reopened.drop_before(target)
    assert reopened.start_lsn == bounds[3][0]
    assert freed == sum(SEGMENT_HEADER.size + e - s for s, e in bounds[:3])
    with pytest.raises(JournalCorrupt):
        list(reopened.read(0))
    assert next(r.lsn for r in reopened.read(bounds[3][0])) == bounds[3][0]


def test_the_active_segment_is_never_dropped(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "disk", segment_bytes=SEG)
    fill(journal, 30)
    journal.drop_before(journal.end_lsn)
    assert len(journal.segment_bounds()) == 1
    assert journal.segment_bounds()[0][1] == journal.end_lsn


def test_pins_hold_off_dropping_and_truncation(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "disk", segment_bytes=SEG)
    fill(journal, 60)
    bounds = journal.segment_bounds()
    token = journal.pin(bounds[1][0] + 1)
    assert journal.pin_floor() == bounds[1][0] + 1
    journal.drop_before(journal.end_lsn)
    assert journal.start_lsn == bounds[1][0]  # only the segment wholly below the pin
    done = threading.Event()

    def truncate() -> None:
        with journal.exclusive():
            journal.truncate(bounds[-2][0])
        done.set()

    worker = threading.Thread(target=truncate)
    worker.start()
    time.sleep(0.2)
    assert not done.is_set()  # waits for the materialisation holding the pin
    journal.unpin(token)
    worker.join(5)
    assert done.is_set()
    assert journal.end_lsn == bounds[-2][0]
    with pytest.raises(JournalCorrupt):
        journal.pin(0)  # below the start: those records are gone


@pytest.mark.parametrize("point", [FaultPoint.JOURNAL_WRITE, FaultPoint.JOURNAL_ROLLOVER])
def test_failed_append_leaves_nothing_behind(tmp_path: Path, point: FaultPoint) -> None:
    journal = Journal(tmp_path, "disk", segment_bytes=SEG)
    fill(journal, 10)
    end, bounds = journal.end_lsn, journal.segment_bounds()
    files = {p.name: p.stat().st_size for p in segment_files(tmp_path)}
    calls = 0

    def hook(p: FaultPoint) -> None:
        nonlocal calls
        if p is point:
            calls += 1
            if calls == 2 or point is FaultPoint.JOURNAL_ROLLOVER:
                raise OSError(errno.ENOSPC, "No space left on device")

    set_fault_hook(hook)
    big = [r for i in range(20) for r in encode(i, 0, os.urandom(16384), 1)]
    with pytest.raises(OSError, match="No space"):
        journal.append(big)
    set_fault_hook(None)
    assert journal.end_lsn == end
    assert journal.segment_bounds() == bounds
    assert {p.name: p.stat().st_size for p in segment_files(tmp_path)} == files
    journal.append(big)
    assert [r.seq for r in journal.read(end)] == list(range(20))
