"""Frames: a fixed 16-byte header, then the body.

On the wire (network byte order)::

    offset size field
    0      4    magic    b"SSWP"
    4      1    version  1
    5      1    type     message type (see messages.MsgType); framing does not judge it
    6      2    flags    reserved, 0
    8      4    length   body length in bytes, at most the receiver's maximum (8 MiB)
    12     4    crc32    CRC-32C of the body (appliance.checksum)
    16     ...  body     `length` bytes

"Need more bytes" and "malformed" are kept apart: `FrameDecoder.feed` returns the
frames that are complete and keeps the rest; it raises only for bytes that can never
become a valid frame (wrong magic or version, a length above the maximum — judged
from the header alone, before any of the body is buffered — or a CRC mismatch).
`eof()` turns a pending partial frame into `TruncatedFrame`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from appliance.checksum import crc32c
from appliance.wire.errors import BadCrc, BadMagic, BadVersion, FrameTooLarge, TruncatedFrame

MAGIC = b"SSWP"
VERSION = 1
HEADER = struct.Struct("!4sBBHII")
assert HEADER.size == 16
MAX_BODY = 8 * 1024 * 1024

Buffer = bytes | memoryview
Body = bytes | bytearray  # what the message decoders accept


def buffer_size(part: Buffer) -> int:
    """Size in bytes (a memoryview's len() counts items, not bytes)."""
    return part.nbytes if isinstance(part, memoryview) else len(part)


def encode_frame(
    msg_type: int, parts: Sequence[Buffer], flags: int = 0, *, max_body: int = MAX_BODY
) -> list[Buffer]:
    """The header followed by `parts` as given: payloads are not copied.

    Raises FrameTooLarge if the body exceeds `max_body` (the peer would refuse it).
    """
    length = 0
    crc = 0
    for part in parts:
        length += buffer_size(part)
        crc = crc32c(part, crc)
    if length > max_body:
        raise FrameTooLarge(f"body of {length} bytes exceeds the maximum of {max_body}")
    return [HEADER.pack(MAGIC, VERSION, msg_type, flags, length, crc), *parts]


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    flags: int
    body: bytes


_Malformed = TruncatedFrame | BadMagic | BadVersion | FrameTooLarge | BadCrc

SCRATCH = 256 * 1024  # where headers and small frames land
DIRECT = 64 * 1024  # a body at least this large is read into the large-body buffer


class FrameDecoder:
    """Incremental decoder with two ways in, both linear in the bytes received.

    `feed(data)` takes bytes as a transport's data_received delivers them.
    `get_buffer()` / `buffer_updated(n)` follow asyncio.BufferedProtocol: the
    transport (or TLS layer) writes straight into memory we hand out. Small frames
    collect in a scratch buffer; a body of DIRECT bytes or more is read into a
    large-body buffer (kept and reused, so it grows to the largest body seen, at
    most max_body) with its CRC computed piece by piece while the bytes are still in
    cache. Either way each body is copied out once, into the immutable bytes that
    `Frame.body` and the messages built on it can keep: a 1 MiB body costs one copy
    (two on the `feed` path), never a series of re-joins, and the buffers are reused
    rather than allocated and zeroed per frame.

    After a malformed frame the decoder is poisoned: the stream has lost its framing
    and every further call raises the same error.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._buf = bytearray(SCRATCH)
        self._start = 0  # first unparsed byte in _buf
        self._end = 0  # end of received bytes in _buf
        self._header: tuple[int, int, int, int] | None = None  # type, flags, length, crc
        self._large = bytearray()  # reused for every large body
        self._body: memoryview | None = None  # the large body being filled, in _large
        self._fill = 0
        self._crc = 0  # running CRC-32C of _body[:_fill]
        self._error: _Malformed | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (including a parsed header)."""
        pending = self._end - self._start + self._fill
        return pending + (HEADER.size if self._header is not None else 0)

    def feed(self, data: Buffer) -> list[Frame]:
        """Decode `data` (copied in, so the caller may reuse its buffer)."""
        if self._error is not None:
            raise self._error
        view = memoryview(data).cast("B")
        frames: list[Frame] = []
        pos = 0
        try:
            while pos < len(view):
                target = self.get_buffer()
                n = min(len(target), len(view) - pos)
                target[:n] = view[pos : pos + n]
                pos += n
                frames += self.buffer_updated(n)
        except (BadMagic, BadVersion, FrameTooLarge, BadCrc) as exc:
            exc.frames = frames + exc.frames
            raise
        return frames

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (never empty)."""
        if self._error is not None:
            raise self._error
        if self._body is not None:
            return self._body[self._fill :]
        if len(self._buf) - self._end < DIRECT:
            # Move the unparsed tail (less than a header plus a small body) to the front.
            pending = self._end - self._start
            self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """`nbytes` were written at the start of the last get_buffer(): decode them."""
        if self._body is None:
            self._end += nbytes
            return self._parse()
        body = self._body
        self._crc = crc32c(body[self._fill : self._fill + nbytes], self._crc)
        self._fill += nbytes
        if self._fill < len(body):
            return []
        assert self._header is not None
        msg_type, flags, _, crc = self._header
        self._header, self._body, self._fill = None, None, 0
        if self._crc != crc:
            self._poison(BadCrc(f"CRC-32C mismatch on a {len(body)}-byte body of type {msg_type}"))
        return [Frame(msg_type, flags, body.tobytes())]

    def eof(self) -> None:
        """The stream ended: raise TruncatedFrame if part of a frame is pending."""
        if self._error is not None:
            raise self._error
        if self.buffered:
            self._poison(TruncatedFrame(f"stream ended with {self.buffered} bytes of a frame"))

    def _poison(self, exc: _Malformed) -> NoReturn:
        self._error = exc
        self._buf = self._large = bytearray()
        self._body = None
        self._start = self._end = self._fill = 0
        raise exc

    def _parse(self) -> list[Frame]:
        frames: list[Frame] = []
        buf = self._buf
        try:
            while True:
                available = self._end - self._start
                if self._header is None:
                    if available < HEADER.size:
                        break
                    self._header = self._parse_header(buf, self._start)
                    self._start += HEADER.size
                    available -= HEADER.size
                msg_type, flags, length, crc = self._header
                if available >= length:
                    body = bytes(memoryview(buf)[self._start : self._start + length])
                    self._start += length
                    self._header = None
                    if crc32c(body) != crc:
                        raise BadCrc(f"CRC-32C mismatch on a {length}-byte body of type {msg_type}")
                    frames.append(Frame(msg_type, flags, body))
                    continue
                if length >= DIRECT:
                    # Large and incomplete: read the rest in place, not via the scratch.
                    if len(self._large) < length:
                        self._large = bytearray(length)
                    target = memoryview(self._large)[:length]
                    target[:available] = memoryview(buf)[self._start : self._end]
                    self._body, self._fill = target, available
                    self._crc = crc32c(target[:available])
                    self._start = self._end = 0
                break
        except (BadMagic, BadVersion, FrameTooLarge, BadCrc) as exc:
            exc.frames = frames
            self._poison(exc)
        if self._start == self._end:
            self._start = self._end = 0
        return frames

    def _parse_header(self, buf: bytearray, offset: int) -> tuple[int, int, int, int]:
        magic, version, msg_type, flags, length, crc = HEADER.unpack_from(buf, offset)
        if magic != MAGIC:
            raise BadMagic(f"bad magic {bytes(magic)!r}")
        if version != VERSION:
            raise BadVersion(f"protocol version {version} (this side speaks {VERSION})")
        if length > self.max_body:
            raise FrameTooLarge(f"frame announces {length} bytes, maximum is {self.max_body}")
        return msg_type, flags, length, crc
