"""Messages: one frozen dataclass per frame type, with its body layout beside it.

Body encoding (network byte order, no padding):

- ``u8/u16/u32/u64``: unsigned big-endian integers.
- ``str``: u16 byte length, then that many bytes of UTF-8; at most 1024 bytes.
- ``rest``: everything up to the end of the body (a payload, JSON bytes).
- ``n x T``: n repetitions of T, n given by the u32 count just before.

====  =============  =======================================================================
type  message        body
====  =============  =======================================================================
1     Hello          str role, str name                                     (client, first)
2     Welcome        str name, u64 window_bytes, u32 max_body                (server reply)
3     OpenDisk       str disk_id, str machine_id, u64 size
4     DiskOpened     str disk_id, u64 durable_seq, u64 size
5     Data           str disk_id, u64 seq, u64 offset, u32 length, u8 encoding, rest payload
6     Tag            str disk_id, u64 seq, str tag_id, u8 kind, u64 timestamp_ns
7     Ack            str disk_id, u64 seq                     (highest durable sequence)
8     Error          u16 code, str message
9     Ping           u64 nonce
10    Pong           u64 nonce
11    Request        u64 request_id, str method, rest params (JSON)
12    Response       u64 request_id, u8 ok (0 or 1), rest result (JSON)
13    DigestRequest  str disk_id, u64 request_id, u32 chunk_size, u32 n, n x u64 chunk
14    DigestReply    str disk_id, u64 request_id, u32 chunk_size, u32 n,
                     n x (u64 chunk, 16 bytes digest)
15    ReadRequest    str disk_id, u64 request_id, u64 offset, u32 length
16    ReadReply      str disk_id, u64 request_id, u64 offset, u32 length, u8 encoding,
                     rest payload
17    Extents        str disk_id, u64 seq, u8 encoding, u32 n,
                     n x (u64 offset, u32 length, u8 kind), rest payload
====  =============  =======================================================================

Sequence numbers are per disk and start at 1 (DATA and TAG share them, so seq 0 is
rejected). Data.length is the decoded byte count: RAW carries exactly `length` bytes,
ZSTD a zstandard frame that decodes to `length` bytes, ZERO and SAME an empty payload
(SAME: an identical write to this exact extent is still in flight; nothing changes); `length`
is at most 64 MiB (MAX_EXTENT), so a small frame cannot expand without bound. The
window counts DATA payload bytes as sent on the wire (`Data.wire_size`).

EXTENTS is many changes of one disk under ONE sequence number (at 4 KiB tracking
granularity a delta is thousands of small extents; one frame, one spool record and one
apply call each cost more than the bytes). Its extents are applied in order as one
change: acknowledged, replayed and made durable as a whole. They are strictly ascending
and do not overlap (offset + length <= the next offset), each 0 < length <= MAX_EXTENT;
n is 1..MAX_EXTENTS_PER_MESSAGE. An extent's kind is RAW (its bytes are the next
`length` bytes of the decoded payload), ZERO or SAME (none). The decoded payload is
the RAW extents' bytes back to back, at most MAX_EXTENT bytes in all: the message's
encoding is RAW (the payload is exactly that) or ZSTD (one zstandard frame decoding to
it); a message with no RAW extent has an empty RAW payload. The window counts its
payload bytes as sent, like DATA.

DIGEST_REQUEST asks the receiver of a disk's stream for the digests of some chunks of
its replica (checksum resync: only chunks whose digests differ are sent again). Chunk i
is the disk's bytes [i * chunk_size, min((i + 1) * chunk_size, size)), digested with
`appliance.digest.chunk_digest` (the last chunk short, never padded). chunk_size is a
positive multiple of 512 up to 16 MiB (MAX_DIGEST_CHUNK_SIZE) and n is at most 16384
(MAX_DIGEST_CHUNKS) in both messages, which bounds the work one request asks for
(n x chunk_size bytes read) and the reply (~384 KiB). The reply has one entry per
distinct requested chunk inside the disk, ascending; chunks at or beyond the disk's
end are left out. The digests describe the replica after everything the same
connection sent for that disk before the request.

READ_REQUEST asks the receiver of a disk's stream for the replica's bytes [offset,
offset + length) (failback: the original machine fetches the chunks whose digests
differ). offset and length are multiples of 512, 0 < length <= 4 MiB (MAX_READ), so a
RAW reply always fits a frame. The READ_REPLY carries them RAW, ZSTD or ZERO, with the
same payload rules as DATA; SAME is refused. Like digests, the bytes describe the
replica after everything the same connection sent for that disk before the request.

An Error's code is kept even when this version does not know it: `Error.code` is then
the plain int (an `ErrorCode` otherwise), so a newer peer's error still decodes.
An Error message longer than 1024 bytes is cut at a character boundary when encoded.

`decode` raises MalformedBody for a short, long or invalid body; `decode_message`
raises UnknownType for a type number not in this table. `encode` raises ValueError
for values that do not fit their field (a bug on the sending side).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, NamedTuple, Self, get_args

import zstandard

from appliance.storage.compress import decompress
from appliance.wire.errors import ErrorCode, InvalidRequest, MalformedBody, UnknownType
from appliance.wire.framing import Body, Buffer, Frame, buffer_size, encode_frame

MAX_STR = 1024
MAX_EXTENT = 64 * 1024 * 1024  # bounds what one DATA may decode to (zstd bombs)
# One digest request reads at most MAX_DIGEST_CHUNKS * MAX_DIGEST_CHUNK_SIZE bytes on
# the receiver; the agent asks for 4096 chunks of 64 KiB (256 MiB) at a time.
MAX_DIGEST_CHUNKS = 16384
MAX_DIGEST_CHUNK_SIZE = 16 * 1024 * 1024
DIGEST_SIZE = 16  # appliance.digest.DIGEST_SIZE; the wire fixes it, the reply checks it
# One read asks for at most this much: a RAW reply stays well inside MAX_BODY (8 MiB).
MAX_READ = 4 * 1024 * 1024
# Extents in one EXTENTS message: 4 KiB extents filling MAX_EXTENT, and a table (13 bytes
# each) that stays small beside the frame limit.
MAX_EXTENTS_PER_MESSAGE = 16384
_SECTOR = 512

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_U64U64 = struct.Struct("!QQ")
_DATA_FIXED = struct.Struct("!QQIB")  # seq, offset, length, encoding
_TAG_TAIL = struct.Struct("!BQ")  # kind, timestamp_ns
_WELCOME_TAIL = struct.Struct("!QI")  # window_bytes, max_body
_DIGEST_HEAD = struct.Struct("!QII")  # request_id, chunk_size, count
_DIGEST_ENTRY = struct.Struct(f"!Q{DIGEST_SIZE}s")  # chunk, digest
_READ_FIXED = struct.Struct("!QQI")  # request_id, offset, length
_READ_REPLY_FIXED = struct.Struct("!QQIB")  # request_id, offset, length, encoding
_EXTENTS_HEAD = struct.Struct("!QBI")  # seq, encoding, count
_EXTENT_ENTRY = struct.Struct("!QIB")  # offset, length, kind


class MsgType(IntEnum):
    HELLO = 1
    WELCOME = 2
    OPEN_DISK = 3
    DISK_OPENED = 4
    DATA = 5
    TAG = 6
    ACK = 7
    ERROR = 8
    PING = 9
    PONG = 10
    REQUEST = 11
    RESPONSE = 12
    DIGEST_REQUEST = 13
    DIGEST_REPLY = 14
    READ_REQUEST = 15
    READ_REPLY = 16
    EXTENTS = 17


class Encoding(IntEnum):
    RAW = 0
    ZSTD = 1
    ZERO = 2
    # The receiver already holds exactly these bytes at this extent: an identical write
    # to the same range is still in flight. Advances the sequence only; empty payload.
    SAME = 3


class TagKind(IntEnum):
    CRASH = 0
    APP = 1


def _str(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > MAX_STR:
        raise ValueError(f"string of {len(raw)} bytes exceeds {MAX_STR}: {text[:40]!r}...")
    return _U16.pack(len(raw)) + raw


def _pack(st: struct.Struct, *values: int) -> bytes:
    try:
        return st.pack(*values)
    except struct.error as exc:
        raise ValueError(f"value out of range for its field: {values}") from exc


class _Reader:
    """Cursor over a body; every shortfall or leftover is MalformedBody."""

    __slots__ = ("body", "name", "pos")

    def __init__(self, body: Body, name: str) -> None:
        self.body = body
        self.name = name
        self.pos = 0

    def _need(self, n: int) -> int:
        start = self.pos
        if start + n > len(self.body):
            raise MalformedBody(f"{self.name} body too short ({len(self.body)} bytes)")
        self.pos = start + n
        return start

    def fixed(self, st: struct.Struct) -> tuple[Any, ...]:
        return st.unpack_from(self.body, self._need(st.size))

    def u8(self) -> int:
        return int(self.fixed(_U8)[0])

    def u16(self) -> int:
        return int(self.fixed(_U16)[0])

    def u64(self) -> int:
        return int(self.fixed(_U64)[0])

    def text(self) -> str:
        n = self.u16()
        if n > MAX_STR:
            raise MalformedBody(f"{self.name}: string of {n} bytes exceeds {MAX_STR}")
        start = self._need(n)
        try:
            return str(self.body[start : start + n], "utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedBody(f"{self.name}: invalid UTF-8 in a string") from exc

    def rest(self) -> bytes:
        start, self.pos = self.pos, len(self.body)
        return bytes(memoryview(self.body)[start:])

    def rest_view(self) -> memoryview:
        """The rest without a copy (read-only even over a received bytearray)."""
        start, self.pos = self.pos, len(self.body)
        return memoryview(self.body)[start:].toreadonly()

    def end(self) -> None:
        if self.pos != len(self.body):
            extra = len(self.body) - self.pos
            raise MalformedBody(f"{self.name} body too long ({extra} bytes left over)")

    def enum(self, cls: type[IntEnum], value: int) -> Any:
        try:
            return cls(value)
        except ValueError as exc:
            raise MalformedBody(f"{self.name}: {value} is not a valid {cls.__name__}") from exc

    def seq(self, value: int) -> int:
        if value == 0:
            raise MalformedBody(f"{self.name}: sequence numbers start at 1")
        return value

    def digest_head(self) -> tuple[int, int, int]:
        """request_id, chunk_size, count of a digest message, with the limits checked
        before the count is trusted to size anything."""
        request_id, chunk_size, count = self.fixed(_DIGEST_HEAD)
        problem = _digest_shape_problem(chunk_size, count)
        if problem:
            raise MalformedBody(f"{self.name}: {problem}")
        return request_id, chunk_size, count

    def repeated(self, st: struct.Struct, count: int) -> Iterator[tuple[Any, ...]]:
        """`count` consecutive `st` records (short body: MalformedBody before any)."""
        start = self._need(st.size * count)
        return st.iter_unpack(memoryview(self.body)[start : start + st.size * count])


@dataclass(frozen=True, slots=True)
class Hello:
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    role: str
    name: str

    def encode(self) -> list[Buffer]:
        return [_str(self.role) + _str(self.name)]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "HELLO")
        msg = cls(r.text(), r.text())
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class Welcome:
    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    name: str
    window_bytes: int
    max_body: int

    def encode(self) -> list[Buffer]:
        return [_str(self.name) + _pack(_WELCOME_TAIL, self.window_bytes, self.max_body)]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "WELCOME")
        name = r.text()
        window, max_body = r.fixed(_WELCOME_TAIL)
        r.end()
        return cls(name, window, max_body)


@dataclass(frozen=True, slots=True)
class OpenDisk:
    TYPE: ClassVar[MsgType] = MsgType.OPEN_DISK
    disk_id: str
    machine_id: str
    size: int

    def encode(self) -> list[Buffer]:
        return [_str(self.disk_id) + _str(self.machine_id) + _pack(_U64, self.size)]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "OPEN_DISK")
        msg = cls(r.text(), r.text(), r.u64())
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class DiskOpened:
    TYPE: ClassVar[MsgType] = MsgType.DISK_OPENED
    disk_id: str
    durable_seq: int
    size: int

    def encode(self) -> list[Buffer]:
        return [_str(self.disk_id) + _pack(_U64U64, self.durable_seq, self.size)]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "DISK_OPENED")
        disk_id = r.text()
        durable, size = r.fixed(_U64U64)
        r.end()
        return cls(disk_id, durable, size)


@dataclass(frozen=True, slots=True)
class Data:
    """Changed bytes of a disk. The payload is sent as given, never copied by encode().

    A payload handed in as a memoryview must not change until the message is acked.
    Decoded payloads are read-only memoryviews into the received frame body.
    """

    TYPE: ClassVar[MsgType] = MsgType.DATA
    disk_id: str
    seq: int
    offset: int
    length: int
    encoding: Encoding
    payload: bytes | memoryview = field(repr=False)

    @classmethod
    def raw(cls, disk_id: str, seq: int, offset: int, payload: bytes | memoryview) -> Self:
        return cls(disk_id, seq, offset, buffer_size(payload), Encoding.RAW, payload)

    @classmethod
    def zero(cls, disk_id: str, seq: int, offset: int, length: int) -> Self:
        return cls(disk_id, seq, offset, length, Encoding.ZERO, b"")

    @classmethod
    def compressed(
        cls, disk_id: str, seq: int, offset: int, payload: bytes | memoryview, level: int = 3
    ) -> Self:
        packed = zstandard.ZstdCompressor(level=level).compress(payload)
        return cls(disk_id, seq, offset, buffer_size(payload), Encoding.ZSTD, packed)

    @property
    def wire_size(self) -> int:
        """Payload bytes on the wire: what the flow-control window counts."""
        return buffer_size(self.payload)

    def decoded(self) -> bytes | memoryview:
        """The `length` bytes this message writes at `offset` (MalformedBody if they lie)."""
        if self.encoding is Encoding.RAW:
            return self.payload
        if self.encoding is Encoding.ZERO:
            return bytes(self.length)
        if self.encoding is Encoding.SAME:
            raise ValueError(f"DATA seq {self.seq}: SAME carries no bytes of its own")
        try:
            return decompress(self.payload, self.length)
        except ValueError as exc:
            raise MalformedBody(f"DATA seq {self.seq}: bad zstd payload: {exc}") from exc

    def encode(self) -> list[Buffer]:
        size = self.wire_size
        if (
            (self.encoding is Encoding.RAW and size != self.length)
            or (self.encoding in (Encoding.ZERO, Encoding.SAME) and size)
            or self.length > MAX_EXTENT
        ):
            raise ValueError(f"DATA {self.encoding.name}: {size} payload bytes, {self.length=}")
        fixed = _pack(_DATA_FIXED, self.seq, self.offset, self.length, self.encoding)
        head = _str(self.disk_id) + fixed
        return [head, self.payload] if size else [head]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "DATA")
        disk_id = r.text()
        seq, offset, length, encoding = r.fixed(_DATA_FIXED)
        enc: Encoding = r.enum(Encoding, encoding)
        if length > MAX_EXTENT:
            raise MalformedBody(f"DATA length {length} exceeds {MAX_EXTENT}")
        payload = r.rest_view()
        size = len(payload)
        if enc is Encoding.RAW and size != length:
            raise MalformedBody(f"DATA RAW: {size} payload bytes for length {length}")
        if enc in (Encoding.ZERO, Encoding.SAME) and size:
            raise MalformedBody(f"DATA {enc.name} with {size} payload bytes")
        if enc is Encoding.ZSTD and not size:
            raise MalformedBody("DATA ZSTD with an empty payload")
        return cls(disk_id, r.seq(seq), offset, length, enc, payload)


class Extent(NamedTuple):
    """One change inside an EXTENTS message."""

    offset: int
    length: int
    kind: Encoding  # RAW, ZERO or SAME


@dataclass(frozen=True, slots=True)
class Extents:
    """Many changes of one disk under one sequence number (see the module docstring).

    ``payload`` is the RAW extents' bytes back to back (``encoding`` RAW) or one zstd
    frame of them (ZSTD); it is sent as given, never copied by encode(), and a
    memoryview handed in must not change until the message is acked.
    """

    TYPE: ClassVar[MsgType] = MsgType.EXTENTS
    disk_id: str
    seq: int
    extents: tuple[Extent, ...]
    encoding: Encoding
    payload: bytes | memoryview = field(repr=False)

    @classmethod
    def of(
        cls, disk_id: str, seq: int, extents: Sequence[Extent], payload: bytes | memoryview
    ) -> Self:
        """A RAW message; ``payload`` must be exactly the RAW extents' bytes."""
        return cls(disk_id, seq, tuple(extents), Encoding.RAW, payload)

    @property
    def wire_size(self) -> int:
        """Payload bytes on the wire: what the flow-control window counts."""
        return buffer_size(self.payload)

    @property
    def data_length(self) -> int:
        """Bytes of the decoded payload: the RAW extents' lengths added up."""
        return sum(e.length for e in self.extents if e.kind is Encoding.RAW)

    @property
    def length(self) -> int:
        """Bytes of the disk this message changes (ZERO and SAME extents included)."""
        return sum(e.length for e in self.extents)

    def decoded(self) -> bytes | memoryview:
        """The RAW extents' bytes back to back (MalformedBody if a zstd payload lies)."""
        if self.encoding is Encoding.RAW:
            return self.payload
        try:
            return decompress(self.payload, self.data_length)
        except ValueError as exc:
            raise MalformedBody(f"EXTENTS seq {self.seq}: bad zstd payload: {exc}") from exc

    def pieces(self) -> Iterator[tuple[Extent, memoryview | None]]:
        """Each extent with its bytes (None for ZERO and SAME), in order."""
        data = memoryview(self.decoded()).cast("B")
        at = 0
        for ext in self.extents:
            if ext.kind is Encoding.RAW:
                yield ext, data[at : at + ext.length]
                at += ext.length
            else:
                yield ext, None

    def encode(self) -> list[Buffer]:
        problem = _extents_problem(self.extents) or _extents_payload_problem(
            self.encoding, self.wire_size, self.data_length
        )
        if problem:
            raise ValueError(f"EXTENTS: {problem}")
        try:
            table = b"".join(_EXTENT_ENTRY.pack(*e) for e in self.extents)
        except struct.error as exc:
            raise ValueError(f"EXTENTS: value out of range for its field: {exc}") from exc
        fixed = _pack(_EXTENTS_HEAD, self.seq, self.encoding, len(self.extents))
        head = _str(self.disk_id) + fixed + table
        return [head, self.payload] if self.wire_size else [head]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "EXTENTS")
        disk_id = r.text()
        seq, encoding, count = r.fixed(_EXTENTS_HEAD)
        enc: Encoding = r.enum(Encoding, encoding)
        if not 0 < count <= MAX_EXTENTS_PER_MESSAGE:
            raise MalformedBody(f"EXTENTS: {count} extents, not 1..{MAX_EXTENTS_PER_MESSAGE}")
        kinds = _EXTENT_KINDS
        try:
            extents = tuple(
                Extent(offset, length, kinds[kind])
                for offset, length, kind in r.repeated(_EXTENT_ENTRY, count)
            )
        except KeyError as exc:
            raise MalformedBody(f"EXTENTS: {exc.args[0]} is not an extent kind") from exc
        payload = r.rest_view()
        problem = _extents_problem(extents) or _extents_payload_problem(
            enc, len(payload), sum(e.length for e in extents if e.kind is Encoding.RAW)
        )
        if problem:
            raise MalformedBody(f"EXTENTS: {problem}")
        return cls(disk_id, r.seq(seq), extents, enc, payload)


