"""Hypothesis strategies for every wire message (shared by the roundtrip and fuzz tests)."""

from __future__ import annotations

import json

import zstandard
from hypothesis import strategies as st

from appliance.wire.errors import ErrorCode
from appliance.wire.messages import (
    DIGEST_SIZE,
    MAX_DIGEST_CHUNK_SIZE,
    MAX_EXTENT,
    MAX_READ,
    MAX_STR,
    Ack,
    Data,
    DigestReply,
    DigestRequest,
    DiskOpened,
    Encoding,
    Error,
    Extent,
    Extents,
    Hello,
    Message,
    OpenDisk,
    Ping,
    Pong,
    ReadReply,
    ReadRequest,
    Request,
    Response,
    Tag,
    TagKind,
    Welcome,
)

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
SEQ = st.integers(1, 2**64 - 1)


def _fits(text: str) -> bool:
    return len(text.encode()) <= MAX_STR


# Any valid text, including multi-byte characters, up to the 1024-byte limit.
TEXT = st.text(st.characters(codec="utf-8"), max_size=300).filter(_fits)
JSON = st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4)


@st.composite
def data_messages(draw: st.DrawFn) -> Data:
    enc = draw(st.sampled_from(Encoding))
    disk, seq, offset = draw(TEXT), draw(SEQ), draw(U64)
    if enc is Encoding.RAW:
        return Data.raw(disk, seq, offset, draw(st.binary(max_size=2048)))
    if enc in (Encoding.ZERO, Encoding.SAME):
        return Data(disk, seq, offset, draw(st.integers(0, MAX_EXTENT)), enc, b"")
    return Data.compressed(disk, seq, offset, draw(st.binary(max_size=2048)))


# Any valid chunk size: a positive multiple of 512 up to the limit.
CHUNK_SIZE = st.integers(1, MAX_DIGEST_CHUNK_SIZE // 512).map(lambda n: n * 512)
# Counts stay small so a message fits the fuzz tests' 4 KiB frames; the limit itself
# is tested on its own.
CHUNKS = st.lists(U64, max_size=40).map(tuple)
DIGESTS = st.lists(
    st.tuples(U64, st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)), max_size=40
).map(tuple)

SECTOR_OFFSET = st.integers(0, (2**64 - 1) // 512).map(lambda n: n * 512)
READ_LENGTH = st.integers(1, MAX_READ // 512).map(lambda n: n * 512)


@st.composite
def read_replies(draw: st.DrawFn) -> ReadReply:
    disk, request_id, offset = draw(TEXT), draw(U64), draw(SECTOR_OFFSET)
    enc = draw(st.sampled_from([Encoding.RAW, Encoding.ZSTD, Encoding.ZERO]))
    if enc is Encoding.ZERO:
        return ReadReply(disk, request_id, offset, draw(READ_LENGTH), enc, b"")
    data = draw(st.binary(min_size=1, max_size=4).map(lambda b: b * 512))  # 512..2048 bytes
    if enc is Encoding.RAW:
        return ReadReply(disk, request_id, offset, len(data), enc, data)
    return ReadReply(disk, request_id, offset, len(data), enc, zstandard.compress(data))


@st.composite
def extents_messages(draw: st.DrawFn) -> Extents:
    """Ascending, non-overlapping extents of every kind; the payload RAW or zstd."""
    disk, seq = draw(TEXT), draw(SEQ)
    kinds = st.sampled_from([Encoding.RAW, Encoding.ZERO, Encoding.SAME])
    specs = draw(st.lists(st.tuples(st.integers(0, 4096), st.integers(1, 64), kinds),
                          min_size=1, max_size=6))  # fmt: skip
    extents, data, end = [], b"", draw(st.integers(0, 2**40))
    for gap, sectors, kind in specs:
        # RAW extents stay at 512 bytes so a message fits the fuzz tests' frames.
        length = 512 if kind is Encoding.RAW else sectors * 512
        extents.append(Extent(end + gap * 512, length, kind))
        end = extents[-1].offset + length
        if kind is Encoding.RAW:
            data += draw(st.binary(min_size=4, max_size=4)) * 128
    if data and draw(st.booleans()):
        return Extents(disk, seq, tuple(extents), Encoding.ZSTD, zstandard.compress(data))
    return Extents.of(disk, seq, extents, data)


MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, TEXT, TEXT),
    st.builds(Welcome, TEXT, U64, U32),
    st.builds(OpenDisk, TEXT, TEXT, U64),
    st.builds(DiskOpened, TEXT, U64, U64),
    data_messages(),
    st.builds(Tag, TEXT, SEQ, TEXT, st.sampled_from(TagKind), U64),
    st.builds(Ack, TEXT, U64),
    st.builds(Error, st.sampled_from(ErrorCode) | st.integers(17, 2**16 - 1), TEXT),
    st.builds(Ping, U64),
    st.builds(Pong, U64),
    st.builds(Request, U64, TEXT, JSON.map(lambda d: json.dumps(d).encode()) | st.just(b"")),
    st.builds(Response, U64, st.booleans(), st.binary(max_size=256)),
    st.builds(DigestRequest, TEXT, U64, CHUNK_SIZE, CHUNKS),
    st.builds(DigestReply, TEXT, U64, CHUNK_SIZE, DIGESTS),
    st.builds(ReadRequest, TEXT, U64, SECTOR_OFFSET, READ_LENGTH),
    read_replies(),
    extents_messages(),
)
