"""Messages: every type survives a roundtrip; short, long and invalid bodies are refused."""

from __future__ import annotations

import struct

import pytest
import zstandard
from hypothesis import given, settings

from appliance import digest as chunk_digests
from appliance.wire.errors import ErrorCode, InvalidRequest, MalformedBody
from appliance.wire.framing import FrameDecoder
from appliance.wire.messages import (
    DIGEST_SIZE,
    MAX_DIGEST_CHUNK_SIZE,
    MAX_DIGEST_CHUNKS,
    MAX_EXTENT,
    MAX_EXTENTS_PER_MESSAGE,
    MAX_STR,
    MESSAGE_TYPES,
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
    MsgType,
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
    decode_message,
    encode_message,
)
from tests.wire.strategies import MESSAGES

# One of each whose body has no open-ended tail: any cut or extra byte is malformed.
FIXED: list[Message] = [
    Hello("process", "ps-1"),
    Welcome("target-1", 4 << 20, 8 << 20),
    OpenDisk("disk-0", "machine-é", 1 << 40),
    DiskOpened("disk-0", 17, 1 << 40),
    Tag("disk-0", 9, "tag-1", TagKind.APP, 1_700_000_000_000_000_000),
    Ack("disk-0", 12),
    Error(ErrorCode.OUT_OF_WINDOW, "gap"),
    Ping(1),
    Pong(2**64 - 1),
    Data.raw("disk-0", 3, 4096, b"x" * 512),
    Data.zero("disk-0", 4, 8192, 65536),
    DigestRequest("disk-0", 5, 65536, (0, 3, 2**64 - 1)),
    DigestRequest("disk-0", 6, 512, ()),
    DigestReply("disk-0", 5, 65536, ((0, b"\x01" * 16), (3, bytes(16)))),
    ReadRequest("disk-0", 8, 1 << 30, 4 << 20),
    ReadReply("disk-0", 8, 4096, 512, Encoding.RAW, b"r" * 512),
    ReadReply("disk-0", 9, 0, 4 << 20, Encoding.ZERO, b""),
    Extents.of(
        "disk-0",
        10,
        [
            Extent(0, 512, Encoding.RAW),
            Extent(4096, 8192, Encoding.ZERO),
            Extent(1 << 20, 512, Encoding.SAME),
        ],
        b"e" * 512,
    ),
    Extents.of("disk-0", 11, [Extent(8192, 4096, Encoding.ZERO)], b""),
]


def body(msg: Message) -> bytes:
    return b"".join(bytes(p) for p in msg.encode())


@settings(max_examples=400)
@given(MESSAGES)
def test_roundtrip_through_frames(msg: Message) -> None:
    frames = FrameDecoder().feed(b"".join(bytes(p) for p in encode_message(msg)))
    assert len(frames) == 1
    assert frames[0].type == msg.TYPE
    assert decode_message(frames[0]) == msg
    assert type(msg).decode(body(msg)) == msg


def test_every_type_has_a_class_and_a_strategy_covers_it() -> None:
    assert set(MESSAGE_TYPES) == set(MsgType)
    assert {type(m) for m in FIXED} | {Request, Response} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", FIXED, ids=lambda m: type(m).__name__)
def test_short_and_long_bodies_are_malformed(msg: Message) -> None:
    raw = body(msg)
    for cut in range(len(raw)):
        with pytest.raises(MalformedBody):
            type(msg).decode(raw[:cut])
    with pytest.raises(MalformedBody):
        type(msg).decode(raw + b"\x00")


@pytest.mark.parametrize("cls", [Request, Response])
def test_open_ended_bodies_still_need_their_fixed_part(cls: type[Request | Response]) -> None:
    msg = Request.make(7, "status") if cls is Request else Response.make(7, {"ok": 1})
    raw = body(msg)
    fixed = 8 + (2 + len("status") if cls is Request else 1)
    for cut in range(fixed):
        with pytest.raises(MalformedBody):
            cls.decode(raw[:cut])


def test_invalid_utf8_is_malformed() -> None:
    raw = struct.pack("!H", 2) + b"\xff\xfe" + struct.pack("!H", 1) + b"n"
    with pytest.raises(MalformedBody, match="UTF-8"):
        Hello.decode(raw)


def test_strings_are_limited_to_1024_bytes() -> None:
    assert Hello.decode(body(Hello("x" * MAX_STR, ""))).role == "x" * MAX_STR
    with pytest.raises(ValueError, match="exceeds"):
        Hello("x" * (MAX_STR + 1), "").encode()
    raw = struct.pack("!H", MAX_STR + 1) + b"x" * (MAX_STR + 1) + struct.pack("!H", 0)
    with pytest.raises(MalformedBody, match="exceeds"):
        Hello.decode(raw)