_EXTENT_KINDS = {int(k): k for k in (Encoding.RAW, Encoding.ZERO, Encoding.SAME)}


def _extents_problem(extents: Sequence[Extent]) -> str | None:
    if not 0 < len(extents) <= MAX_EXTENTS_PER_MESSAGE:
        return f"{len(extents)} extents, not 1..{MAX_EXTENTS_PER_MESSAGE}"
    end = 0
    for offset, length, kind in extents:
        if not 0 < length <= MAX_EXTENT:
            return f"extent length {length} is not 1..{MAX_EXTENT}"
        if offset < end:
            return f"extent at {offset} is not after the previous one's end {end}"
        if kind not in _EXTENT_KINDS.values():
            return f"{kind!r} is not an extent kind"
        end = offset + length
    return None


def _extents_payload_problem(enc: Encoding, size: int, data_length: int) -> str | None:
    if data_length > MAX_EXTENT:
        return f"{data_length} bytes of RAW extents exceed {MAX_EXTENT}"
    if enc is Encoding.RAW and size != data_length:
        return f"RAW: {size} payload bytes for {data_length} bytes of RAW extents"
    if enc is Encoding.ZSTD and (not size or not data_length):
        return "ZSTD with an empty payload or no RAW extent"
    if enc not in (Encoding.RAW, Encoding.ZSTD):
        return f"{enc.name} is not a payload encoding"
    return None


