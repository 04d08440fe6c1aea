"""Committed records kept in memory for their first read: the same records as the disk
path, within the spool-wide budget, forgotten once read, released or closed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from appliance.process.spool import Spool
from appliance.wire.messages import Data, Tag
from tests.process.conftest import (
    DISK,
    MACHINE,
    SIZE,
    SMALL,
    SpoolFactory,
    messages,
    read_all,
    segment_files,
)

KEEP = dataclasses.replace(SMALL, recent_bytes=1 << 20)


def same(a: list[Data | Tag], b: list[Data | Tag]) -> bool:
    """The same messages, byte for byte as they would be spooled or sent."""

    def wire(msgs: list[Data | Tag]) -> list[bytes]:
        return [b"".join(bytes(part) for part in m.encode()) for m in msgs]

    return wire(a) == wire(b)


def fill(spool: Spool, n: int, every: int = 10) -> list[Data | Tag]:
    stream = spool.stream(DISK, MACHINE, SIZE)
    msgs = messages(n, seed=3)
    for i, msg in enumerate(msgs, 1):
        assert stream.append(msg)
        if i % every == 0:
            stream.commit()
    stream.commit()
    return msgs


def test_first_read_from_memory_matches_the_segments(
    open_spool: SpoolFactory, tmp_path: Path
) -> None:
    spool = open_spool(KEEP)
    msgs = fill(spool, 60)
    stream = spool.get(DISK)
    # Damage every segment: a read that went to disk would raise SpoolCorrupt.
    saved = {}
    for path in segment_files(tmp_path / "spool" / DISK):
        saved[path] = path.read_bytes()
        with path.open("r+b") as f:
            f.seek(len(saved[path]) - 1)
            f.write(bytes([saved[path][-1] ^ 0xFF]))
    first = read_all(stream)
    assert same(first, msgs)
    for path, data in saved.items():
        path.write_bytes(data)
    # Once read, the records are forgotten: the same read now comes from the segments.
    assert same(read_all(stream), msgs)
    assert spool._account._recent == 0  # the budget is all given back


def test_budget_left_out_batches_are_read_from_disk(open_spool: SpoolFactory) -> None:
    small = dataclasses.replace(SMALL, recent_bytes=20 << 10)
    spool = open_spool(small)
    msgs = fill(spool, 120, every=7)
    stream = spool.get(DISK)
    assert 0 < spool._account._recent <= 20 << 10
    assert same(read_all(stream, max_bytes=8 << 10), msgs)
    assert spool._account._recent == 0  # the budget is all given back


def test_release_and_close_give_the_budget_back(open_spool: SpoolFactory) -> None:
    spool = open_spool(KEEP)
    msgs = fill(spool, 40)
    stream = spool.get(DISK)
    stream.release(msgs[19].seq)
    assert same(read_all(stream, after=msgs[19].seq), msgs[20:])
    fill_more = messages(10, seed=4, start=msgs[-1].seq + 1)
    for msg in fill_more:
        stream.append(msg)
    stream.commit()
    assert spool._account._recent > 0
    stream.close()
    assert spool._account._recent == 0  # the budget is all given back