def test_enums_and_sequence_zero_are_checked() -> None:
    raw = bytearray(body(Data.zero("d", 1, 0, 512)))
    raw[-1] = 9  # encoding
    with pytest.raises(MalformedBody, match="Encoding"):
        Data.decode(bytes(raw))
    tag = bytearray(body(Tag("d", 1, "t", TagKind.CRASH, 5)))
    tag[-9] = 7  # kind
    with pytest.raises(MalformedBody, match="TagKind"):
        Tag.decode(bytes(tag))
    for zero_seq in (Data.zero("d", 1, 0, 512), Tag("d", 1, "t", TagKind.CRASH, 5)):
        raw = bytearray(body(zero_seq))
        raw[3 + 7] = 0  # the low byte of seq (after a 1-char disk id)
        with pytest.raises(MalformedBody, match="start at 1"):
            type(zero_seq).decode(bytes(raw))


def test_data_payload_must_match_its_encoding() -> None:
    def raw_body(length: int, encoding: int, payload: bytes) -> bytes:
        return struct.pack("!H", 1) + b"d" + struct.pack("!QQIB", 1, 0, length, encoding) + payload

    with pytest.raises(MalformedBody, match="RAW"):
        Data.decode(raw_body(10, Encoding.RAW, b"x" * 9))
    with pytest.raises(MalformedBody, match="ZERO"):
        Data.decode(raw_body(10, Encoding.ZERO, b"x"))
    with pytest.raises(MalformedBody, match="ZSTD"):
        Data.decode(raw_body(10, Encoding.ZSTD, b""))
    with pytest.raises(MalformedBody, match="exceeds"):
        Data.decode(raw_body(MAX_EXTENT + 1, Encoding.ZERO, b""))
    with pytest.raises(ValueError):
        Data("d", 1, 0, 10, Encoding.RAW, b"x").encode()


def test_data_payload_is_not_copied_and_decodes_per_encoding() -> None:
    payload = memoryview(bytearray(b"abc" * 1000))
    msg = Data.raw("d", 1, 0, payload)
    assert msg.encode()[1] is payload
    assert msg.decoded() is payload
    assert Data.zero("d", 2, 0, 4096).decoded() == bytes(4096)
    packed = Data.compressed("d", 3, 0, b"abc" * 1000)
    assert packed.wire_size < 3000 and packed.length == 3000
    decoded = Data.decode(body(packed))
    assert isinstance(decoded.payload, memoryview)  # a view of the frame, no copy
    assert decoded.decoded() == b"abc" * 1000


def test_zstd_that_lies_about_its_length_is_malformed() -> None:
    packed = zstandard.ZstdCompressor().compress(b"z" * 5000)
    with pytest.raises(MalformedBody):
        Data("d", 1, 0, 4096, Encoding.ZSTD, packed).decoded()  # expands past length
    with pytest.raises(MalformedBody):
        Data("d", 1, 0, 6000, Encoding.ZSTD, packed).decoded()  # falls short
    with pytest.raises(MalformedBody):
        Data("d", 1, 0, 10, Encoding.ZSTD, b"not zstd").decoded()


def test_error_keeps_unknown_codes_and_cuts_long_messages() -> None:
    assert Error.decode(body(Error(999, "future"))) == Error(999, "future")
    known = Error.decode(body(Error(14, "x")))
    assert known.code is ErrorCode.INVALID_REQUEST
    cut = Error.decode(body(Error(ErrorCode.INTERNAL, "é" * 1000)))  # 2000 bytes of UTF-8
    assert cut.message == "é" * 512


def test_request_and_response_json_helpers() -> None:
    req = Request.make(3, "points", disk="d0", limit=5)
    assert Request.decode(body(req)).json() == {"disk": "d0", "limit": 5}
    assert Request(4, "status", b"").json() == {}
    with pytest.raises(InvalidRequest):
        Request(5, "x", b"[1, 2]").json()
    with pytest.raises(InvalidRequest):
        Request(6, "x", b"{nope").json()
    with pytest.raises(InvalidRequest):
        Request(7, "x", b"[" * 100_000).json()
    resp = Response.make(3, [1, "two"], ok=False)
    back = Response.decode(body(resp))
    assert back.ok is False and back.json() == [1, "two"]
    with pytest.raises(MalformedBody, match="ok flag"):
        Response.decode(struct.pack("!QB", 1, 2))


