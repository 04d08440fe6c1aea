"""Errors of the wire protocol: one root, one leaf per error code, and their counters.

Every error that can cross the wire has a numeric `ErrorCode`; the code travels in an
ERROR frame (see `messages.Error`) and is what operators see in counters. The numbers
are part of the protocol: never renumber, only append.

Raising side: a `WireError` leaf carries its fixed code. Receiving side: an ERROR frame
from the peer becomes `PeerError`, which carries the peer's code and message.
`ConnectionClosed` is local only (the stream ended) and is never sent.
"""

from __future__ import annotations

import threading
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.wire.framing import Frame


class ErrorCode(IntEnum):
    TRUNCATED = 1  # the stream ended in the middle of a frame
    FRAME_TOO_LARGE = 2  # header announces a body larger than the receiver's maximum
    BAD_MAGIC = 3
    BAD_VERSION = 4
    BAD_CRC = 5
    UNKNOWN_TYPE = 6
    MALFORMED_BODY = 7
    OUT_OF_WINDOW = 8  # sequence beyond what the receiver accepts (a gap)
    WINDOW_EXCEEDED = 9  # more unacknowledged bytes than the advertised window
    BAD_CERTIFICATE = 10  # TLS handshake refused: counted only, the peer sees a TLS alert
    PROTOCOL_VIOLATION = 11  # a valid message at the wrong time
    UNKNOWN_DISK = 12
    STORAGE_FAILURE = 13  # the receiver cannot make data durable (disk full, I/O error)
    INVALID_REQUEST = 14  # bad names, sizes or parameters from the peer
    INTERNAL = 15  # a bug on our side
    SHUTTING_DOWN = 16


class WireError(Exception):
    """Root of every wire protocol error; `code` is what an ERROR frame would carry."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str = "", *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        name = self.code.name.lower()
        return f"{name}: {self.message}" if self.message else name


class MalformedFrame(WireError):
    """The peer's bytes do not form a valid frame or message: the connection must close.

    `frames` holds the valid frames decoded from the same input before the bad one, so
    a decoder user can still deliver them in order before failing.
    """

    code = ErrorCode.MALFORMED_BODY

    def __init__(self, message: str = "", *, code: ErrorCode | None = None) -> None:
        super().__init__(message, code=code)
        self.frames: list[Frame] = []


class TruncatedFrame(MalformedFrame):
    code = ErrorCode.TRUNCATED


class FrameTooLarge(MalformedFrame):
    code = ErrorCode.FRAME_TOO_LARGE


class BadMagic(MalformedFrame):
    code = ErrorCode.BAD_MAGIC


class BadVersion(MalformedFrame):
    code = ErrorCode.BAD_VERSION


class BadCrc(MalformedFrame):
    code = ErrorCode.BAD_CRC


class UnknownType(MalformedFrame):
    code = ErrorCode.UNKNOWN_TYPE


class MalformedBody(MalformedFrame):
    code = ErrorCode.MALFORMED_BODY


class OutOfWindow(WireError):
    code = ErrorCode.OUT_OF_WINDOW


class WindowExceeded(WireError):
    code = ErrorCode.WINDOW_EXCEEDED


class BadCertificate(WireError):
    code = ErrorCode.BAD_CERTIFICATE


class ProtocolViolation(WireError):
    code = ErrorCode.PROTOCOL_VIOLATION


class UnknownDisk(WireError):
    code = ErrorCode.UNKNOWN_DISK


class StorageFailure(WireError):
    code = ErrorCode.STORAGE_FAILURE


class InvalidRequest(WireError):
    code = ErrorCode.INVALID_REQUEST


class InternalError(WireError):
    code = ErrorCode.INTERNAL


class ShuttingDown(WireError):
    code = ErrorCode.SHUTTING_DOWN


class PeerError(WireError):
    """The peer sent an ERROR frame. `code` is the peer's code; `raw_code` the number sent.

    A code this version does not know (a newer peer) is kept in `raw_code` and `code`
    becomes INTERNAL, so callers can always switch on an `ErrorCode`.
    """

    def __init__(self, code: ErrorCode | int, message: str = "") -> None:
        known = code if isinstance(code, ErrorCode) else _known_code(code)
        super().__init__(message, code=known if known is not None else ErrorCode.INTERNAL)
        self.raw_code = int(code)

    def __str__(self) -> str:
        return f"peer error {super().__str__()}"


class ConnectionClosed(WireError):
    """The connection ended (EOF, reset, or closed locally). Never sent on the wire.

    Its code is SHUTTING_DOWN only so that every WireError has one.
    """

    code = ErrorCode.SHUTTING_DOWN


_BY_CODE: dict[ErrorCode, type[WireError]] = {
    cls.code: cls
    for cls in (
        TruncatedFrame,
        FrameTooLarge,
        BadMagic,
        BadVersion,
        BadCrc,
        UnknownType,
        MalformedBody,
        OutOfWindow,
        WindowExceeded,
        BadCertificate,
        ProtocolViolation,
        UnknownDisk,
        StorageFailure,
        InvalidRequest,
        InternalError,
        ShuttingDown,
    )
}
assert set(_BY_CODE) == set(ErrorCode), "every code needs its leaf class"


def _known_code(value: int) -> ErrorCode | None:
    try:
        return ErrorCode(value)
    except ValueError:
        return None


def error_for(code: ErrorCode | int, message: str = "") -> WireError:
    """The leaf exception for `code` (an unknown number gives a WireError with INTERNAL)."""
    known = code if isinstance(code, ErrorCode) else _known_code(code)
    if known is None:
        return WireError(f"unknown error code {int(code)}: {message}", code=ErrorCode.INTERNAL)
    return _BY_CODE[known](message)


class ErrorCounters:
    """Thread-safe counts of errors per code, for status pages and metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[ErrorCode, int] = dict.fromkeys(ErrorCode, 0)

    def count(self, code: ErrorCode, n: int = 1) -> None:
        with self._lock:
            self._counts[code] += n

    def get(self, code: ErrorCode) -> int:
        with self._lock:
            return self._counts[code]

    def snapshot(self) -> dict[str, int]:
        """Every code by lowercased name, zeros included (a stable shape for metrics)."""
        with self._lock:
            return {code.name.lower(): n for code, n in self._counts.items()}

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
