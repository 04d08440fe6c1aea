"""Optimizer (zero, zstd, raw; off the loop; stats) and InflightDedupe (against a model)."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.process import optimize
from appliance.process.optimize import (
    ZERO_DIGEST,
    InflightDedupe,
    Optimizer,
    content_digest,
    is_zero,
)
from appliance.wire.messages import Data, Encoding, Extent, Extents

MIB = 1024 * 1024


def text_like(n: int, seed: int = 0) -> bytes:
    """Log-ish text from a fixed vocabulary: compresses to roughly 40% at level 1."""
    rnd = random.Random(seed)
    words = [
        bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 9))) for _ in range(2000)
    ]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rnd.choices(words, k=16)) + b"\n"
    return bytes(out[:n])


def semi(n: int, seed: int = 0) -> bytes:
    return os.urandom(n // 2) + text_like(n - n // 2, seed)


@pytest.fixture
def opt() -> Iterator[Optimizer]:
    with Optimizer(level=1, workers=2) as optimizer:
        yield optimizer


# -- zero detection -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 4096, MIB, 3 * MIB + 5])
def test_is_zero(size: int) -> None:
    zero = bytes(size)
    assert is_zero(zero) and is_zero(bytearray(size)) and is_zero(memoryview(zero))
    for pos in {0, size // 2, size - 1}:
        dirty = bytearray(size)
        dirty[pos] = 1
        assert not is_zero(dirty), pos
        assert not is_zero(memoryview(bytes(dirty)).toreadonly()), pos
    assert is_zero(b"")


def test_is_zero_counts_bytes_of_wide_memoryviews() -> None:
    buf = bytearray(4 * 1000)
    buf[-1] = 7  # past the first 1000 bytes: a view counting items would miss it
    assert not is_zero(memoryview(buf).cast("I"))


@pytest.mark.parametrize("pos", [0, MIB // 2, MIB - 1])
def test_one_nonzero_byte_is_not_a_zero_extent(opt: Optimizer, pos: int) -> None:
    payload = bytearray(MIB)
    payload[pos] = 0xFF
    out = opt.encode_sync(Data.raw("d", 1, 0, bytes(payload)))
    assert out.encoding is Encoding.ZSTD  # nearly all zeros: compresses, but is not ZERO
    assert out.decoded() == bytes(payload)


def test_zero_extent_becomes_zero(opt: Optimizer) -> None:
    out = opt.encode_sync(Data.raw("d", 7, 4096, memoryview(bytes(MIB)).toreadonly()))
    assert (out.encoding, out.payload, out.length, out.seq, out.offset) == (
        Encoding.ZERO,
        b"",
        MIB,
        7,
        4096,
    )
    assert out.decoded() == bytes(MIB)


# -- compression choice -------------------------------------------------------------------


def test_compressible_is_zstd_random_is_raw(opt: Optimizer) -> None:
    text = Data.raw("d", 1, 0, memoryview(text_like(MIB)).toreadonly())  # as received
    noise = Data.raw("d", 2, MIB, os.urandom(MIB))
    packed = opt.encode_sync(text)
    assert packed.encoding is Encoding.ZSTD and packed.wire_size < 0.6 * MIB
    assert opt.encode_sync(noise) is noise  # not worth it: the original, no copy


def test_min_gain_threshold_is_strict() -> None:
    payload = semi(64 * 1024)
    with Optimizer(level=1) as probe:
        size = probe.encode_sync(Data.raw("d", 1, 0, payload)).wire_size
    with Optimizer(level=1, min_gain=size / len(payload)) as at:
        assert at.encode_sync(Data.raw("d", 1, 0, payload)).encoding is Encoding.RAW
    with Optimizer(level=1, min_gain=(size + 1) / len(payload)) as above:
        assert above.encode_sync(Data.raw("d", 1, 0, payload)).encoding is Encoding.ZSTD


def test_encoded_messages_pass_through(opt: Optimizer) -> None:
    zero = Data.zero("d", 1, 0, MIB)
    packed = Data.compressed("d", 2, 0, text_like(4096))
    assert opt.encode_sync(zero) is zero
    assert opt.encode_sync(packed) is packed


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(
        st.one_of(st.binary(max_size=3000), st.integers(0, 5000).map(bytes)), max_size=6
    ),
    level=st.integers(-5, 9),
)
def test_roundtrip(chunks: list[bytes], level: int) -> None:
    payload = b"".join(chunks)
    with Optimizer(level=level, workers=1) as optimizer:
        msg = Data.raw("disk", 3, 512, payload)
        out = asyncio.run(optimizer.encode(msg))
        assert (out.disk_id, out.seq, out.offset, out.length) == ("disk", 3, 512, len(payload))
        assert bytes(out.decoded()) == payload
        Data.decode(b"".join(bytes(p) for p in out.encode()))  # and it is a valid frame body


# -- the event loop and the pool ----------------------------------------------------------


def test_compression_runs_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every compression of DATA and of EXTENTS runs on a pool thread, never on the
    event loop's, and the loop keeps running meanwhile (the real functions run; the
    wrappers only note which thread called them)."""
    threads: list[int] = []
    for name in ("_compress", "squeeze_extents"):
        real = getattr(optimize, name)

        def spy(*args: Any, _real: Any = real) -> Any:
            threads.append(threading.get_ident())
            return _real(*args)

        monkeypatch.setattr(optimize, name, spy)
    extents = [semi(MIB, seed=i) for i in range(8)]
    with Optimizer(level=15, workers=2) as optimizer:

        async def scenario() -> tuple[list[Data | Extents], int, int]:
            ticks = 0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(ticker())
            msgs: list[Data | Extents] = [
                Data.raw("d", i + 1, i * MIB, e) for i, e in enumerate(extents)
            ]
            msgs.append(Extents.of("d", 9, [Extent(16 * MIB, MIB, Encoding.RAW)], extents[0]))
            out = await asyncio.gather(*(optimizer.encode(m) for m in msgs))
            stop.set()
            await task
            return out, ticks, threading.get_ident()

        out, ticks, loop_thread = asyncio.run(scenario())
    assert [bytes(m.decoded()) for m in out[:8]] == extents
    assert bytes(out[8].decoded()) == extents[0]
    assert len(threads) == 9 and loop_thread not in threads
    assert ticks > len(out)  # the loop ran while the pool compressed