@dataclass(frozen=True, slots=True)
class Tag:
    TYPE: ClassVar[MsgType] = MsgType.TAG
    disk_id: str
    seq: int
    tag_id: str
    kind: TagKind
    timestamp_ns: int

    def encode(self) -> list[Buffer]:
        return [
            _str(self.disk_id)
            + _pack(_U64, self.seq)
            + _str(self.tag_id)
            + _pack(_TAG_TAIL, self.kind, self.timestamp_ns)
        ]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "TAG")
        disk_id, seq, tag_id = r.text(), r.u64(), r.text()
        kind, timestamp = r.fixed(_TAG_TAIL)
        r.end()
        return cls(disk_id, r.seq(seq), tag_id, r.enum(TagKind, kind), timestamp)


@dataclass(frozen=True, slots=True)
class Ack:
    TYPE: ClassVar[MsgType] = MsgType.ACK
    disk_id: str
    seq: int

    def encode(self) -> list[Buffer]:
        return [_str(self.disk_id) + _pack(_U64, self.seq)]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "ACK")
        msg = cls(r.text(), r.u64())
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class Error:
    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: ErrorCode | int
    message: str

    def encode(self) -> list[Buffer]:
        text = self.message.encode()[:MAX_STR].decode(errors="ignore")
        return [_pack(_U16, self.code) + _str(text)]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "ERROR")
        raw = r.u16()
        message = r.text()
        r.end()
        try:
            return cls(ErrorCode(raw), message)
        except ValueError:
            return cls(raw, message)  # a newer peer's code: keep the number