def test_out_of_range_values_are_a_sender_bug() -> None:
    with pytest.raises(ValueError):
        Ack("d", -1).encode()
    with pytest.raises(ValueError):
        Welcome("t", 1, 2**32).encode()


def test_zstd_frame_declaring_a_huge_size_is_malformed_not_allocated() -> None:
    # Found by the fuzzer: zstandard allocates the content size a frame header declares,
    # so a small frame could make the receiver allocate gigabytes. Refused up front.
    big = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 << 20))
    assert len(big) < 64 << 10
    with pytest.raises(MalformedBody, match="declares 67108864 bytes, expected 4096"):
        Data("d", 1, 0, 4096, Encoding.ZSTD, big).decoded()


def _digest_body(name: str, chunk_size: int, count: int, entry: bytes) -> bytes:
    """A digest message body with `count` copies of `entry` after its head."""
    head = struct.pack("!H", len(name)) + name.encode() + struct.pack("!QII", 9, chunk_size, count)
    return head + entry * count


def test_digest_messages_are_limited_in_count_and_chunk_size() -> None:
    index = struct.pack("!Q", 7)
    entry = index + b"d" * DIGEST_SIZE
    # At the limits: accepted both ways.
    most = DigestRequest.decode(_digest_body("d", MAX_DIGEST_CHUNK_SIZE, MAX_DIGEST_CHUNKS, index))
    assert len(most.chunks) == MAX_DIGEST_CHUNKS and most.chunk_size == 16 << 20
    assert DigestRequest.decode(body(most)) == most
    reply = DigestReply.decode(_digest_body("d", 512, MAX_DIGEST_CHUNKS, entry))
    assert len(reply.digests) == MAX_DIGEST_CHUNKS and reply.digests[0] == (7, b"d" * 16)
    # One chunk more, or a chunk size that is not a positive multiple of 512 up to 16 MiB.
    too_many = [(4096, MAX_DIGEST_CHUNKS + 1, "exceed 16384")]
    bad_sizes = [(size, 1, "chunk size") for size in (0, 511, 513, MAX_DIGEST_CHUNK_SIZE + 512)]
    for chunk_size, count, needle in too_many + bad_sizes:
        with pytest.raises(MalformedBody, match=needle):
            DigestRequest.decode(_digest_body("d", chunk_size, count, index))
        with pytest.raises(MalformedBody, match=needle):
            DigestReply.decode(_digest_body("d", chunk_size, count, entry))
        with pytest.raises(ValueError, match=needle):
            DigestRequest("d", 1, chunk_size, (0,) * count).encode()
        with pytest.raises(ValueError, match=needle):
            DigestReply("d", 1, chunk_size, ((0, bytes(16)),) * count).encode()


def test_digest_count_is_checked_against_the_body_before_use() -> None:
    # A count the body does not hold is short, not a 16384-entry allocation.
    with pytest.raises(MalformedBody, match="too short"):
        DigestRequest.decode(_digest_body("d", 4096, MAX_DIGEST_CHUNKS, b""))
    with pytest.raises(MalformedBody, match="too short"):
        DigestReply.decode(_digest_body("d", 4096, 2, struct.pack("!Q", 1) + bytes(16))[:-1])
    with pytest.raises(MalformedBody, match="too long"):
        DigestReply.decode(_digest_body("d", 4096, 1, struct.pack("!Q", 1) + bytes(17)))


def test_digest_values_that_do_not_fit_are_a_sender_bug() -> None:
    assert DIGEST_SIZE == chunk_digests.DIGEST_SIZE  # the wire fixes what the hash makes
    for digest in (bytes(15), bytes(17), b""):
        with pytest.raises(ValueError, match="bytes"):
            DigestReply("d", 1, 4096, ((0, digest),)).encode()
    for index in (-1, 2**64):
        with pytest.raises(ValueError):
            DigestRequest("d", 1, 4096, (index,)).encode()
        with pytest.raises(ValueError):
            DigestReply("d", 1, 4096, ((index, bytes(16)),)).encode()
    with pytest.raises(ValueError):
        DigestRequest("d", 2**64, 4096, ()).encode()


def _extents_body(encoding: int, entries: list[tuple[int, int, int]], payload: bytes,
                  count: int | None = None) -> bytes:  # fmt: skip
    n = len(entries) if count is None else count
    table = b"".join(struct.pack("!QIB", *e) for e in entries)
    return struct.pack("!H", 1) + b"d" + struct.pack("!QBI", 1, encoding, n) + table + payload