def test_set_level_applies_to_later_encodes() -> None:
    payload = text_like(MIB)
    with Optimizer(level=1, workers=1) as optimizer:
        fast = optimizer.encode_sync(Data.raw("d", 1, 0, payload))
        optimizer.set_level(19)
        assert optimizer.level == 19
        small = asyncio.run(optimizer.encode(Data.raw("d", 2, 0, payload)))
        assert small.wire_size < fast.wire_size
        assert small.decoded() == fast.decoded() == payload
        with pytest.raises(ValueError):
            optimizer.set_level(99)


def test_stats_add_up(opt: Optimizer) -> None:
    msgs = [
        Data.raw("d", 1, 0, bytes(MIB)),
        Data.raw("d", 2, MIB, text_like(MIB)),
        Data.raw("d", 3, 2 * MIB, os.urandom(MIB)),
        Data.zero("d", 4, 3 * MIB, 2 * MIB),
    ]

    async def run_all() -> list[Data]:
        return [await opt.encode(m) for m in msgs]

    outs = asyncio.run(run_all())
    assert [o.encoding for o in outs] == [Encoding.ZERO, Encoding.ZSTD, Encoding.RAW, Encoding.ZERO]
    assert opt.bytes_in == 5 * MIB
    assert opt.bytes_out == sum(o.wire_size for o in outs)
    assert opt.zero_bytes == 3 * MIB
    assert opt.ratio == pytest.approx(5 * MIB / opt.bytes_out)
    assert opt.compress_seconds > 0
    stats = opt.stats()
    assert (stats["extents_zero"], stats["extents_zstd"], stats["extents_raw"]) == (2, 1, 1)


def test_ratio_when_everything_was_zero(opt: Optimizer) -> None:
    assert opt.ratio == 1.0
    opt.encode_sync(Data.zero("d", 1, 0, MIB))
    assert opt.ratio == MIB  # finite: divided by one byte, not by zero


def test_encode_stream_keeps_order_and_reads_ahead_at_most_depth() -> None:
    produced: list[int] = []
    sizes = [MIB if i % 3 else 4096 for i in range(24)]  # small ones finish first

    async def source() -> AsyncIterator[Data]:
        for i, size in enumerate(sizes):
            produced.append(i)
            yield Data.raw("d", i + 1, 0, semi(size, seed=i))

    async def scenario(optimizer: Optimizer) -> list[int]:
        seqs = []
        async for out in optimizer.encode_stream(source(), depth=4):
            assert len(produced) <= out.seq + 4  # never more than depth ahead
            seqs.append(out.seq)
        return seqs

    with Optimizer(level=3, workers=2) as optimizer:
        assert asyncio.run(scenario(optimizer)) == list(range(1, 25))