@dataclass(frozen=True, slots=True)
class _Nonce:
    TYPE: ClassVar[MsgType]
    nonce: int

    def encode(self) -> list[Buffer]:
        return [_pack(_U64, self.nonce)]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, cls.TYPE.name)
        msg = cls(r.u64())
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class Ping(_Nonce):
    TYPE: ClassVar[MsgType] = MsgType.PING


@dataclass(frozen=True, slots=True)
class Pong(_Nonce):
    TYPE: ClassVar[MsgType] = MsgType.PONG


def _digest_shape_problem(chunk_size: int, count: int) -> str | None:
    """Why a digest message's chunk size or count is out of bounds (None: it is not)."""
    if chunk_size <= 0 or chunk_size % _SECTOR or chunk_size > MAX_DIGEST_CHUNK_SIZE:
        return (
            f"chunk size {chunk_size} is not a positive multiple of {_SECTOR} "
            f"up to {MAX_DIGEST_CHUNK_SIZE}"
        )
    if count > MAX_DIGEST_CHUNKS:
        return f"{count} chunks exceed {MAX_DIGEST_CHUNKS} per message"
    return None


def _digest_head(name: str, request_id: int, chunk_size: int, count: int) -> bytes:
    problem = _digest_shape_problem(chunk_size, count)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return _pack(_DIGEST_HEAD, request_id, chunk_size, count)


