"""Packing a disk's changed extents into EXTENTS messages (many changes, one seq).

At 4 KiB tracking granularity a delta is thousands of small extents; one DATA frame
each cost more downstream (a frame, a spool record, a forward, an apply call) than
the bytes. `pack` groups consecutive extents into messages of at most MAX_PAYLOAD
RAW bytes and MAX_COUNT extents, well inside the receiver's 8 MiB frame limit and
its window. The extents' bytes come back to back in one buffer (`pread_extents`
reads them so): a message whose RAW extents are consecutive there sends a slice of
that buffer as its payload, uncopied; only a ZERO extent between two RAW ones makes
it join the pieces.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from agent.replicator_disk import split
from appliance.wire.messages import (
    MAX_EXTENT,
    MAX_EXTENTS_PER_MESSAGE,
    Data,
    Encoding,
    Extent,
    Extents,
)

MAX_PAYLOAD = 1 << 20  # RAW bytes per message at most (and the longest piece)
MAX_COUNT = 4096  # extents per message at most (a 53 KB table)
_PROBE = 16  # leading bytes compared first by `is_zero`
_ZEROS = bytes(_PROBE)


def is_zero(view: memoryview) -> bool:
    """Whether every byte of `view` (format "B") is zero. Data that is not zero almost
    always differs in its first bytes, compared without a copy; only a zero prefix pays
    for the full count (a copy: bytes.count is the fastest whole-buffer test measured,
    0.3 ms/MiB against 0.8 for a memoryview comparison and 2.7 for a regex)."""
    head = view[:_PROBE]
    if head != _ZEROS[: len(head)]:
        return False
    return len(view) <= _PROBE or view.tobytes().count(0) == len(view)


@dataclass(frozen=True, slots=True)
class Packed:
    """One message's worth: ascending extents and the RAW ones' bytes back to back."""

    extents: tuple[Extent, ...]
    payload: bytes | memoryview

    def message(self, disk_id: str, seq: int) -> Data | Extents:
        """DATA for a lone extent (what receivers have always taken), else EXTENTS."""
        if len(self.extents) == 1:
            offset, length, kind = self.extents[0]
            if kind is Encoding.ZERO:
                return Data.zero(disk_id, seq, offset, length)
            return Data.raw(disk_id, seq, offset, self.payload)
        return Extents.of(disk_id, seq, self.extents, self.payload)

    @property
    def raw_bytes(self) -> int:
        return len(self.payload)


def pack(
    extents: Iterable[tuple[int, int]],
    data: memoryview,
    *,
    max_payload: int = MAX_PAYLOAD,
    max_count: int = MAX_COUNT,
) -> Iterator[Packed]:
    """Group `extents` ((offset, length), ascending, not overlapping), whose bytes are
    back to back in `data`, into messages in order. An extent longer than
    `max_payload` is split into pieces of at most that; an all-zero piece becomes a
    ZERO extent (no bytes sent, counted against `max_count` only)."""
    if not 0 < max_payload <= MAX_EXTENT:
        raise ValueError(f"max_payload {max_payload} is not 1..{MAX_EXTENT}")
    if not 0 < max_count <= MAX_EXTENTS_PER_MESSAGE:
        raise ValueError(f"max_count {max_count} is not 1..{MAX_EXTENTS_PER_MESSAGE}")
    data = data.cast("B") if data.format != "B" else data
    group: list[Extent] = []
    segments: list[list[int]] = []  # [start, end) of RAW bytes in `data`, joined if adjacent
    payload = position = end = 0
    for offset, length in extents:
        if length <= 0 or offset < end:
            raise ValueError(f"extent ({offset}, {length}) is empty or not after {end}")
        if position + length > len(data):
            raise ValueError(f"the extents need more than the {len(data)} bytes given")
        for at, size in split(offset, length, max_payload):
            zero = is_zero(data[position : position + size])
            full = len(group) == max_count or (not zero and payload + size > max_payload)
            if group and full:
                yield _packed(group, segments, data)
                group, segments, payload = [], [], 0
            if zero:
                group.append(Extent(at, size, Encoding.ZERO))
            else:
                group.append(Extent(at, size, Encoding.RAW))
                payload += size
                if segments and segments[-1][1] == position:
                    segments[-1][1] = position + size
                else:
                    segments.append([position, position + size])
            position += size
        end = offset + length
    if group:
        yield _packed(group, segments, data)


def _packed(group: list[Extent], segments: list[list[int]], data: memoryview) -> Packed:
    if not segments:
        payload: bytes | memoryview = b""
    elif len(segments) == 1:
        payload = data[segments[0][0] : segments[0][1]]
    else:
        payload = b"".join(data[start:stop] for start, stop in segments)
    return Packed(tuple(group), payload)