# -- in-flight dedupe ---------------------------------------------------------------------


class Model:
    """The rule, by brute force over every in-flight write."""

    def __init__(self) -> None:
        # seq, offset, length, content (None: an EXTENTS' extent, never repeated)
        self.writes: list[tuple[int, int, int, bytes | None]] = []
        self.last = 0

    def check(self, seq: int, offset: int, length: int, content: bytes) -> bool:
        if seq <= self.last:
            return False
        same = [w for w in self.writes if (w[1], w[2]) == (offset, length)]
        if not same:
            return False
        latest = max(same, key=lambda w: w[0])
        if latest[3] != content:
            return False
        end = offset + length
        return not any(
            w[0] > latest[0] and w[1] < end and offset < w[1] + w[2] for w in self.writes
        )

    def sent(self, seq: int, offset: int, length: int, content: bytes | None) -> None:
        if seq <= self.last:
            self.writes.clear()
        self.last = seq
        self.writes.append((seq, offset, length, content))

    def acked(self, seq: int) -> None:
        self.writes = [w for w in self.writes if w[0] > seq]


def _message(seq: int, offset: int, length: int, fill: int, form: int) -> tuple[Data, bytes]:
    """A write and what the model compares: its bytes (RAW, ZERO) or its frame (ZSTD)."""
    content = bytes([fill]) * length
    if fill == 0 and form == 1:
        return Data.zero("d", seq, offset, length), content
    if form == 2:
        msg = Data.compressed("d", seq, offset, content, level=1)
        return msg, b"zstd:" + bytes(msg.payload)
    return Data.raw("d", seq, offset, content), content


def _extents_message(seq: int, start: int, specs: list[tuple[int, int, int]]) -> Extents:
    extents, at = [], start
    for gap, length, kind in specs:
        extents.append(Extent(at + gap, length, Encoding(kind)))
        at += gap + length
    data = b"e" * sum(e.length for e in extents if e.kind is Encoding.RAW)
    return Extents.of("d", seq, extents, data)


_write = st.tuples(
    # Mostly aligned 4/8-byte writes, so that exact repeats (the True case) are common,
    # plus unaligned ones for partial overlaps.
    st.one_of(st.integers(0, 10).map(lambda i: 4 * i), st.integers(0, 44)),  # offset
    st.one_of(st.sampled_from([4, 8]), st.integers(1, 12)),  # length
    st.integers(0, 2),  # content (0 = zeros)
    st.integers(0, 2),  # form: raw, zero, zstd
)
_step = st.sampled_from([1] * 12 + [2, 3, 0, -2, -5])  # mostly onwards, some resends/rewinds
# An EXTENTS: (gap before, length, kind) of each extent, from a start offset.
_extents = st.tuples(
    st.integers(0, 40),
    st.lists(
        st.tuples(st.integers(0, 6), st.integers(1, 8), st.sampled_from([0, 2, 3])),
        min_size=1,
        max_size=5,
    ),
)
_op = st.one_of(
    st.tuples(st.just("extents"), _step, _extents),
    st.tuples(st.just("write"), _step, _write),
    st.tuples(st.just("write"), _step, _write),
    st.tuples(st.just("write"), _step, _write),
    st.tuples(st.just("ack"), st.sampled_from([-4, -3, -2, -1, 0]), st.none()),  # ack to last+k
)


@settings(max_examples=500, deadline=None)
@given(ops=st.lists(_op, max_size=80))
def test_dedupe_matches_brute_force_model(
    ops: list[tuple[str, int, Any]],
) -> None:
    dedupe, model = InflightDedupe(), Model()
    seq = 0
    for kind, step, write in ops:
        if kind == "ack":
            dedupe.acked(seq + step)
            model.acked(seq + step)
            continue
        assert write is not None
        seq = max(1, seq + step)
        if kind == "extents":
            msg = _extents_message(seq, *write)
            dedupe.sent(msg)
            for i, extent in enumerate(msg.extents):
                model.sent(seq, extent.offset, extent.length, None)
                model.last = seq - 1 if i < len(msg.extents) - 1 else seq  # one seq for all
            continue
        msg, content = _message(seq, *write)
        expect = model.check(seq, msg.offset, msg.length, content)
        assert dedupe.check(msg) is expect
        assert dedupe.admit(msg) is not expect  # sent in full, or as SAME: recorded
        model.sent(seq, msg.offset, msg.length, content)
    dedupe.acked(seq)
    assert len(dedupe) == 0 and not dedupe._live and not dedupe._starts  # bounded by in-flight


