"""Fixtures for the spool tests: small segments, deterministic message streams."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from appliance.process.spool import Spool, SpoolSettings
from appliance.process.stream import SpoolStream
from appliance.storage.faults import set_fault_hook
from appliance.wire.messages import Data, Encoding, Extent, Extents, Tag, TagKind

# Small segments so a few hundred KiB of records roll over many times; no records kept
# in memory after commit, so every read goes to the segments (test_spool_recent.py
# covers reads from memory).
SMALL = SpoolSettings(segment_bytes=64 << 10, limit_bytes=64 << 20, recent_bytes=0)
DISK = "disk-0"
MACHINE = "machine-0"
SIZE = 1 << 30

Message = Data | Extents | Tag
SpoolFactory = Callable[..., Spool]


def extents_message(
    rnd: random.Random, disk_id: str, seq: int, *, compressed: bool = False, count: int = 0
) -> Extents:
    """An EXTENTS of ``count`` (default 1-40) ascending extents, RAW (the first always),
    ZERO and SAME, with a RAW or one-zstd-frame payload."""
    count = count or rnd.randrange(1, 41)
    at = rnd.randrange(0, (SIZE >> 12) - 8 * count) << 12
    extents: list[Extent] = []
    pieces: list[bytes] = []
    for i in range(count):
        length = rnd.randrange(1, 9) << 9
        kind = (
            Encoding.RAW
            if i == 0
            else rnd.choice([Encoding.RAW] * 3 + [Encoding.ZERO, Encoding.SAME])
        )
        extents.append(Extent(at, length, kind))
        if kind is Encoding.RAW:
            half = length // 2
            pieces.append(
                rnd.randbytes(half) + bytes(rnd.choice(b"xyz") for _ in range(length - half))
            )
        at += length + (rnd.randrange(0, 3) << 12)
    payload = b"".join(pieces)
    if compressed:
        packed = zstandard.ZstdCompressor(level=1).compress(payload)
        return Extents(disk_id, seq, tuple(extents), Encoding.ZSTD, packed)
    return Extents.of(disk_id, seq, extents, payload)


def messages(n: int, seed: int = 1, *, start: int = 1, disk_id: str = DISK) -> list[Message]:
    """``n`` messages from seq ``start``: RAW, ZSTD and ZERO extents, RAW and ZSTD
    EXTENTS, and a tag every 9."""
    rnd = random.Random(seed)
    out: list[Message] = []
    for seq in range(start, start + n):
        offset = rnd.randrange(0, SIZE >> 12) << 12
        kind = seq % 9
        if kind == 0:
            tag_kind = TagKind.APP if seq % 2 else TagKind.CRASH
            out.append(Tag(disk_id, seq, f"tag-{seq}", tag_kind, rnd.getrandbits(63)))
        elif kind in (1, 5):
            text = bytes(rnd.choice(b"abcdefgh") for _ in range(64)) * rnd.randrange(8, 200)
            out.append(Data.compressed(disk_id, seq, offset, text))
        elif kind == 7:
            out.append(Data.zero(disk_id, seq, offset, rnd.randrange(1, 256) << 9))
        elif kind in (3, 6):
            out.append(extents_message(rnd, disk_id, seq, compressed=kind == 6))
        else:
            out.append(Data.raw(disk_id, seq, offset, rnd.randbytes(rnd.randrange(1, 32) << 9)))
    return out


def payload(msgs: list[Message]) -> int:
    return sum(m.wire_size for m in msgs if not isinstance(m, Tag))


def read_all(stream: SpoolStream, after: int = 0, max_bytes: int = 100 << 10) -> list[Message]:
    """Everything durable after ``after``, read in steps of ``max_bytes``."""
    out: list[Message] = []
    while batch := stream.read(after, max_bytes):
        out += batch
        after = batch[-1].seq
    return out


def segment_files(stream_dir: Path) -> list[Path]:
    return sorted(stream_dir.glob("*.spool"))


@pytest.fixture(autouse=True)
def _no_fault_hook() -> Iterator[None]:
    yield
    set_fault_hook(None)


@pytest.fixture
def open_spool(tmp_path: Path) -> Iterator[SpoolFactory]:
    """Open (or reopen) the spool of this test; every spool is closed at teardown."""
    opened: list[Spool] = []

    def factory(settings: SpoolSettings = SMALL, directory: Path | None = None) -> Spool:
        spool = Spool(directory or tmp_path / "spool", settings)
        opened.append(spool)
        return spool

    yield factory
    for spool in opened:
        spool.close()  # closing twice is harmless


def records_in(path: Path) -> list[tuple[int, int, int]]:
    """``(seq, file offset, size)`` of the intact records at the start of a segment
    file, read with the format's own parser, independently of the stream's index."""
    from appliance.process.records import RECORD_HEADER, body_ok, parse_header
    from appliance.storage.segments import SEGMENT_HEADER

    raw = path.read_bytes()
    pos = start = int(path.name.removesuffix(".spool"), 16)
    out: list[tuple[int, int, int]] = []
    while (off := SEGMENT_HEADER.size + pos - start) < len(raw):
        head = raw[off : off + RECORD_HEADER.size]
        header = parse_header(head, pos)
        if header is None or off + header.size > len(raw):
            break
        if not body_ok(head, raw[off + RECORD_HEADER.size : off + header.size]):
            break
        out.append((header.seq, off, header.size))
        pos = header.end
    return out


def scan_file(path: Path) -> tuple[list[int], int]:
    """The seqs of the intact records at the start of a segment file, and the file
    offset where they end."""
    from appliance.storage.segments import SEGMENT_HEADER

    records = records_in(path)
    end = records[-1][1] + records[-1][2] if records else SEGMENT_HEADER.size
    return [seq for seq, _, _ in records], end


def segment_seqs(path: Path) -> list[int]:
    return scan_file(path)[0]
