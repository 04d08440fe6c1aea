"""Packing extents into EXTENTS messages: every message is valid on the wire (it goes
through real frames and decode), ascending, inside the limits; all-zero pieces become
ZERO extents; applied in order the messages write exactly the source's bytes at the
extents' offsets and nothing else."""

from __future__ import annotations

import os
import random

import pytest

from agent.packing import MAX_COUNT, MAX_PAYLOAD, Packed, is_zero, pack
from appliance.wire.framing import FrameDecoder
from appliance.wire.messages import (
    MAX_EXTENT,
    Data,
    Encoding,
    Extent,
    Extents,
    decode_message,
    encode_message,
)

KIB = 1024
SIZE = 64 << 20
FILL = 0xA5  # what the replica holds where no extent writes


def source_image(zero_blocks: set[int]) -> bytearray:
    """Random bytes, with the 4 KiB blocks in `zero_blocks` all zero."""
    image = bytearray(os.urandom(SIZE))
    for block in zero_blocks:
        image[block * 4 * KIB : (block + 1) * 4 * KIB] = bytes(4 * KIB)
    return image


def gather(image: bytearray, extents: list[tuple[int, int]]) -> memoryview:
    """The extents' bytes back to back, as pread_extents leaves them."""
    return memoryview(b"".join(image[o : o + n] for o, n in extents))


def through_wire(packed: list[Packed]) -> list[Data | Extents]:
    """Each as a message with its own seq, encoded into a frame and decoded back."""
    out: list[Data | Extents] = []
    for seq, p in enumerate(packed, start=1):
        raw = b"".join(bytes(b) for b in encode_message(p.message("d", seq)))
        (frame,) = FrameDecoder().feed(raw)
        msg = decode_message(frame)
        assert isinstance(msg, Data | Extents) and msg.seq == seq
        out.append(msg)
    return out


def apply(messages: list[Data | Extents]) -> bytearray:
    replica = bytearray([FILL]) * SIZE
    for msg in messages:
        pieces: list[tuple[Extent, bytes | memoryview | None]]
        if isinstance(msg, Data):
            pieces = [(Extent(msg.offset, msg.length, msg.encoding), msg.payload)]
        else:
            pieces = list(msg.pieces())
        for ext, view in pieces:
            if ext.kind is Encoding.ZERO:
                replica[ext.offset : ext.offset + ext.length] = bytes(ext.length)
            else:
                assert view is not None and ext.kind is Encoding.RAW
                replica[ext.offset : ext.offset + ext.length] = view
    return replica


def expected(image: bytearray, extents: list[tuple[int, int]]) -> bytearray:
    want = bytearray([FILL]) * SIZE
    for offset, length in extents:
        want[offset : offset + length] = image[offset : offset + length]
    return want


def check_limits(packed: list[Packed], max_payload: int, max_count: int) -> None:
    end = 0
    for p in packed:
        assert 0 < len(p.extents) <= max_count
        assert len(p.payload) == sum(e.length for e in p.extents if e.kind is Encoding.RAW)
        assert len(p.payload) <= max_payload
        for ext in p.extents:
            assert ext.offset >= end and 0 < ext.length <= max_payload  # ascending, no overlap
            end = ext.offset + ext.length