def test_dedupe_basic_cases() -> None:
    d = InflightDedupe("d")
    a = Data.raw("d", 1, 0, b"x" * 8)
    assert d.admit(a)
    assert d.check(Data.raw("d", 2, 0, b"x" * 8))  # same bytes, same range, in flight
    assert not d.check(Data.raw("d", 2, 0, b"y" * 8))  # other content
    assert not d.check(Data.raw("d", 2, 0, b"x" * 4))  # other range
    assert not d.check(Data.raw("d", 1, 0, b"x" * 8))  # a resend is never suppressed
    d.sent(Data.raw("d", 2, 7, b"z"))  # touches the last byte of the range
    assert not d.check(Data.raw("d", 3, 0, b"x" * 8))
    assert d.admit(Data.raw("d", 4, 0, b"x" * 8))
    d.sent(Data.raw("d", 5, 0, b"w" * 8))  # same start, later seq, replaces seq 4
    d.acked(4)  # acks seq 4 only: seq 5 is still in flight
    assert d.check(Data.raw("d", 6, 0, b"w" * 8))
    d.acked(5)
    assert not d.check(Data.raw("d", 6, 0, b"w" * 8))  # durable now, not in flight
    with pytest.raises(ValueError):
        d.check(Data.raw("other", 7, 0, b"x"))
    assert not d.check(Data.raw("d", 7, 0, b""))  # nothing to save on an empty write


def test_dedupe_same_frames() -> None:
    d = InflightDedupe()
    x = Data.raw("d", 1, 0, b"x" * 8)
    d.sent(x)
    same = Data("d", 2, 0, 8, Encoding.SAME, b"")
    assert not d.check(same)  # already the cheapest frame there is
    d.sent(same)  # repeats seq 1's bytes, and is in flight itself
    d.acked(1)
    assert d.check(Data.raw("d", 3, 0, b"x" * 8))
    d.sent(Data("d", 4, 4, 8, Encoding.SAME, b""))  # matches nothing live: unknown bytes
    assert not d.check(Data.raw("d", 5, 0, b"x" * 8))  # it overlapped [4, 8)
    assert not d.check(Data.raw("d", 5, 4, b"x" * 8))
    assert d.admit(Data.raw("d", 5, 0, b"y" * 8))
    assert not d.admit(Data.raw("d", 6, 0, b"y" * 8))
    assert (d.same_frames, d.same_bytes) == (1, 8)
    with pytest.raises(ValueError):
        content_digest(same)


def test_dedupe_digest_forms() -> None:
    text = text_like(10_000)
    raw, packed = Data.raw("d", 1, 0, text), Data.compressed("d", 2, 0, text)
    assert content_digest(packed) == content_digest(Data.compressed("d", 3, 0, text))
    assert content_digest(raw) != content_digest(packed)  # a missed saving, never a wrong one
    zero = content_digest(Data.zero("d", 1, 0, 10))
    assert zero == content_digest(Data.raw("d", 1, 0, bytes(10))) == ZERO_DIGEST
    d = InflightDedupe()
    d.sent(Data.zero("d", 1, 0, 10))
    assert d.check(Data.raw("d", 2, 0, bytes(10)))
    d.sent(packed)
    assert d.check(Data.compressed("d", 3, 0, text))


def test_dedupe_scales_to_ten_thousand_in_flight() -> None:
    d = InflightDedupe()
    payload = b"p" * 64
    n = 10_000
    started = time.perf_counter()
    for i in range(n):  # scattered, overlapping writes: 10k in flight
        d.admit(Data.raw("d", i + 1, (i * 7919) % (n * 32), payload))
    hits = sum(d.check(Data.raw("d", n + 1, (i * 7919) % (n * 32), payload)) for i in range(n))
    d.acked(n)
    elapsed = time.perf_counter() - started
    assert hits > 0 and len(d) == 0
    assert elapsed < 2.0  # ~10 us per call; a linear scan would be ~100x slower
