"""Framing: whole frames out, partial input kept, and each kind of bad input its own error."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.checksum import crc32c
from appliance.wire.errors import (
    BadCrc,
    BadMagic,
    BadVersion,
    ErrorCode,
    FrameTooLarge,
    MalformedBody,
    MalformedFrame,
    TruncatedFrame,
    UnknownType,
)
from appliance.wire.framing import (
    DIRECT,
    HEADER,
    MAGIC,
    MAX_BODY,
    VERSION,
    Frame,
    FrameDecoder,
    encode_frame,
)
from appliance.wire.messages import Data, Hello, Message, Ping, decode_message, encode_message
from tests.wire.strategies import MESSAGES


def frame_bytes(msg_type: int, body: bytes, *, flags: int = 0) -> bytes:
    return b"".join(encode_frame(msg_type, [body], flags))


def header(
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    msg_type: int = 9,
    length: int = 8,
    crc: int = 0,
) -> bytes:
    return HEADER.pack(magic, version, msg_type, 0, length, crc)


def test_header_layout_is_the_documented_one() -> None:
    raw = frame_bytes(7, b"abc", flags=0x0102)
    assert raw[:4] == b"SSWP"
    assert raw[4] == 1
    assert raw[5] == 7
    assert raw[6:8] == b"\x01\x02"
    assert struct.unpack("!I", raw[8:12])[0] == 3
    assert struct.unpack("!I", raw[12:16])[0] == crc32c(b"abc")
    assert raw[16:] == b"abc"


def test_encode_does_not_copy_payloads() -> None:
    payload = memoryview(bytearray(b"x" * 4096))
    parts = encode_frame(5, [b"head", payload])
    assert parts[2] is payload
    assert crc32c(b"head" + bytes(payload)) == HEADER.unpack(parts[0])[5]


def test_encode_refuses_a_body_over_the_maximum() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(5, [b"x" * 11], max_body=10)
    with pytest.raises(FrameTooLarge):
        encode_frame(5, [bytes(MAX_BODY), b"x"])


def test_byte_by_byte_feed_reassembles() -> None:
    msgs: list[Message] = [Hello("p", "p1"), Ping(42), Data.raw("d", 1, 0, bytes(range(256)) * 4)]
    stream = b"".join(b"".join(encode_message(m)) for m in msgs)
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(stream)):
        frames += decoder.feed(stream[i : i + 1])
    assert [decode_message(f) for f in frames] == msgs
    assert decoder.buffered == 0
    decoder.eof()  # nothing pending: a clean end


def test_many_frames_in_one_feed() -> None:
    msgs = [Ping(i) for i in range(500)]
    stream = b"".join(b"".join(encode_message(m)) for m in msgs)
    frames = FrameDecoder().feed(stream)
    assert [decode_message(f) for f in frames] == msgs


def test_large_body_in_pieces_and_a_partial_next_frame() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    one = b"".join(encode_message(Data.raw("d", 1, 0, payload)))
    two = b"".join(encode_message(Ping(1)))
    stream = one + two[:5]
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for i in range(0, len(stream), 65536):
        frames += decoder.feed(memoryview(stream)[i : i + 65536])
    assert len(frames) == 1
    msg = decode_message(frames[0])
    assert isinstance(msg, Data) and msg.payload == payload
    assert decoder.buffered == 5
    assert decoder.feed(two[5:]) == [Frame(9, 0, two[16:])]


def test_empty_feed_is_need_more_not_an_error() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"SS") == []
    assert decoder.buffered == 2


def test_truncated_at_eof() -> None:
    raw = frame_bytes(9, b"12345678")
    for cut in (1, 15, 16, len(raw) - 1):
        decoder = FrameDecoder()
        assert decoder.feed(raw[:cut]) == []
        with pytest.raises(TruncatedFrame) as info:
            decoder.eof()
        assert info.value.code is ErrorCode.TRUNCATED


def test_oversized_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_body=1024)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(header(length=1025))  # not one byte of the body has arrived
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert FrameDecoder(max_body=1024).feed(header(length=1024)) == []  # at the limit: wait


def test_wrong_magic() -> None:
    with pytest.raises(BadMagic) as info:
        FrameDecoder().feed(header(magic=b"HTTP"))
    assert info.value.code is ErrorCode.BAD_MAGIC


def test_wrong_version() -> None:
    with pytest.raises(BadVersion) as info:
        FrameDecoder().feed(header(version=2))
    assert info.value.code is ErrorCode.BAD_VERSION


def test_bad_crc() -> None:
    raw = bytearray(frame_bytes(9, b"12345678"))
    raw[-1] ^= 0x01
    with pytest.raises(BadCrc) as info:
        FrameDecoder().feed(bytes(raw))
    assert info.value.code is ErrorCode.BAD_CRC


def test_unknown_type_is_a_message_error_not_a_framing_one() -> None:
    frames = FrameDecoder().feed(frame_bytes(200, b"whatever"))
    assert frames == [Frame(200, 0, b"whatever")]
    with pytest.raises(UnknownType) as info:
        decode_message(frames[0])
    assert info.value.code is ErrorCode.UNKNOWN_TYPE


def test_malformed_body() -> None:
    (frame,) = FrameDecoder().feed(frame_bytes(9, b"\x00\x01"))  # PING needs 8 bytes
    with pytest.raises(MalformedBody) as info:
        decode_message(frame)
    assert info.value.code is ErrorCode.MALFORMED_BODY


def test_the_errors_are_distinct_classes() -> None:
    classes = {TruncatedFrame, FrameTooLarge, BadMagic, BadVersion, BadCrc, UnknownType}
    classes.add(MalformedBody)
    assert len({c.code for c in classes}) == len(classes) == 7
    assert all(issubclass(c, MalformedFrame) for c in classes)


def test_good_frames_before_a_bad_one_are_kept_and_the_decoder_stays_failed() -> None:
    good = frame_bytes(9, bytes(8))
    decoder = FrameDecoder()
    with pytest.raises(BadMagic) as info:
        decoder.feed(good + good + header(magic=b"XXXX"))
    assert info.value.frames == [Frame(9, 0, bytes(8))] * 2
    with pytest.raises(BadMagic):
        decoder.feed(good)
    with pytest.raises(BadMagic):
        decoder.eof()


def drive_buffered(decoder: FrameDecoder, stream: bytes, sizes: list[int]) -> list[Frame]:
    """Feed `stream` the way a BufferedProtocol transport does, in pieces of `sizes`."""
    frames: list[Frame] = []
    pos, i = 0, 0
    while pos < len(stream):
        target = decoder.get_buffer(-1)
        assert len(target) > 0  # an empty buffer would stall uvloop's TLS reader
        n = min(len(target), sizes[i % len(sizes)], len(stream) - pos)
        target[:n] = stream[pos : pos + n]
        pos += n
        i += 1
        frames += decoder.buffer_updated(n)
    return frames


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        MESSAGES
        | st.builds(
            lambda seq, size: Data.raw("big", seq, 0, bytes([seq % 256]) * size),
            st.integers(1, 1000),
            st.integers(DIRECT - 100, 3 * DIRECT),
        ),
        min_size=1,
        max_size=12,
    ),
    st.lists(st.integers(1, 300_000), min_size=1, max_size=6),
)
def test_buffered_reads_give_the_same_frames_as_feed(msgs: list[Message], sizes: list[int]) -> None:
    stream = b"".join(bytes(p) for m in msgs for p in encode_message(m))
    buffered = drive_buffered(FrameDecoder(), stream, sizes)
    fed: list[Frame] = []
    decoder = FrameDecoder()
    for i in range(0, len(stream), sizes[0]):
        fed += decoder.feed(stream[i : i + sizes[0]])
    assert buffered == fed
    assert [decode_message(f) for f in buffered] == msgs
    assert all(type(f.body) is bytes for f in buffered)


def test_a_large_body_is_read_in_place() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    stream = b"".join(bytes(p) for p in encode_message(Data.raw("d", 1, 0, payload)))
    decoder = FrameDecoder()
    first = decoder.get_buffer()
    first[:1000] = stream[:1000]
    assert decoder.buffer_updated(1000) == []
    # From here on the transport writes straight into the body: one buffer, its size.
    target = decoder.get_buffer()
    assert len(target) == len(stream) - 1000
    target[:] = stream[1000:]
    (frame,) = decoder.buffer_updated(len(target))
    assert decode_message(frame) == Data.raw("d", 1, 0, payload)
    assert decoder.buffered == 0


def test_buffered_path_refuses_bad_input_too() -> None:
    with pytest.raises(FrameTooLarge):
        drive_buffered(FrameDecoder(max_body=100), header(length=101), [7])
    raw = bytearray(b"".join(bytes(p) for p in encode_message(Data.raw("d", 1, 0, bytes(DIRECT)))))
    raw[-1] ^= 0xFF  # corrupt the end of a large, in-place body
    decoder = FrameDecoder()
    with pytest.raises(BadCrc):
        drive_buffered(decoder, bytes(raw), [4096])
    with pytest.raises(BadCrc):
        decoder.get_buffer()
