"""Errors of the process server: one root, specific leaves.

Operator-facing errors (a bad name, a full spool or filesystem) carry a message fit for
one line; :class:`SpoolCorrupt` means bytes on disk are damaged and deserves a
traceback in the log and a health condition (the stream needs a resync).
"""

from __future__ import annotations


class ProcessError(Exception):
    """Root of every error the process server raises on purpose."""


class InvalidName(ProcessError, ValueError):
    """A disk or machine id that is not a safe single path component."""


class InvalidSize(ProcessError, ValueError):
    """A disk size that is not a positive integer."""


class InvalidSettings(ProcessError, ValueError):
    """Spool settings out of range (a configuration mistake)."""


class StreamMismatch(ProcessError, ValueError):
    """A stream reopened with another machine or size, or a message for another disk."""


class InvalidAck(ProcessError, ValueError):
    """The master target acknowledged a sequence the spool cannot reconcile."""


class UnknownStream(ProcessError, KeyError):
    """No spool stream with that disk id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StreamClosed(ProcessError):
    """The stream (or its spool) was closed or removed."""


class SequenceGap(ProcessError):
    """A record arrived with a sequence number beyond the next expected one."""

    def __init__(self, disk_id: str, expected: int, got: int) -> None:
        super().__init__(f"stream {disk_id}: expected sequence {expected}, got {got}")
        self.disk_id = disk_id
        self.expected = expected
        self.got = got


class SpoolFull(ProcessError):
    """The spool reached its configured size limit; nothing was appended.

    Back-pressure, not a failure: stop reading from agents until the master target's
    acknowledgements let :meth:`SpoolStream.release` free whole segments.
    """


class StorageFull(ProcessError):
    """The filesystem under the spool hit ENOSPC/EDQUOT during a commit.

    The segment was cut back to its last good record; the pending records are kept and
    the next :meth:`SpoolStream.commit` writes them once space returns.
    """


class SpoolCorrupt(ProcessError):
    """Records that were made durable are damaged (CRC, framing or a missing range).

    ``seq`` is the first damaged sequence number when known. The data is not dropped
    silently: the stream keeps ``corrupt_at_seq`` until the damaged range is released.
    """

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message if seq is None else f"{message} (seq {seq})")
        self.seq = seq
