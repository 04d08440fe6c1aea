"""READ_REQUEST / READ_REPLY (failback): their limits, encodings and what decode refuses.

The generic checks (roundtrip through frames, every cut and every extra byte of a
fixed body malformed, fuzzing) cover these two through `FIXED` and `strategies`."""

from __future__ import annotations

import os
import struct

import pytest
import zstandard

from appliance.wire.errors import MalformedBody
from appliance.wire.framing import MAX_BODY, FrameDecoder
from appliance.wire.messages import (
    MAX_READ,
    Encoding,
    ReadReply,
    ReadRequest,
    decode_message,
    encode_message,
)


def body(msg: ReadRequest | ReadReply) -> bytes:
    return b"".join(bytes(p) for p in msg.encode())


def _request_body(offset: int, length: int) -> bytes:
    return struct.pack("!H", 1) + b"d" + struct.pack("!QQI", 1, offset, length)


def _reply_body(offset: int, length: int, encoding: int, payload: bytes) -> bytes:
    head = struct.pack("!H", 1) + b"d" + struct.pack("!QQIB", 1, offset, length, encoding)
    return head + payload


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 0), (0, 511), (1, 512), (0, MAX_READ + 512), (0, 2**32 - 512)],
)
def test_a_read_must_be_sector_aligned_and_bounded(offset: int, length: int) -> None:
    with pytest.raises(MalformedBody, match="READ_REQUEST"):
        ReadRequest.decode(_request_body(offset, length))
    with pytest.raises(ValueError, match="READ_REQUEST"):
        ReadRequest("d", 1, offset, length).encode()
    with pytest.raises(MalformedBody, match="READ_REPLY"):
        ReadReply.decode(_reply_body(offset, length, Encoding.ZERO, b""))


def test_the_largest_read_and_its_raw_reply_fit_a_frame() -> None:
    request = ReadRequest("d" * 1024, 2**64 - 1, 2**64 - 512, MAX_READ)
    assert ReadRequest.decode(body(request)) == request
    reply = ReadReply("d" * 1024, 1, 0, MAX_READ, Encoding.RAW, bytes(MAX_READ))
    frame = b"".join(bytes(p) for p in encode_message(reply))
    assert len(frame) < MAX_BODY
    (decoded,) = [decode_message(f) for f in FrameDecoder().feed(frame)]
    assert decoded == reply


def test_of_picks_the_cheapest_encoding_and_decoded_gives_the_bytes() -> None:
    zero = ReadReply.of("d", 1, 0, bytes(8192))
    assert (zero.encoding, zero.wire_size, zero.decoded()) == (Encoding.ZERO, 0, bytes(8192))
    text = b"failback " * 1024
    text = text[: len(text) // 512 * 512]
    packed = ReadReply.of("d", 2, 512, text)
    assert packed.encoding is Encoding.ZSTD and packed.wire_size < len(text)
    assert bytes(packed.decoded()) == text
    noise = os.urandom(4096)
    raw = ReadReply.of("d", 3, 0, bytearray(noise))
    assert (raw.encoding, raw.length, bytes(raw.decoded())) == (Encoding.RAW, 4096, noise)
    assert ReadReply.decode(body(raw)) == raw


def test_reply_payloads_must_match_their_encoding() -> None:
    bad = [
        (Encoding.RAW, b"x" * 511),  # RAW: exactly `length` bytes
        (Encoding.ZERO, b"x"),  # ZERO: no payload
        (Encoding.ZSTD, b""),  # ZSTD: some payload
        (Encoding.SAME, b""),  # SAME: not a reply encoding
    ]
    for encoding, payload in bad:
        with pytest.raises(MalformedBody, match="READ_REPLY"):
            ReadReply.decode(_reply_body(0, 512, encoding, payload))
        with pytest.raises(ValueError, match="READ_REPLY"):
            ReadReply("d", 1, 0, 512, encoding, payload).encode()
    with pytest.raises(MalformedBody, match="not a valid Encoding"):
        ReadReply.decode(_reply_body(0, 512, 9, b""))


def test_a_zstd_reply_that_lies_about_its_length_is_malformed() -> None:
    short = ReadReply.decode(_reply_body(0, 1024, Encoding.ZSTD, zstandard.compress(b"a" * 512)))
    with pytest.raises(MalformedBody, match="bad zstd"):
        short.decoded()
    # A bomb: a frame that claims far more than the read's length is refused, not inflated.
    bomb = ReadReply.decode(_reply_body(0, 512, Encoding.ZSTD, zstandard.compress(bytes(1 << 26))))
    with pytest.raises(MalformedBody, match="bad zstd"):
        bomb.decoded()