@dataclass(frozen=True, slots=True)
class DigestRequest:
    """Ask for the replica's digests of `chunks` (indexes of `chunk_size`-byte chunks)."""

    TYPE: ClassVar[MsgType] = MsgType.DIGEST_REQUEST
    disk_id: str
    request_id: int
    chunk_size: int
    chunks: tuple[int, ...] = field(repr=False)

    def encode(self) -> list[Buffer]:
        head = _digest_head("DIGEST_REQUEST", self.request_id, self.chunk_size, len(self.chunks))
        try:
            chunks = struct.pack(f"!{len(self.chunks)}Q", *self.chunks)
        except struct.error as exc:
            raise ValueError(f"DIGEST_REQUEST: a chunk index is not a u64: {exc}") from exc
        return [_str(self.disk_id) + head, chunks]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "DIGEST_REQUEST")
        disk_id = r.text()
        request_id, chunk_size, count = r.digest_head()
        chunks = tuple(index for (index,) in r.repeated(_U64, count))
        r.end()
        return cls(disk_id, request_id, chunk_size, chunks)


@dataclass(frozen=True, slots=True)
class DigestReply:
    """The digests a DigestRequest asked for: (chunk index, 16-byte digest) pairs."""

    TYPE: ClassVar[MsgType] = MsgType.DIGEST_REPLY
    disk_id: str
    request_id: int
    chunk_size: int
    digests: tuple[tuple[int, bytes], ...] = field(repr=False)

    def encode(self) -> list[Buffer]:
        head = _digest_head("DIGEST_REPLY", self.request_id, self.chunk_size, len(self.digests))
        entries = bytearray()
        for index, digest in self.digests:
            # struct's "16s" would pad or cut a wrong-sized digest without a word.
            if len(digest) != DIGEST_SIZE:
                raise ValueError(f"DIGEST_REPLY: digest of chunk {index} has {len(digest)} bytes")
            try:
                entries += _DIGEST_ENTRY.pack(index, digest)
            except struct.error as exc:
                raise ValueError(f"DIGEST_REPLY: chunk index {index} is not a u64") from exc
        return [_str(self.disk_id) + head, bytes(entries)]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "DIGEST_REPLY")
        disk_id = r.text()
        request_id, chunk_size, count = r.digest_head()
        digests = tuple((int(i), bytes(d)) for i, d in r.repeated(_DIGEST_ENTRY, count))
        r.end()
        return cls(disk_id, request_id, chunk_size, digests)