def test_a_4k_delta_packs_into_few_valid_messages_that_reproduce_the_source() -> None:
    rng = random.Random(1)
    blocks = sorted(rng.sample(range(SIZE // (4 * KIB)), 5000))
    zeros = set(blocks[::37])  # some written blocks are all zero
    image = source_image(zeros)
    extents: list[tuple[int, int]] = []
    for block in blocks:  # adjacent blocks coalesced, as DirtyMap.extents() gives them
        if extents and extents[-1][0] + extents[-1][1] == block * 4 * KIB:
            extents[-1] = (extents[-1][0], extents[-1][1] + 4 * KIB)
        else:
            extents.append((block * 4 * KIB, 4 * KIB))
    packed = list(pack(extents, gather(image, extents)))
    check_limits(packed, MAX_PAYLOAD, MAX_COUNT)
    messages = through_wire(packed)
    assert all(isinstance(m, Extents) for m in messages[:-1])
    all_zero = {o for o, n in extents if image[o : o + n].count(0) == n}
    assert 0 < len(all_zero) < len(zeros)  # other zero blocks sit inside longer extents
    raw = sum(n for o, n in extents if o not in all_zero)
    assert sum(p.raw_bytes for p in packed) == raw  # zero extents send no bytes
    kinds = {e.offset: e.kind for p in packed for e in p.extents}
    assert {o for o, kind in kinds.items() if kind is Encoding.ZERO} == all_zero
    # Full messages, not one per extent (a message ends short when the next extent
    # would not fit: extents here are 4 KiB to a few blocks long).
    assert len(messages) <= raw // (MAX_PAYLOAD - 64 * KIB) + 1
    assert apply(messages) == expected(image, extents)


def test_raw_runs_are_sent_as_slices_of_the_read_buffer() -> None:
    image = source_image(set())
    extents = [(i * 16 * KIB, 4 * KIB) for i in range(600)]  # 2.3 MiB: three messages
    data = gather(image, extents)
    packed = list(pack(extents, data))
    assert [len(p.extents) for p in packed] == [256, 256, 88]
    for p in packed:
        assert isinstance(p.payload, memoryview) and p.payload.obj is data.obj  # no copy
    # A ZERO extent between RAW ones: the RAW bytes are no longer adjacent, so joined.
    zeroed = source_image({4})
    gapped = [(0, 4 * KIB), (16 * KIB, 4 * KIB), (32 * KIB, 4 * KIB)]
    (one,) = pack(gapped, gather(zeroed, gapped))
    assert [e.kind for e in one.extents] == [Encoding.RAW, Encoding.ZERO, Encoding.RAW]
    assert bytes(one.payload) == zeroed[: 4 * KIB] + zeroed[32 * KIB : 36 * KIB]
    assert apply(through_wire([one])) == expected(zeroed, gapped)


def test_one_extent_goes_as_data() -> None:
    image = source_image({1})
    (raw,) = through_wire(list(pack([(0, 4 * KIB)], gather(image, [(0, 4 * KIB)]))))
    assert isinstance(raw, Data) and raw.encoding is Encoding.RAW
    assert bytes(raw.payload) == image[: 4 * KIB]
    (zero,) = through_wire(list(pack([(4 * KIB, 4 * KIB)], gather(image, [(4 * KIB, 4 * KIB)]))))
    assert isinstance(zero, Data) and zero.encoding is Encoding.ZERO
    assert (zero.offset, zero.length) == (4 * KIB, 4 * KIB)


def test_exactly_at_the_limits_and_one_past_them() -> None:
    image = source_image(set(range(0, 2048, 2)))  # even blocks zero, odd random
    odd = [((2 * i + 1) * 4 * KIB, 4 * KIB) for i in range(1024)]
    even = [(2 * i * 4 * KIB, 4 * KIB) for i in range(1024)]
    # 8 RAW extents of 4 KiB fill a 32 KiB payload exactly; the 9th opens a message.
    for count, sizes in ((8, [8]), (9, [8, 1])):
        packed = list(pack(odd[:count], gather(image, odd[:count]), max_payload=32 * KIB))
        assert [len(p.extents) for p in packed] == sizes
        check_limits(packed, 32 * KIB, MAX_COUNT)
    # ZERO extents cost no payload but count: max_count of them fit, one more does not.
    for count, sizes in ((100, [100]), (101, [100, 1])):
        packed = list(pack(even[:count], gather(image, even[:count]), max_count=100))
        assert [len(p.extents) for p in packed] == sizes
        assert all(p.payload == b"" for p in packed)
        assert apply(through_wire(packed)) == expected(image, even[:count])
    # The defaults at their limits: MAX_COUNT zero extents in one message.
    many = [(i * 8 * KIB, 4 * KIB) for i in range(MAX_COUNT + 1)]
    packed = list(pack(many, memoryview(bytes(len(many) * 4 * KIB))))
    assert [len(p.extents) for p in packed] == [MAX_COUNT, 1]


def test_an_extent_larger_than_a_message_is_split() -> None:
    image = source_image(set(range(1024, 1024 + 768)))  # 3 MiB of zeros from 4 MiB on
    big = [(0, 4 << 20), (4 << 20, 3 << 20), (10 << 20, 2 << 20)]
    packed = list(pack(big[:1] + big[2:], gather(image, big[:1] + big[2:])))
    check_limits(packed, MAX_PAYLOAD, MAX_COUNT)
    assert [e.length for p in packed for e in p.extents] == [MAX_PAYLOAD] * 6
    assert apply(through_wire(packed)) == expected(image, big[:1] + big[2:])
    zero = list(pack(big[1:2], gather(image, big[1:2])))  # long zero runs: 1 MiB pieces
    assert [e.kind for p in zero for e in p.extents] == [Encoding.ZERO] * 3
    assert len(zero) == 1 and zero[0].payload == b""
    assert apply(through_wire(zero)) == expected(image, big[1:2])
    # The largest a message may carry is MAX_EXTENT.
    assert [len(p.extents) for p in pack([(0, 8 << 20)], memoryview(bytes(8 << 20)),
                                         max_payload=MAX_EXTENT)] == [1]  # fmt: skip


def test_bad_input_is_refused() -> None:
    data = memoryview(bytes(64 * KIB))
    with pytest.raises(ValueError, match="not after"):
        list(pack([(8 * KIB, 4 * KIB), (0, 4 * KIB)], data))
    with pytest.raises(ValueError, match="not after"):
        list(pack([(0, 8 * KIB), (4 * KIB, 4 * KIB)], data))
    with pytest.raises(ValueError, match="empty"):
        list(pack([(0, 0)], data))
    with pytest.raises(ValueError, match="more than"):
        list(pack([(0, 128 * KIB)], data))
    with pytest.raises(ValueError, match="max_payload"):
        list(pack([(0, 4 * KIB)], data, max_payload=MAX_EXTENT + 1))
    with pytest.raises(ValueError, match="max_count"):
        list(pack([(0, 4 * KIB)], data, max_count=0))


def test_is_zero_looks_at_every_byte() -> None:
    assert is_zero(memoryview(bytes(4 * KIB)))
    assert is_zero(memoryview(b"\0"))
    assert not is_zero(memoryview(b"\1"))
    for at in (0, 15, 16, 4095):  # in the probe, just past it, at the very end
        block = bytearray(4 * KIB)
        block[at] = 1
        assert not is_zero(memoryview(block)), at
