"""Spool records and stream metadata: the byte layouts (specified in :class:`Spool`'s
docstring), the pending form of a record, and the compact in-memory index.
"""

from __future__ import annotations

import json
import struct
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from enum import IntEnum
from itertools import accumulate
from pathlib import Path

from appliance.checksum import crc32c
from appliance.process.errors import SpoolCorrupt
from appliance.storage.atomic import atomic_write
from appliance.wire.errors import MalformedBody
from appliance.wire.framing import Buffer, buffer_size
from appliance.wire.messages import (
    MAX_EXTENT,
    MAX_EXTENTS_PER_MESSAGE,
    Data,
    Extents,
    MsgType,
    Tag,
)

SEGMENT_MAGIC = b"SSSPOOL1"
SEGMENT_VERSION = 1
SUFFIX = ".spool"
META_NAME = "meta.json"
META_VERSION = 1

RECORD_MAGIC = 0x4C4F4F50  # b"POOL" on disk (little endian)
RECORD_HEADER = struct.Struct("<IBBHQQQIIII")
assert RECORD_HEADER.size == 48
MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
_CRC_AT = 40  # header bytes covered by crc, before the body
_HCRC_AT = 44  # header bytes covered by hcrc
_CRC = struct.Struct("<I")
READ_RECORDS = 4096  # records returned by one read at most (each is a Python object)
# A DATA or EXTENTS body is its fixed fields (and extent table, 13 bytes an extent) plus
# a payload of about MAX_EXTENT bytes at most (zstd may add a little); anything longer
# in a header is damage, and bounding it keeps a bad length from driving a huge read.
MAX_BODY = MAX_EXTENT + (64 << 10) + 13 * MAX_EXTENTS_PER_MESSAGE

# What a stream's records hold: the messages that carry a sequence number.
SpoolMessage = Data | Extents | Tag


class RecordKind(IntEnum):
    """What a record's body holds: the wire message type, so decoding is the wire's."""

    DATA = MsgType.DATA
    TAG = MsgType.TAG
    EXTENTS = MsgType.EXTENTS


_DECODERS: dict[RecordKind, type[Data] | type[Extents] | type[Tag]] = {
    RecordKind.DATA: Data,
    RecordKind.TAG: Tag,
    RecordKind.EXTENTS: Extents,
}


@dataclass(slots=True)
class PendingRecord:
    """A record accepted by ``append`` and not yet written: the message's body parts
    (payloads referenced, not copied) and what its header will say."""

    seq: int
    kind: RecordKind
    received_ns: int
    parts: list[Buffer]
    body_len: int
    payload_len: int
    msg: SpoolMessage  # kept so a forwarder can take it from memory once it is durable

    @classmethod
    def of(cls, msg: SpoolMessage, received_ns: int) -> PendingRecord:
        # Byte-format views, so lengths are byte counts wherever the parts go next.
        parts = [memoryview(p).cast("B") if isinstance(p, memoryview) else p for p in msg.encode()]
        body_len = sum(buffer_size(p) for p in parts)
        if body_len > MAX_BODY:  # the wire's frame limit keeps received messages far below
            raise ValueError(f"a {body_len}-byte message body exceeds the spool's {MAX_BODY}")
        kind = RecordKind(msg.TYPE)
        payload_len = 0 if isinstance(msg, Tag) else msg.wire_size
        return cls(msg.seq, kind, received_ns, parts, body_len, payload_len, msg)

    @property
    def size(self) -> int:
        return RECORD_HEADER.size + self.body_len

    def header(self, pos: int) -> bytes:
        """The record header for log position ``pos``, both CRCs filled in."""
        head = RECORD_HEADER.pack(
            RECORD_MAGIC, self.kind, 0, 0, pos, self.seq, self.received_ns,
            self.body_len, self.payload_len, 0, 0,
        )  # fmt: skip
        crc = crc32c(memoryview(head)[:_CRC_AT])
        for part in self.parts:
            crc = crc32c(part, crc)
        head = head[:_CRC_AT] + _CRC.pack(crc)
        return head + _CRC.pack(crc32c(head))


@dataclass(frozen=True, slots=True)
class RecordHeader:
    pos: int
    kind: RecordKind
    seq: int
    received_ns: int
    body_len: int
    payload_len: int
    crc: int

    @property
    def size(self) -> int:
        return RECORD_HEADER.size + self.body_len

    @property
    def end(self) -> int:
        return self.pos + self.size


def parse_header(buf: bytes | bytearray | memoryview, pos: int) -> RecordHeader | None:
    """The header in ``buf`` if it is intact and claims position ``pos``, else None."""
    if len(buf) < RECORD_HEADER.size:
        return None
    magic, kind, flags, reserved, rec_pos, seq, received_ns, body_len, payload_len, crc, hcrc = (
        RECORD_HEADER.unpack_from(buf)
    )
    if magic != RECORD_MAGIC or rec_pos != pos or crc32c(buf[:_HCRC_AT]) != hcrc:
        return None
    if flags or reserved or seq == 0 or body_len > MAX_BODY or payload_len > body_len:
        return None
    if kind in (RecordKind.DATA, RecordKind.EXTENTS):
        return RecordHeader(pos, RecordKind(kind), seq, received_ns, body_len, payload_len, crc)
    if kind == RecordKind.TAG and payload_len == 0:
        return RecordHeader(pos, RecordKind.TAG, seq, received_ns, body_len, 0, crc)
    return None