def _read_shape_problem(offset: int, length: int) -> str | None:
    if offset % _SECTOR or length % _SECTOR or not 0 < length <= MAX_READ:
        return f"read of {length} at {offset} is not sector-aligned or not in (0, {MAX_READ}]"
    return None


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Ask for the replica's bytes [offset, offset + length) (failback)."""

    TYPE: ClassVar[MsgType] = MsgType.READ_REQUEST
    disk_id: str
    request_id: int
    offset: int
    length: int

    def encode(self) -> list[Buffer]:
        problem = _read_shape_problem(self.offset, self.length)
        if problem:
            raise ValueError(f"READ_REQUEST: {problem}")
        return [_str(self.disk_id) + _pack(_READ_FIXED, self.request_id, self.offset, self.length)]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "READ_REQUEST")
        disk_id = r.text()
        request_id, offset, length = r.fixed(_READ_FIXED)
        r.end()
        problem = _read_shape_problem(offset, length)
        if problem:
            raise MalformedBody(f"READ_REQUEST: {problem}")
        return cls(disk_id, request_id, offset, length)


@dataclass(frozen=True, slots=True)
class ReadReply:
    """The bytes a ReadRequest asked for, RAW, ZSTD or ZERO (payload rules of DATA)."""

    TYPE: ClassVar[MsgType] = MsgType.READ_REPLY
    disk_id: str
    request_id: int
    offset: int
    length: int
    encoding: Encoding
    payload: bytes | memoryview = field(repr=False)

    @classmethod
    def of(cls, disk_id: str, request_id: int, offset: int, data: Body | memoryview) -> Self:
        """The cheapest encoding of `data`: ZERO, zstd when it saves, else RAW (kept as
        given, not copied)."""
        view = memoryview(data).cast("B")
        length = len(view)
        if view.tobytes().count(0) == length:
            return cls(disk_id, request_id, offset, length, Encoding.ZERO, b"")
        packed = zstandard.ZstdCompressor(level=1).compress(view)
        if len(packed) < length:
            return cls(disk_id, request_id, offset, length, Encoding.ZSTD, packed)
        return cls(disk_id, request_id, offset, length, Encoding.RAW, view)

    @property
    def wire_size(self) -> int:
        return buffer_size(self.payload)

    def decoded(self) -> bytes | memoryview:
        """The `length` bytes at `offset` (MalformedBody if a zstd payload lies)."""
        if self.encoding is Encoding.RAW:
            return self.payload
        if self.encoding is Encoding.ZERO:
            return bytes(self.length)
        try:
            return decompress(self.payload, self.length)
        except ValueError as exc:
            raise MalformedBody(f"READ_REPLY {self.request_id}: bad zstd payload: {exc}") from exc

    def encode(self) -> list[Buffer]:
        size = self.wire_size
        problem = _read_shape_problem(self.offset, self.length) or _reply_payload_problem(
            self.encoding, size, self.length
        )
        if problem:
            raise ValueError(f"READ_REPLY: {problem}")
        fixed = _pack(_READ_REPLY_FIXED, self.request_id, self.offset, self.length, self.encoding)
        head = _str(self.disk_id) + fixed
        return [head, self.payload] if size else [head]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "READ_REPLY")
        disk_id = r.text()
        request_id, offset, length, encoding = r.fixed(_READ_REPLY_FIXED)
        enc: Encoding = r.enum(Encoding, encoding)
        payload = r.rest_view()
        problem = _read_shape_problem(offset, length) or _reply_payload_problem(
            enc, len(payload), length
        )
        if problem:
            raise MalformedBody(f"READ_REPLY: {problem}")
        return cls(disk_id, request_id, offset, length, enc, payload)


