"""Errors of the master target's storage engine: one root, specific leaves.

Operator-facing errors (a bad name, an unknown point, a full disk) carry a message fit
for one line; :class:`JournalCorrupt` means data on disk is damaged and deserves a
traceback in the log.
"""

from __future__ import annotations


class TargetError(Exception):
    """Root of every error the master target raises on purpose."""


class InvalidName(TargetError, ValueError):
    """A disk or output name that is not a safe single path component."""


class InvalidSize(TargetError, ValueError):
    """A disk size that is not a positive multiple of 512 bytes."""


class AlreadyExists(TargetError):
    """A file (or disk record) that must be created is already there; nothing is clobbered."""


class DiskSizeMismatch(TargetError):
    """A disk was opened with a size different from the one it was created with."""


class ExtentOutOfRange(TargetError):
    """An extent outside the disk, or not aligned to 512-byte sectors."""


class SequenceGap(TargetError):
    """A change arrived with a sequence number beyond the next expected one."""

    def __init__(self, disk_id: str, expected: int, got: int) -> None:
        super().__init__(f"disk {disk_id}: expected sequence {expected}, got {got}")
        self.disk_id = disk_id
        self.expected = expected
        self.got = got


class UnknownDisk(TargetError, KeyError):
    """No replica disk with that id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownPoint(TargetError, KeyError):
    """No recovery point with that tag id (for that machine or disk)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PointUnusable(TargetError):
    """The recovery point needs a journal record that is corrupt (or already pruned)."""


class JournalCorrupt(TargetError):
    """An undo record failed its CRC (or could not be parsed) where it must be valid."""

    def __init__(self, message: str, lsn: int) -> None:
        super().__init__(f"{message} (lsn {lsn})")
        self.lsn = lsn


class InvalidDescriptor(TargetError):
    """A VMDK descriptor that is not a monolithicFlat descriptor this engine can use."""


class ReplicaMissing(TargetError):
    """The catalogue knows a disk whose replica files are gone after data was applied."""


class StorageFull(TargetError):
    """The journal, the replica or the catalogue hit ENOSPC/EDQUOT.

    The disk is left consistent: nothing whose undo record was not durable reached the
    replica, and the sequence was not advanced past what the replica holds. Resume
    sending from ``DiskReplica.applied_seq + 1`` once space is available.
    """