def body_ok(head: bytes | bytearray | memoryview, body: bytes | bytearray | memoryview) -> bool:
    """True when ``body`` matches the CRC in ``head`` (a header parse_header accepted)."""
    (crc,) = _CRC.unpack_from(head, _CRC_AT)
    return crc32c(body, crc32c(head[:_CRC_AT])) == crc


def decode_body(header: RecordHeader, body: bytes | bytearray, disk_id: str) -> SpoolMessage:
    """The message a verified record holds; SpoolCorrupt if it does not decode to a
    message of this stream and sequence (the CRC matched, so it was written wrong)."""
    try:
        msg: SpoolMessage = _DECODERS[header.kind].decode(body)
    except MalformedBody as exc:
        raise SpoolCorrupt(f"stream {disk_id}: undecodable record: {exc}", header.seq) from exc
    if msg.disk_id != disk_id or msg.seq != header.seq:
        raise SpoolCorrupt(f"stream {disk_id}: record holds {msg.disk_id}/{msg.seq}", header.seq)
    return msg


@dataclass(frozen=True)
class StreamMeta:
    """What ``meta.json`` holds for one stream."""

    disk_id: str
    machine_id: str
    size: int
    target_acked_seq: int = 0

    def save(self, directory: Path) -> None:
        doc = {
            "version": META_VERSION,
            "disk_id": self.disk_id,
            "machine_id": self.machine_id,
            "size": self.size,
            "target_acked_seq": self.target_acked_seq,
        }
        atomic_write(directory / META_NAME, json.dumps(doc, indent=1).encode() + b"\n", 0o600)

    @classmethod
    def load(cls, directory: Path) -> StreamMeta:
        path = directory / META_NAME
        try:
            doc = json.loads(path.read_bytes())
            if doc["version"] != META_VERSION:
                raise ValueError(f"version {doc['version']}")
            meta = cls(doc["disk_id"], doc["machine_id"], doc["size"], doc["target_acked_seq"])
        except (ValueError, KeyError, TypeError) as exc:  # json's errors are ValueErrors
            raise SpoolCorrupt(f"{path}: unreadable stream metadata: {exc!r}") from exc
        if not all(isinstance(v, int) and v >= 0 for v in (meta.size, meta.target_acked_seq)):
            raise SpoolCorrupt(f"{path}: bad numbers in stream metadata")
        return meta


class RecordIndex:
    """Where each durable record on disk is, ``seq = base + i``: 28 bytes a record, so
    8 GiB of 4 KiB records costs 56 MiB and of 1 MiB records 224 KiB.

    Sequence numbers in a stream are contiguous (append enforces it), which is what lets
    a plain array stand in for a map. Damaged records keep their slot (size 0).
    """

    def __init__(self, base: int) -> None:
        self.base = base
        self.pos = array("Q")
        self.size = array("I")
        self.cum = array("Q")  # payload bytes of records [0, i], plus _cum0
        self.received = array("Q")
        self._cum0 = 0

    def __len__(self) -> int:
        return len(self.pos)

    @property
    def last_seq(self) -> int:
        return self.base + len(self.pos) - 1

    def add(self, pos: int, size: int, payload: int, received_ns: int) -> None:
        self.pos.append(pos)
        self.size.append(size)
        self.cum.append((self.cum[-1] if self.cum else self._cum0) + payload)
        self.received.append(received_ns)

    def _cum_before(self, i: int) -> int:
        return self.cum[i - 1] if i > 0 else self._cum0

    def payload(self, first_seq: int, last_seq: int) -> int:
        """Payload bytes of the records ``first_seq..last_seq`` (clamped to the index)."""
        i, j = max(first_seq - self.base, 0), min(last_seq - self.base, len(self.pos) - 1)
        return self.cum[j] - self._cum_before(i) if i <= j else 0

    def count_within(self, first_seq: int, last_seq: int, max_bytes: int) -> int:
        """How many records from ``first_seq`` (up to ``last_seq``) fit ``max_bytes``,
        counting their payload and their whole size on disk, and READ_RECORDS at most;
        at least one. Payload alone would not bound a run of records without any (tags,
        ZERO, all-ZERO EXTENTS whose tables reach ~213 KB): they would all be read."""
        i, j = first_seq - self.base, last_seq - self.base
        fits = bisect_right(self.cum, self._cum_before(i) + max_bytes, i, j + 1) - i
        fits = min(fits, READ_RECORDS)
        whole = bisect_right(list(accumulate(self.size[i : i + fits])), max_bytes)
        return max(1, whole)

    def drop_before(self, seq: int) -> None:
        """Forget the records below ``seq``; an empty index moves its base to ``seq``."""
        k = min(max(seq - self.base, 0), len(self.pos))
        if k:
            self._cum0 = self.cum[k - 1]
            for arr in (self.pos, self.size, self.cum, self.received):
                del arr[:k]
        self.base = seq if not self.pos else self.base + k