def _reply_payload_problem(enc: Encoding, size: int, length: int) -> str | None:
    if enc is Encoding.SAME:
        return "SAME is not a reply encoding"
    if enc is Encoding.RAW and size != length:
        return f"RAW with {size} payload bytes for length {length}"
    if enc is Encoding.ZERO and size:
        return f"ZERO with {size} payload bytes"
    if enc is Encoding.ZSTD and not size:
        return "ZSTD with an empty payload"
    return None


def _json_body(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd nesting
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Request:
    """A control-plane call; `params` is a JSON object (bytes) or empty."""

    TYPE: ClassVar[MsgType] = MsgType.REQUEST
    request_id: int
    method: str
    params: bytes

    @classmethod
    def make(cls, request_id: int, method: str, **params: Any) -> Self:
        return cls(request_id, method, json.dumps(params, separators=(",", ":")).encode())

    def json(self) -> dict[str, Any]:
        """The parameters; InvalidRequest if they are not a JSON object."""
        value = _json_body(self.params, f"params of {self.method}")
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InvalidRequest(f"params of {self.method} must be a JSON object")
        return value

    def encode(self) -> list[Buffer]:
        return [_pack(_U64, self.request_id) + _str(self.method), self.params]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "REQUEST")
        return cls(r.u64(), r.text(), r.rest())


