"""EXTENTS through the optimizer (zero extents, one zstd frame, stats) and the in-flight
dedupe (an EXTENTS kills the live writes it touches)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
import zstandard

from appliance.process.optimize import InflightDedupe, Optimizer, squeeze_extents
from appliance.wire.messages import Data, Encoding, Extent, Extents
from tests.process.test_optimize import text_like

RAW, ZERO, SAME = Encoding.RAW, Encoding.ZERO, Encoding.SAME


@pytest.fixture
def opt() -> Iterator[Optimizer]:
    with Optimizer(level=1, workers=2) as optimizer:
        yield optimizer


def build(
    specs: list[tuple[int, Encoding, bytes | None]], seq: int = 1, at: int = 0
) -> tuple[Extents, list[bytes]]:
    """An EXTENTS from (length, kind, bytes) with 4 KiB gaps, and the bytes each extent
    writes (zeros for ZERO; empty for SAME, which writes nothing)."""
    extents, payload, written = [], [], []
    for length, kind, data in specs:
        extents.append(Extent(at, length, kind))
        if kind is RAW:
            assert data is not None and len(data) == length
            payload.append(data)
        written.append(data if kind is RAW else bytes(length) if kind is ZERO else b"")
        at += length + 4096
    return Extents.of("d", seq, extents, b"".join(payload)), written


def writes(msg: Extents) -> list[bytes]:
    """What each extent of `msg` writes, through a wire round trip and `pieces()`."""
    again = Extents.decode(b"".join(bytes(p) for p in msg.encode()))
    return [
        bytes(data) if data is not None else bytes(e.length) if e.kind is ZERO else b""
        for e, data in again.pieces()
    ]


def test_zstd_payload_decodes_to_the_same_pieces(opt: Optimizer) -> None:
    msg, written = build([
        (4096, RAW, text_like(4096, 1)),
        (8192, ZERO, None),
        (4096, RAW, bytes(4096)),  # all zero, sent RAW: becomes a ZERO extent
        (512, SAME, None),
        (12288, RAW, text_like(12288, 2)),
        (4096, RAW, os.urandom(4096)),
    ])  # fmt: skip
    out = asyncio.run(opt.encode(msg))
    assert out.encoding is ZSTD and (out.disk_id, out.seq) == ("d", 1)
    kinds = [e.kind for e in out.extents]
    assert kinds == [RAW, ZERO, ZERO, SAME, RAW, RAW]
    assert [(e.offset, e.length) for e in out.extents] == [
        (e.offset, e.length) for e in msg.extents
    ]
    # One zstd frame of the RAW extents' bytes back to back, in order.
    raw = zstandard.ZstdDecompressor().decompress(bytes(out.payload))
    assert raw == written[0] + written[4] + written[5]
    assert writes(out) == written
    assert out.wire_size < 0.8 * msg.wire_size
    stats = opt.stats()
    assert (stats["bytes_in"], stats["bytes_out"]) == (msg.length, out.wire_size)
    assert stats["zero_bytes"] == 8192 + 4096
    assert (stats["multi_messages"], stats["multi_extents"]) == (1, 6)
    assert opt.ratio == msg.length / out.wire_size
    assert stats["extents_raw"] == stats["extents_zstd"] == 0  # DATA counters untouched


ZSTD = Encoding.ZSTD


def test_incompressible_extents_go_as_they_came(opt: Optimizer) -> None:
    specs = [(4096, RAW, os.urandom(4096)) if i % 2 else (4096, ZERO, None) for i in range(40)]
    msg, _ = build(specs)
    out = opt.encode_sync(msg)
    assert out is msg  # RAW, no copy
    specs = [(4096, RAW, os.urandom(4096) if i % 2 else bytes(4096)) for i in range(40)]
    zeroed, written = build(specs)
    out = opt.encode_sync(zeroed)
    assert out.encoding is RAW and [e.kind for e in out.extents] == [ZERO, RAW] * 20
    assert out.wire_size == 20 * 4096 and writes(out) == written
    assert opt.bytes_out == msg.wire_size + out.wire_size


def test_extents_without_bytes_to_squeeze_pass_through(opt: Optimizer) -> None:
    packed, _ = build([(4096, RAW, text_like(4096))])
    packed = Extents("d", 1, packed.extents, ZSTD, zstandard.compress(bytes(packed.payload)))
    empty, _ = build([(4096, ZERO, None), (4096, SAME, None)], seq=2)
    for msg in (packed, empty):
        assert asyncio.run(opt.encode(msg)) is msg
    # All RAW extents zero: nothing left to send but the table.
    zeros, written = build([(4096, RAW, bytes(4096)), (1024, RAW, bytes(1024))], seq=3)
    out, _ = squeeze_extents(zeros, 1, 0.97)
    assert (out.encoding, out.wire_size, [e.kind for e in out.extents]) == (RAW, 0, [ZERO] * 2)
    assert writes(out) == written


def test_extents_keep_their_place_in_an_encoded_stream(opt: Optimizer) -> None:
    msgs: list[Data | Extents] = []
    for seq in range(1, 31):
        if seq % 3:
            msgs.append(Data.raw("d", seq, seq << 20, text_like(65536, seq)))
        else:
            msgs.append(build([(4096, RAW, text_like(4096, seq))] * 16, seq=seq)[0])

    async def source():  # type: ignore[no-untyped-def]
        for msg in msgs:
            yield msg

    async def scenario() -> list[Data | Extents]:
        return [out async for out in opt.encode_stream(source(), depth=4)]

    out = asyncio.run(scenario())
    assert [m.seq for m in out] == list(range(1, 31))
    assert [type(m) for m in out] == [type(m) for m in msgs]
    assert all(m.encoding is ZSTD for m in out)


# -- dedupe ---------------------------------------------------------------------------------


def test_extents_overlapping_a_write_in_flight_stop_its_repeat_being_same() -> None:
    d = InflightDedupe("d")
    p = b"p" * 4096
    assert d.admit(Data.raw("d", 1, 8192, p))  # in flight, live
    assert d.admit(Data.raw("d", 2, 65536, p))  # in flight, live, not touched below
    # The bytes at 8192 change in between: an extent of an EXTENTS covers them.
    msg, _ = build([(512, RAW, b"q" * 512), (4096, ZERO, None)], seq=3, at=4096 + 2048)
    assert msg.extents[1].offset < 8192 + 4096 and msg.extents[1].offset + 4096 > 8192
    d.sent(msg)
    assert d.admit(Data.raw("d", 4, 8192, p))  # NOT same: must be sent again
    assert not d.admit(Data.raw("d", 5, 8192, p))  # now it is a repeat of seq 4
    assert not d.admit(Data.raw("d", 6, 65536, p))  # untouched: still a repeat
    assert (d.same_frames, d.same_bytes) == (2, 8192)


@pytest.mark.parametrize("kind", [RAW, ZERO, SAME])
def test_every_extent_kind_kills_what_it_touches(kind: Encoding) -> None:
    d = InflightDedupe("d")
    p = b"p" * 4096
    for seq, offset in enumerate([0, 8192, 16384, 24576], 1):
        d.admit(Data.raw("d", seq, offset, p))
    # One-byte extents: the last byte of the second write; then one just after the
    # third write's end (adjacent, not overlapping) and one inside the fourth.
    specs = [(1, kind, b"x" if kind is RAW else None)]
    first, _ = build(specs, seq=5, at=8192 + 4095)
    d.sent(first)
    second, _ = build(specs * 2, seq=6, at=16384 + 4096)  # at 20480 and 24577
    d.sent(second)
    assert [d.check(Data.raw("d", 8, o, p)) for o in (0, 8192, 16384, 24576)] == [
        True, False, True, False,
    ]  # fmt: skip


def test_extents_after_a_rewind_reset_the_dedupe() -> None:
    d = InflightDedupe("d")
    d.admit(Data.raw("d", 5, 0, b"p" * 8))
    d.sent(build([(8, RAW, b"q" * 8)], seq=3, at=4096)[0])  # a resend: seq went back
    assert len(d) == 0 and not d.check(Data.raw("d", 6, 0, b"p" * 8))
    with pytest.raises(ValueError):
        d.sent(Extents.of("other", 9, [Extent(0, 1, RAW)], b"x"))


@pytest.mark.parametrize("lives", [1, 3, 40])  # fewer and more live writes than extents
def test_either_walk_kills_exactly_the_overlapped(lives: int) -> None:
    d = InflightDedupe("d")
    p = b"p" * 4096
    offsets = [i * 8192 for i in range(lives)]  # live writes with 4 KiB holes between
    for seq, offset in enumerate(offsets, 1):
        d.admit(Data.raw("d", seq, offset, p))
    # Across the end of the first write; in the hole after the second (touching
    # nothing: it ends where the third starts); on the last write's last byte.
    last = offsets[-1]
    table = [Extent(4095, 2, RAW), Extent(8192 + 4096, 4096, RAW)]
    table += [Extent(last + 4095, 1, RAW)] if last > 16384 else []
    msg = Extents.of("d", lives + 1, table, b"x" * sum(e.length for e in table))
    msg.encode()  # a valid message: ascending, disjoint
    # 40 writes: more live writes in its span than extents, so it walks the extents.
    d.sent(msg)
    hit = {0, last} if last > 16384 else {0}
    assert [d.check(Data.raw("d", lives + 2, o, p)) for o in offsets] == [
        o not in hit for o in offsets
    ]
