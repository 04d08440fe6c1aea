"""Fuzz: whatever bytes arrive, the decoders raise WireError subclasses and nothing else.

An exception of any other class escaping here would be a crash in the server's read
path (it is what `Connection` counts on when it turns decode errors into ERROR frames).
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.checksum import crc32c
from appliance.wire.errors import WireError
from appliance.wire.framing import HEADER, FrameDecoder
from appliance.wire.messages import (
    Data,
    Encoding,
    Message,
    Request,
    Response,
    decode_message,
    encode_message,
)
from tests.wire.strategies import MESSAGES

FUZZ = settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)


def exercise(chunks: list[bytes], max_body: int = 4096) -> list[Message]:
    """Decode like a transport delivers, both ways in; use every message like a receiver.

    Even chunks go through feed(), odd ones through get_buffer()/buffer_updated(), so
    both paths, and the switches between them, meet the same bytes.
    """
    decoder = FrameDecoder(max_body=max_body)
    out: list[Message] = []
    try:
        for i, chunk in enumerate(chunks):
            if i % 2 == 0:
                frames = decoder.feed(chunk)
            else:
                frames, pos = [], 0
                while pos < len(chunk):
                    target = decoder.get_buffer()
                    n = min(len(target), len(chunk) - pos)
                    target[:n] = chunk[pos : pos + n]
                    pos += n
                    frames += decoder.buffer_updated(n)
            for frame in frames:
                msg = decode_message(frame)
                if isinstance(msg, Data) and msg.encoding is not Encoding.SAME:
                    msg.decoded()  # SAME carries no bytes: decoded() is a caller's bug there
                elif isinstance(msg, Request | Response):
                    msg.json()
                out.append(msg)
        decoder.eof()
    except WireError:
        pass
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@FUZZ
@given(st.binary(max_size=4096), st.lists(st.integers(0, 10_000), max_size=8))
def test_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    exercise(split(data, cuts))


@FUZZ
@given(
    st.integers(0, 255),
    st.integers(0, 2**16 - 1),
    st.binary(max_size=2048),
    st.lists(st.integers(0, 10_000), max_size=4),
)
def test_any_type_with_any_body_and_a_valid_crc(
    msg_type: int, flags: int, body: bytes, cuts: list[int]
) -> None:
    # Gets past the framing layer every time, so the message decoders see the bytes.
    raw = HEADER.pack(b"SSWP", 1, msg_type, flags, len(body), crc32c(body)) + body
    exercise(split(raw, cuts))


@FUZZ
@given(
    st.lists(MESSAGES, min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.booleans(),
    st.lists(st.integers(0, 10_000), max_size=4),
)
def test_mutated_valid_frames(
    msgs: list[Message],
    flips: list[tuple[int, int]],
    fix_crc: bool,
    cuts: list[int],
) -> None:
    frames = [bytearray(b"".join(bytes(p) for p in encode_message(m))) for m in msgs]
    for i, (pos, value) in enumerate(flips):
        frame = frames[i % len(frames)]
        frame[pos % len(frame)] = value
        if fix_crc:  # mutate the body past the CRC, to reach the message decoders
            body = bytes(frame[HEADER.size :])
            fields = list(HEADER.unpack(bytes(frame[: HEADER.size])))
            fields[4], fields[5] = len(body), crc32c(body)
            frame[: HEADER.size] = HEADER.pack(*fields)
    stream = b"".join(bytes(f) for f in frames)
    exercise(split(stream, cuts), max_body=1 << 20)


@FUZZ
@given(st.binary(min_size=1, max_size=200), st.integers(64 * 1024, 200 * 1024), st.integers())
def test_large_bodies_with_garbage_around_them(garbage: bytes, size: int, cut: int) -> None:
    raw = b"".join(bytes(p) for p in encode_message(Data.raw("d", 1, 0, bytes(size))))
    exercise(split(raw + garbage, [cut, cut * 7]), max_body=1 << 20)


def test_unmutated_frames_all_come_through() -> None:
    msgs: list[Message] = [Request.make(1, "status"), Data.zero("d", 1, 0, 512)]
    stream = b"".join(b"".join(bytes(p) for p in encode_message(m)) for m in msgs)
    assert exercise(split(stream, [3, 17, 40])) == msgs