def test_extents_carry_many_changes_under_one_seq() -> None:
    a, b = b"a" * 4096, b"b" * 512
    msg = Extents.of("d", 5, [Extent(0, 4096, Encoding.RAW), Extent(8192, 4096, Encoding.ZERO),
                              Extent(65536, 512, Encoding.RAW)], a + b)  # fmt: skip
    assert (msg.data_length, msg.length, msg.wire_size) == (4608, 8704, 4608)
    got = Extents.decode(body(msg))
    assert got == msg and isinstance(got.payload, memoryview)  # a view of the frame
    pieces = [(e.offset, e.kind, None if v is None else bytes(v)) for e, v in got.pieces()]
    assert pieces == [(0, Encoding.RAW, a), (8192, Encoding.ZERO, None), (65536, Encoding.RAW, b)]
    packed = Extents("d", 6, msg.extents, Encoding.ZSTD, zstandard.compress(a + b))
    assert packed.wire_size < 100
    assert [bytes(v) for _, v in Extents.decode(body(packed)).pieces() if v is not None] == [a, b]


def test_extents_payload_must_match_the_raw_extents() -> None:
    raw = [(0, 512, Encoding.RAW)]
    with pytest.raises(MalformedBody, match="RAW: 511 payload bytes"):
        Extents.decode(_extents_body(Encoding.RAW, raw, b"x" * 511))
    with pytest.raises(MalformedBody, match="ZSTD with an empty payload"):
        Extents.decode(_extents_body(Encoding.ZSTD, raw, b""))
    with pytest.raises(MalformedBody, match="ZSTD with an empty payload"):  # nothing to hold
        Extents.decode(_extents_body(Encoding.ZSTD, [(0, 512, Encoding.ZERO)], b"zz"))
    for enc in (Encoding.ZERO, Encoding.SAME):
        with pytest.raises(MalformedBody, match="not a payload encoding"):
            Extents.decode(_extents_body(enc, [(0, 512, Encoding.ZERO)], b""))
    too_much = [(i * MAX_EXTENT, MAX_EXTENT, Encoding.RAW) for i in range(2)]
    with pytest.raises(MalformedBody, match="exceed"):  # checked before any decompression
        Extents.decode(_extents_body(Encoding.ZSTD, too_much, b"zz"))
    lying = Extents("d", 1, (Extent(0, 4096, Encoding.RAW),), Encoding.ZSTD,
                    zstandard.compress(b"z" * 5000))  # fmt: skip
    with pytest.raises(MalformedBody, match="bad zstd payload"):
        list(lying.pieces())
    with pytest.raises(ValueError, match="RAW: 3 payload bytes"):
        Extents.of("d", 1, [Extent(0, 512, Encoding.RAW)], b"abc").encode()


def test_extents_must_ascend_without_overlap_and_be_bounded() -> None:
    def refused(entries: list[tuple[int, int, int]], match: str, count: int | None = None) -> None:
        payload = b"x" * sum(n for _, n, k in entries if k == Encoding.RAW)
        with pytest.raises(MalformedBody, match=match):
            Extents.decode(_extents_body(Encoding.RAW, entries, payload, count))

    refused([(4096, 512, Encoding.ZERO), (0, 512, Encoding.ZERO)], "not after")
    refused([(0, 1024, Encoding.ZERO), (512, 512, Encoding.ZERO)], "not after")
    refused([(0, 0, Encoding.ZERO)], "length 0")
    refused([(0, MAX_EXTENT + 1, Encoding.ZERO)], "length")
    refused([(0, 512, Encoding.ZSTD)], "not an extent kind")
    refused([(0, 512, 9)], "not an extent kind")
    refused([], "0 extents")
    refused([(0, 512, Encoding.ZERO)], f"{MAX_EXTENTS_PER_MESSAGE + 1} extents",
            count=MAX_EXTENTS_PER_MESSAGE + 1)  # fmt: skip
    refused([(0, 512, Encoding.ZERO)], "too short", count=2)  # the table is cut short
    with pytest.raises(ValueError, match="not after"):
        Extents.of("d", 1, [Extent(512, 512, Encoding.ZERO), Extent(0, 512, Encoding.ZERO)],
                   b"").encode()  # fmt: skip
    with pytest.raises(ValueError, match="out of range"):
        Extents.of("d", 1, [Extent(2**64, 512, Encoding.ZERO)], b"").encode()
    # Back to back is fine; so is the most a message may carry.
    many = [Extent(i * 4096, 4096, Encoding.ZERO) for i in range(MAX_EXTENTS_PER_MESSAGE)]
    assert len(Extents.decode(body(Extents.of("d", 1, many, b""))).extents) == len(many)
