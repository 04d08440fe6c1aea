"""Data optimisation on the way to the master target: zero extents, zstd, in-flight dedupe.

`Optimizer` turns a RAW `Data` into the cheapest honest encoding: ZERO when every byte
is zero, ZSTD when compression saves enough, RAW otherwise. A RAW `Extents` (many
changes under one sequence number) gets the same treatment as a whole: its all-zero
RAW extents become ZERO ones and the rest of the payload is one zstd frame when that
saves. Compression runs in a thread pool: zstandard releases the GIL while it works,
so `workers` threads really use `workers` cores while the event loop keeps accepting
agents. A DATA's zero test stays on the loop (an EXTENTS' runs with its compression):
comparing with a preallocated zero buffer is a `memcmp` (tens of GB/s) that stops at
the first non-zero byte, cheaper than a hop to a thread.

`InflightDedupe` answers "is this write a second copy of one still in flight?" for one
disk stream, so the process server does not ship the same extent twice while the
master target has not yet acknowledged the first.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import overload

import xxhash
import zstandard

from appliance.storage.compress import compressor
from appliance.wire.framing import buffer_size
from appliance.wire.messages import Data, Encoding, Extent, Extents

# Zero detection compares against this buffer piece by piece. `bytes.startswith` takes
# any buffer (a memoryview into a received frame included) and is a plain memcmp;
# `==` between bytes and a memoryview, `count(0)` or `any()` are 20-200x slower.
_ZERO_CHUNK = 1024 * 1024
_ZEROS = bytes(_ZERO_CHUNK)


def is_zero(payload: bytes | bytearray | memoryview) -> bool:
    """True when every byte of `payload` is zero (an empty payload included)."""
    view = memoryview(payload)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")  # count bytes, not items
    n = len(view)
    if n <= _ZERO_CHUNK:
        return _ZEROS.startswith(view)
    return all(_ZEROS.startswith(view[i : i + _ZERO_CHUNK]) for i in range(0, n, _ZERO_CHUNK))


MIN_LEVEL = -(1 << 17)  # ZSTD_minCLevel(); python-zstandard exports only the maximum


def _compress(payload: bytes | memoryview, level: int) -> tuple[bytes, float]:
    """`payload` compressed at `level` and the CPU seconds this thread spent on it."""
    cctx = compressor(level)
    started = time.thread_time()
    packed = cctx.compress(payload)
    return packed, time.thread_time() - started


def _without_zero_extents(msg: Extents) -> tuple[tuple[Extent, ...], bytes | memoryview]:
    """`msg`'s extents and payload with every all-zero RAW extent made ZERO (the same
    objects when there is none, so the common case copies nothing)."""
    view = memoryview(msg.payload).cast("B")
    at = 0
    zero_at: list[int] = []
    for i, (_, length, kind) in enumerate(msg.extents):
        if kind is Encoding.RAW:
            piece = view[at : at + length]
            if _ZEROS.startswith(piece) if length <= _ZERO_CHUNK else is_zero(piece):
                zero_at.append(i)
            at += length
    if not zero_at:
        return msg.extents, msg.payload
    extents = list(msg.extents)
    for i in zero_at:
        extents[i] = extents[i]._replace(kind=Encoding.ZERO)
    kept: list[memoryview] = []
    at = 0
    for old, new in zip(msg.extents, extents, strict=True):
        if old.kind is Encoding.RAW:
            if new.kind is Encoding.RAW:
                kept.append(view[at : at + old.length])
            at += old.length
    return tuple(extents), b"".join(kept)


def squeeze_extents(msg: Extents, level: int, min_gain: float) -> tuple[Extents, float]:
    """A RAW `msg` with its zero extents made ZERO and its payload one zstd frame when
    that saves (below `min_gain` of the RAW bytes); the CPU seconds this thread spent."""
    started = time.thread_time()
    extents, payload = _without_zero_extents(msg)
    size = buffer_size(payload)
    if size:
        packed = compressor(level).compress(payload)
        if len(packed) < min_gain * size:
            out = Extents(msg.disk_id, msg.seq, extents, Encoding.ZSTD, packed)
            return out, time.thread_time() - started
    if extents is not msg.extents:
        msg = Extents(msg.disk_id, msg.seq, extents, Encoding.RAW, payload)
    return msg, time.thread_time() - started


class Optimizer:
    """Zero elimination and zstd compression of outgoing DATA, off the event loop.

    At most `max_pending` encodes wait for or run in the pool at once (default 4 per
    worker); further `encode` calls wait, so a fast producer cannot grow the
    executor's own queue without bound. Concurrent encodes may finish out of order:
    `encode_stream` keeps the order of a stream, which DATA sequence numbers need.

    Statistics count every message through `encode`/`encode_sync`, pass-throughs
    included: `bytes_in` bytes of the disk changed (an EXTENTS' extents added up),
    `bytes_out` payload bytes produced, `zero_bytes` decoded bytes sent as ZERO (DATA
    or extents), `compress_seconds` worker CPU time; `extents` DATA messages sent per
    encoding, `multi_messages` EXTENTS messages and `multi_extents` the extents in them.
    They are updated on the caller's thread (the loop), never from the pool.
    """

    def __init__(
        self, level: int = 1, workers: int = 2, min_gain: float = 0.97, max_pending: int = 0
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if not 0.0 < min_gain <= 1.0:
            raise ValueError(f"min_gain must be in (0, 1], not {min_gain}")
        self.set_level(level)
        self.min_gain = min_gain
        self.workers = workers
        self.max_pending = max_pending or 4 * workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="optimize")
        # Created lazily: an asyncio.Semaphore belongs to the loop that first waits on it.
        self._slots: asyncio.Semaphore | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.zero_bytes = 0
        self.compress_seconds = 0.0
        self.extents = {enc: 0 for enc in Encoding}  # DATA messages sent per encoding
        self.multi_messages = 0  # EXTENTS messages
        self.multi_extents = 0  # extents in them

    @property
    def level(self) -> int:
        return self._level

    def set_level(self, level: int) -> None:
        """Compression level for encodes started from now on (already running ones keep theirs)."""
        if not MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(
                f"zstd level {level} outside {MIN_LEVEL}..{zstandard.MAX_COMPRESSION_LEVEL}"
            )
        self._level = level

    @property
    def ratio(self) -> float:
        """bytes_in / bytes_out, 1.0 before any input.

        All-zero input divides by one byte rather than by zero: the figure stays a
        finite number for the JSON status.
        """
        if not self.bytes_in:
            return 1.0
        return self.bytes_in / max(self.bytes_out, 1)

    def stats(self) -> dict[str, float | int]:
        """A JSON-ready snapshot for the status RPC."""
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "zero_bytes": self.zero_bytes,
            "ratio": round(self.ratio, 3),
            "compress_seconds": round(self.compress_seconds, 3),
            "level": self._level,
            **{f"extents_{enc.name.lower()}": count for enc, count in self.extents.items()},
            "multi_messages": self.multi_messages,
            "multi_extents": self.multi_extents,
        }

    # -- encoding -----------------------------------------------------------------------

    def _shortcut(self, msg: Data) -> Data | None:
        """The result when no compression is needed: pass-through or ZERO."""
        if msg.encoding is not Encoding.RAW:
            return msg
        if is_zero(msg.payload):
            return Data.zero(msg.disk_id, msg.seq, msg.offset, msg.length)
        return None

    def _choose(self, msg: Data, packed: bytes) -> Data:
        if len(packed) < self.min_gain * msg.length:
            return Data(msg.disk_id, msg.seq, msg.offset, msg.length, Encoding.ZSTD, packed)
        return msg  # not worth the receiver's decompression: send the original bytes

    def _count(self, msg: Data, out: Data, cpu: float = 0.0) -> Data:
        self.bytes_in += msg.length
        self.bytes_out += out.wire_size
        if out.encoding is Encoding.ZERO:
            self.zero_bytes += out.length
        self.extents[out.encoding] += 1
        self.compress_seconds += cpu
        return out

    def _count_extents(self, msg: Extents, out: Extents, cpu: float = 0.0) -> Extents:
        self.bytes_in += msg.length
        self.bytes_out += out.wire_size
        self.zero_bytes += sum(e.length for e in out.extents if e.kind is Encoding.ZERO)
        self.multi_messages += 1
        self.multi_extents += len(out.extents)
        self.compress_seconds += cpu
        return out

    @overload
    def encode_sync(self, msg: Data) -> Data: ...
    @overload
    def encode_sync(self, msg: Extents) -> Extents: ...
    def encode_sync(self, msg: Data | Extents) -> Data | Extents:
        """`encode` on the calling thread (tests, tools); not for concurrent callers."""
        if isinstance(msg, Extents):
            if msg.encoding is not Encoding.RAW or not msg.wire_size:
                return self._count_extents(msg, msg)
            return self._count_extents(msg, *squeeze_extents(msg, self._level, self.min_gain))
        out = self._shortcut(msg)
        if out is not None:
            return self._count(msg, out)
        packed, cpu = _compress(msg.payload, self._level)
        return self._count(msg, self._choose(msg, packed), cpu)

    @overload
    async def encode(self, msg: Data) -> Data: ...
    @overload
    async def encode(self, msg: Extents) -> Extents: ...
    async def encode(self, msg: Data | Extents) -> Data | Extents:
        """`msg` in its cheapest encoding; compression runs in the pool, not on the loop."""
        if isinstance(msg, Extents):
            return await self._encode_extents(msg)
        out = self._shortcut(msg)
        if out is not None:
            return self._count(msg, out)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_pending)
        level = self._level  # fixed at submission, so set_level never races a worker
        async with self._slots:
            loop = asyncio.get_running_loop()
            packed, cpu = await loop.run_in_executor(self._pool, _compress, msg.payload, level)
        return self._count(msg, self._choose(msg, packed), cpu)

    async def _encode_extents(self, msg: Extents) -> Extents:
        # Already compressed, or nothing but ZERO/SAME extents: nothing to gain.
        if msg.encoding is not Encoding.RAW or not msg.wire_size:
            return self._count_extents(msg, msg)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_pending)
        level = self._level
        async with self._slots:
            loop = asyncio.get_running_loop()
            out, cpu = await loop.run_in_executor(
                self._pool, squeeze_extents, msg, level, self.min_gain
            )
        return self._count_extents(msg, out, cpu)

    async def encode_stream(
        self, source: AsyncIterable[Data | Extents], depth: int = 8
    ) -> AsyncIterator[Data | Extents]:
        """Encode a stream with up to `depth` extents in progress, yielding in input order.

        The source is not read further while `depth` encodes are outstanding, so a
        slow consumer slows the source down (back-pressure) instead of queueing.
        """
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        pending: deque[asyncio.Future[Data | Extents]] = deque()
        try:
            async for msg in source:
                pending.append(asyncio.ensure_future(self.encode(msg)))
                if len(pending) >= depth:
                    yield await pending.popleft()
            while pending:
                yield await pending.popleft()
        finally:
            for fut in pending:  # the consumer went away: drop what is still running
                fut.cancel()

    def close(self) -> None:
        """Stop the pool after the running encodes; queued ones are dropped."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Optimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- in-flight dedupe ------------------------------------------------------------------

ZERO_DIGEST = -1  # all-zero content, RAW or ZERO; outside xxh3_128's range
_ZSTD_SEED = 0x5A  # compressed payloads hash apart from raw ones


def content_digest(msg: Data) -> int:
    """A 128-bit digest such that equal digests mean equal bytes written.

    RAW and ZERO forms of the same bytes agree: all-zero content is ZERO_DIGEST,
    without hashing. A ZSTD payload is hashed as it stands, in its own seed space:
    identical frames match, the RAW and ZSTD forms of the same bytes do not. That
    only misses a saving (dedupe runs before compression, where writes are RAW), and
    keeps decompression off the event loop. SAME has no bytes of its own (ValueError).
    """
    if msg.encoding is Encoding.SAME:
        raise ValueError(f"DATA seq {msg.seq}: SAME has no content to digest")
    if msg.encoding is Encoding.ZERO:
        return ZERO_DIGEST
    if msg.encoding is Encoding.ZSTD:
        return int(xxhash.xxh3_128_intdigest(msg.payload, seed=_ZSTD_SEED))
    if is_zero(msg.payload):
        return ZERO_DIGEST
    return int(xxhash.xxh3_128_intdigest(msg.payload))


def _extent_offset(extent: Extent) -> int:
    return extent.offset


@dataclass(slots=True)
class _Write:
    seq: int
    length: int
    digest: int


class InflightDedupe:
    """Suppress a write that repeats one still in flight on the same disk stream.

    Re-sending `msg` is a no-op, and `check` says True, exactly when the most recent
    in-flight write to the same (offset, length) has the same content digest and no
    in-flight write sent after it touched any byte of that range: the master target
    will apply that earlier write (it is resent after a reconnect if need be) and
    nothing after it changes those bytes. "In flight" = recorded by `sent`, not yet
    covered by `acked`. Any doubt answers False, which only costs bandwidth.

    Data structure. Call a sent write *live* when no later sent write overlapped it.
    Only a live write can make `check` say True, and live writes never overlap each
    other (a new write kills every live write it touches). So the live writes are
    disjoint intervals: a dict keyed by start offset answers `check` in O(1), and a
    sorted list of their start offsets finds the ones a new write overlaps with one
    bisect - they are contiguous in that order, and each write dies at most once, so
    `sent` is O(log n) plus amortised O(1) removals. List insert/delete moves pointers
    (O(n), but ~80 KB of memmove at 10k extents, microseconds) - cheaper in CPython
    than any pure-Python balanced tree at these sizes. A FIFO of every in-flight
    (seq, offset) serves `acked` in amortised O(1); memory is bounded by what is in
    flight. The costs are one xxh3 (tens of GB/s) per write, none for zero extents.

    Every DATA of the stream must go through `sent` (or `admit`), whatever its
    encoding, and so must every EXTENTS: a write left out could overlap a live one
    without killing it, and a later SAME would then tell the master target to keep
    bytes that have changed. An EXTENTS only kills the live writes its extents touch
    (whatever their kind) and never becomes live itself: the agent coalesces a block's
    writes before it sends, so an identical 4 KiB rewrite still in flight is rare, and
    hashing and tracking thousands of extents a message would cost on every one.

    Resends: a message whose seq is not above the highest one sent is a resend (after
    a reconnect), and `check` never suppresses it. `sent` with such a seq means the
    stream was rewound: everything is forgotten, which is safe (only fewer skips).
    A SAME frame (the wire's "identical to a write in flight") recorded by `sent`
    repeats the live write it matched; `admit` does check-and-record in one call.
    One instance per disk stream; a message for another disk is a bug (ValueError).
    """

    def __init__(self, disk_id: str | None = None) -> None:
        self.disk_id = disk_id
        self._live: dict[int, _Write] = {}  # start offset -> live write
        self._starts: list[int] = []  # sorted start offsets of self._live
        self._fifo: deque[tuple[int, int]] = deque()  # (seq, offset) of every in-flight write
        self._last_seq = 0
        self._cache: tuple[Data, int] | None = None  # check() then sent() hash once
        self.same_frames = 0  # admit() said no-op
        self.same_bytes = 0

    def __len__(self) -> int:
        """In-flight writes remembered (live or not)."""
        return len(self._fifo)

    def _own(self, msg: Data | Extents) -> None:
        if self.disk_id is None:
            self.disk_id = msg.disk_id
        elif msg.disk_id != self.disk_id:
            raise ValueError(f"dedupe for disk {self.disk_id!r} got a write for {msg.disk_id!r}")

    def _digest(self, msg: Data) -> int:
        if self._cache is not None and self._cache[0] is msg:
            return self._cache[1]
        digest = content_digest(msg)
        self._cache = (msg, digest)
        return digest

    def check(self, msg: Data) -> bool:
        """True when sending `msg` now would be a no-op (see the class docstring)."""
        self._own(msg)
        if msg.length == 0 or msg.seq <= self._last_seq or msg.encoding is Encoding.SAME:
            return False
        live = self._live.get(msg.offset)
        if live is None or live.length != msg.length:
            return False
        return live.digest == self._digest(msg)

    def sent(self, msg: Data | Extents) -> None:
        """Record that `msg` went to the master target (call in sequence order)."""
        self._own(msg)
        if msg.seq <= self._last_seq:
            self.reset()
        self._last_seq = msg.seq
        if isinstance(msg, Extents):
            self._overwritten(msg.extents)
            return
        if msg.length == 0:
            return
        lo, hi = msg.offset, msg.offset + msg.length
        digest: int | None
        if msg.encoding is Encoding.SAME:  # repeats the live write to this range, if any
            live = self._live.get(lo)
            digest = live.digest if live is not None and live.length == msg.length else None
        else:
            digest = self._digest(msg)
        first = self._kill(lo, hi)
        if digest is not None:  # an unknown SAME only kills what it overlaps
            self._starts.insert(first, lo)
            self._live[lo] = _Write(msg.seq, msg.length, digest)
        self._fifo.append((msg.seq, lo))

    def _kill(self, lo: int, hi: int) -> int:
        """Kill the live writes overlapping [lo, hi); returns where `lo` would go in
        the sorted starts."""
        starts = self._starts
        # Live writes are disjoint, so sorted by start they are sorted by end too: the
        # ones overlapping [lo, hi) are the run just before the first start >= hi.
        stop = bisect_left(starts, hi)
        first = stop
        while first > 0:
            prev = starts[first - 1]
            if prev + self._live[prev].length <= lo:
                break
            first -= 1
            del self._live[prev]
        del starts[first:stop]
        return first

    def _overwritten(self, extents: tuple[Extent, ...]) -> None:
        """Kill every live write that one of `extents` (ascending, disjoint) touches.

        Walks whichever is shorter: the live writes inside the message's span (few or
        none while the agent sends EXTENTS only: a bisect or two, whatever the number
        of extents), or the extents (each a `_kill`, like a DATA's)."""
        starts = self._starts
        if not starts:
            return
        lo, hi = extents[0].offset, extents[-1].offset + extents[-1].length
        i = bisect_left(starts, hi)
        if i - bisect_left(starts, lo) >= len(extents):
            for offset, length, _ in extents:
                self._kill(offset, offset + length)
            return
        doomed: list[int] = []
        while i > 0:
            start = starts[i - 1]
            end = start + self._live[start].length
            if end <= lo:
                break
            i -= 1
            # The last extent starting before this write's end overlaps it if any does
            # (extents are disjoint and ascending, so their ends ascend too).
            k = bisect_left(extents, end, key=_extent_offset) - 1
            if k >= 0 and extents[k].offset + extents[k].length > start:
                doomed.append(i)
        for i in doomed:  # descending: earlier indexes stay valid
            del self._live[starts.pop(i)]

    def admit(self, msg: Data) -> bool:
        """The forwarder's one call: True = send `msg`'s bytes; False = it is a no-op.

        For a no-op the forwarder sends a SAME frame in its place (sequence numbers
        stay contiguous, so acks and spool release work unchanged). `msg` is recorded
        as sent either way: a SAME in flight repeats the write it matched.
        """
        same = self.check(msg)
        if same:
            self.same_frames += 1
            self.same_bytes += msg.length
        self.sent(msg)
        return not same

    def acked(self, seq: int) -> None:
        """The master target made everything up to `seq` durable: forget it."""
        fifo = self._fifo
        while fifo and fifo[0][0] <= seq:
            done, offset = fifo.popleft()
            live = self._live.get(offset)
            if live is not None and live.seq == done:
                del self._live[offset]
                del self._starts[bisect_left(self._starts, offset)]

    def reset(self) -> None:
        """Forget everything in flight (the connection that carried it is gone)."""
        self._live.clear()
        self._starts.clear()
        self._fifo.clear()
        self._last_seq = 0
        self._cache = None