@dataclass(frozen=True, slots=True)
class Response:
    TYPE: ClassVar[MsgType] = MsgType.RESPONSE
    request_id: int
    ok: bool
    result: bytes

    @classmethod
    def make(cls, request_id: int, result: Any, *, ok: bool = True) -> Self:
        return cls(request_id, ok, json.dumps(result, separators=(",", ":")).encode())

    def json(self) -> Any:
        return _json_body(self.result, f"result of request {self.request_id}")

    def encode(self) -> list[Buffer]:
        return [_pack(_U64, self.request_id) + _U8.pack(1 if self.ok else 0), self.result]

    @classmethod
    def decode(cls, body: Body) -> Self:
        r = _Reader(body, "RESPONSE")
        request_id, ok = r.u64(), r.u8()
        if ok > 1:
            raise MalformedBody(f"RESPONSE ok flag {ok} is not 0 or 1")
        return cls(request_id, bool(ok), r.rest())


Message = (
    Hello
    | Welcome
    | OpenDisk
    | DiskOpened
    | Data
    | Tag
    | Ack
    | Error
    | Ping
    | Pong
    | Request
    | Response
    | DigestRequest
    | DigestReply
    | ReadRequest
    | ReadReply
    | Extents
)

MESSAGE_TYPES: dict[int, type[Message]] = {cls.TYPE: cls for cls in get_args(Message)}
assert set(MESSAGE_TYPES) == set(MsgType), "every MsgType needs its message class"


def encode_message(msg: Message, *, max_body: int | None = None) -> list[Buffer]:
    """The whole frame (header + body parts) for `msg`."""
    if max_body is None:
        return encode_frame(msg.TYPE, msg.encode())
    return encode_frame(msg.TYPE, msg.encode(), max_body=max_body)


def decode_message(frame: Frame) -> Message:
    cls = MESSAGE_TYPES.get(frame.type)
    if cls is None:
        raise UnknownType(f"unknown message type {frame.type}")
    return cls.decode(frame.body)
