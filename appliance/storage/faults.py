"""Named fault points for testing durability protocols.

Production code calls :func:`fault_point` at each step where a crash or an I/O error
would leave a distinct on-disk state (between "journal synced" and "replica written",
half-way through a batch, before a catalogue commit...). Normally that is a no-op; a
test installs a hook with :func:`set_fault_hook` that may raise ``OSError(ENOSPC)`` to
simulate a full disk at exactly that step, or ``os._exit()`` to simulate kill -9.
The hook only injects the fault: the code under test runs unmodified.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum


class FaultPoint(StrEnum):
    """Every step of the storage engine where a fault can be injected."""

    JOURNAL_WRITE = "journal.write"  # before the journal write(2) of a batch
    JOURNAL_WRITTEN = "journal.written"  # records written, not yet fdatasync'ed
    JOURNAL_ROLLOVER = "journal.rollover"  # old segment synced, new one not yet created
    JOURNAL_SYNCED = "journal.synced"  # undo durable, replica not yet touched
    REPLICA_WRITE = "replica.write"  # before each extent is written to the replica
    REPLICA_WRITTEN = "replica.written"  # whole batch in the replica, not yet synced
    REPLICA_SYNCED = "replica.synced"  # replica durable, catalogue not yet committed
    CATALOGUE_COMMIT = "catalogue.commit"  # inside the transaction, before COMMIT
    RECOVERY_RESTORE = "recovery.restore"  # before each undo record is restored
    RECOVERY_RESTORED = "recovery.restored"  # replica rolled back, journal not yet cut
    JOURNAL_TRUNCATE = "journal.truncate"  # before the journal is cut back
    RETENTION_DROP = "retention.drop"  # points deleted, segment files not yet removed
    SPOOL_WRITE = "spool.write"  # before each chunk of a commit's write(2)s
    SPOOL_WRITTEN = "spool.written"  # commit's records written, not yet fdatasync'ed
    SPOOL_ROLLOVER = "spool.rollover"  # full segment synced, the next not yet created
    SPOOL_SYNCED = "spool.synced"  # commit durable, durable_seq not yet published
    SPOOL_RELEASE = "spool.release"  # acked segments chosen, not yet unlinked


FaultHook = Callable[[FaultPoint], None]

_hook: FaultHook | None = None


def set_fault_hook(hook: FaultHook | None) -> FaultHook | None:
    """Install ``hook`` (or remove it with None); returns the previous hook."""
    global _hook  # noqa: PLW0603 - one process-wide hook is the point
    previous = _hook
    _hook = hook
    return previous


def fault_point(point: FaultPoint) -> None:
    """Give an installed hook the chance to crash or fail here."""
    hook = _hook
    if hook is not None:
        hook(point)
