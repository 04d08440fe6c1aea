"""The apply pipeline of one replica disk: batching, the WAL rule, checkpoints, recovery.

State on disk for disk D (see :mod:`vmdk`, :mod:`journal`, :mod:`catalogue`)::

    <datastore>/D/D-flat.vmdk   the replica: the change stream applied up to some seq
    <state>/journal/D/*.undo    undo records, each written *before* its bytes change
    catalogue disks row         durable_seq, checkpoint_lsn: the replica holds exactly
                                the stream up to durable_seq once the undo records at
                                or after checkpoint_lsn are rolled back

Writes are batched in memory (at most ``batch_bytes``; an extent overlapping one already
in the batch starts a new batch). Flushing a batch: read the old contents of every
extent from the replica (all before any write, so extents of one batch never see each
other's new data; a hole is known to be zeros without reading it), append them to the
journal with ONE fdatasync, and only then write the new data to the replica. A
checkpoint (explicit, or implied by a tag) additionally fdatasyncs the replica and
commits ``(durable_seq, checkpoint_lsn = journal end)`` -- with the recovery point, for
a tag -- in one SQLite transaction.

Threads: the caller's apply thread batches; a shared pool encodes undo records (read,
zstd, CRC32 all release the GIL); the disk's writer thread appends them to the journal
and writes the replica. At most one batch is in flight, so the next one is encoded while
the previous one syncs -- unless they overlap, because undo is read from the replica.

Crash recovery, whenever the journal extends past ``checkpoint_lsn`` (after kill -9 at
any instant, or after a failed flush): roll the records after the checkpoint back onto
the replica, fdatasync it, cut the journal at the checkpoint, ``applied_seq =
durable_seq``. Every intermediate state is covered: a record without its replica write
restores what is already there; a replica write always has its record; a torn journal
tail belongs to a batch whose replica writes never started.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.storage.faults import FaultPoint, fault_point
from appliance.storage.fileio import is_no_space, pread_exact, pwrite_all, write_zeros
from appliance.target.catalogue import Catalogue, PointRow
from appliance.target.errors import (
    ExtentOutOfRange,
    InvalidName,
    ReplicaMissing,
    SequenceGap,
    StorageFull,
)
from appliance.target.holes import HoleMap
from appliance.target.journal import Journal, PendingRecord, encode, encode_zeros
from appliance.target.points import Coverage, PointKind, roll_back
from appliance.target.vmdk import SECTOR
from appliance.wire.messages import Encoding, Extents

log = logging.getLogger(__name__)

MAX_TAG_ID = 128
_ENCODE_GROUP = 1 << 20  # bytes of old contents per encoding job


@dataclass(slots=True)
class _Extent:
    seq: int
    offset: int
    length: int
    data: bytes | memoryview | None  # None: write zeros


class DiskReplica:
    """One replica disk. ``write``/``write_extents``/``write_zero``/``same``/``tag``/
    ``checkpoint``/``recover`` come from one apply thread (other threads may call
    ``checkpoint`` too: calls are serialised); the properties may be read from anywhere.
    Constructing it runs crash recovery if the journal extends past the last checkpoint.

    Errors: SequenceGap and ExtentOutOfRange change nothing. Any I/O error while
    flushing or syncing (StorageFull for ENOSPC/EDQUOT) rolls the disk back to its last
    checkpoint -- ``applied_seq == durable_seq`` afterwards -- so the sender resends
    from ``applied_seq + 1``; if even that rollback cannot run yet, it runs first thing
    on the next call.
    """

    def __init__(
        self,
        *,
        disk_id: str,
        machine_id: str,
        size: int,
        vmdk: Path,
        flat: Path,
        journal: Journal,
        catalogue: Catalogue,
        durable_seq: int,
        checkpoint_lsn: int,
        batch_bytes: int,
        journal_level: int,
        encoders: Executor | None = None,
    ) -> None:
        self._disk_id = disk_id
        self._machine_id = machine_id
        self._size = size
        self._vmdk = vmdk
        self._flat = flat
        self._journal = journal
        self._catalogue = catalogue
        self._batch_limit = batch_bytes
        self._level = journal_level
        self._encoders = encoders
        self._lock = threading.RLock()
        self._batch: list[_Extent] = []
        self._batch_bytes = 0
        self._touched = Coverage()
        # One writer thread per disk: the batch in flight and what it touched.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{disk_id}")
        self._inflight: Future[None] | None = None
        self._inflight_touched = Coverage()
        self._durable_seq = durable_seq
        self._applied_seq = durable_seq
        self._checkpoint_lsn = checkpoint_lsn
        self._pending = 0
        self._unsynced = False
        self._fenced = catalogue.fenced(disk_id)
        self._closed = False
        try:
            self._fd = os.open(flat, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise ReplicaMissing(f"replica of disk {disk_id} is missing: {flat}") from exc
        try:
            actual = os.fstat(self._fd).st_size
            if actual != size:
                raise ReplicaMissing(f"replica {flat} is {actual} bytes, expected {size}")
            self._needs_recovery = journal.end_lsn != checkpoint_lsn
            if self._needs_recovery:
                log.info("disk %s: rolling back %d journal bytes after the last checkpoint",
                         disk_id, journal.end_lsn - checkpoint_lsn)  # fmt: skip
                self._recover()
        except BaseException:
            os.close(self._fd)
            self._writer.shutdown()
            raise

    # -- properties ------------------------------------------------------------------

    @property
    def disk_id(self) -> str:
        return self._disk_id

    @property
    def machine_id(self) -> str:
        return self._machine_id

    @property
    def size(self) -> int:
        return self._size

    @property
    def vmdk(self) -> Path:
        """The replica's descriptor."""
        return self._vmdk

    @property
    def flat(self) -> Path:
        return self._flat

    @property
    def journal(self) -> Journal:
        return self._journal

    @property
    def applied_seq(self) -> int:
        """Highest sequence accepted (in the replica or in the in-memory batch)."""
        return self._applied_seq

    @property
    def durable_seq(self) -> int:
        """Highest sequence that survives a crash: what ACKs carry."""
        return self._durable_seq

    @property
    def checkpoint_lsn(self) -> int:
        return self._checkpoint_lsn

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted since the last checkpoint."""
        return self._pending

    # -- the apply calls ---------------------------------------------------------------

    @property
    def fenced(self) -> bool:
        return self._fenced

    def fence(self, on: bool) -> None:
        """Fenced (a failover rolled the replica back and a VM may run on it): changes
        and tags still arriving (a process server draining its spool) are acknowledged
        and dropped, never applied, so nothing written after the failover point lands
        under the VM. Unfencing (cancel, failback) lets the stream apply again; the
        configuration server follows it with a checksum resync."""
        with self._lock:
            self._heal()
            self.checkpoint()
            self._catalogue.set_fenced(self._disk_id, on)
            self._fenced = on

    def write(self, seq: int, offset: int, data: bytes | memoryview) -> None:
        """Apply change ``seq``: ``data`` at byte ``offset``. Replays are ignored."""
        with self._lock:
            if not self._admit(seq) or self._dropped(seq):
                return
            view = memoryview(data)
            self._check_extent(offset, view.nbytes)
            # The caller may reuse its buffer once we return: keep an immutable copy.
            buf = data if isinstance(data, bytes) else view.tobytes()
            self._accept(seq, offset, view.nbytes, buf)

    def write_extents(self, seq: int, msg: Extents) -> None:
        """Apply change ``seq``: every extent of ``msg`` (RAW bytes, ZERO, SAME), as one.

        Every extent is checked before any is accepted, so a bad message changes nothing
        (ExtentOutOfRange; MalformedBody if its zstd payload lies). Replays are ignored.
        """
        with self._lock:
            if not self._admit(seq):
                return
            for ext in msg.extents:
                self._check_extent(ext.offset, ext.length)
            if msg.encoding is Encoding.RAW and not isinstance(msg.payload, bytes):
                # A view of the caller's receive buffer: the batch keeps one copy of it.
                msg = Extents.of(msg.disk_id, seq, msg.extents, bytes(msg.payload))
            pieces = list(msg.pieces())  # decoded (a zstd payload checked) before the drop
            if self._dropped(seq):
                return
            for ext, data in pieces:
                if ext.kind is Encoding.SAME:
                    continue
                self._accept(seq, ext.offset, ext.length, data)
            self._applied_seq = seq

    def write_zero(self, seq: int, offset: int, length: int) -> None:
        """Apply change ``seq``: zeros over ``[offset, offset+length)`` (a hole)."""
        with self._lock:
            if not self._admit(seq) or self._dropped(seq):
                return
            self._check_extent(offset, length)
            self._accept(seq, offset, length, None)

    def same(self, seq: int, offset: int, length: int) -> None:
        """Change ``seq`` rewrites ``[offset, offset+length)`` with the bytes already there
        (the sender saw an identical write still in flight): advance the sequence only."""
        with self._lock:
            if not self._admit(seq):
                return
            self._check_extent(offset, length)
            self._applied_seq = seq

    def tag(self, seq: int, tag_id: str, kind: PointKind | str, timestamp_ns: int) -> None:
        """Apply tag ``seq``: make everything before it durable and record the point."""
        point_kind = PointKind(kind)
        if not (isinstance(tag_id, str) and 0 < len(tag_id) <= MAX_TAG_ID and tag_id.isprintable()):
            raise InvalidName(f"invalid tag id {tag_id!r}: 1-{MAX_TAG_ID} printable characters")
        with self._lock:
            if not self._admit(seq):
                return
            if self._dropped(seq):  # no point: the replica is not the stream's image
                self.checkpoint()
                return
            self._make_durable()
            lsn = self._journal.end_lsn
            row = PointRow(self._disk_id, tag_id, seq, lsn, timestamp_ns, point_kind, True)
            if not self._catalogue.add_point(row, seq, lsn):
                log.warning("disk %s: tag %r seen again at seq %d; keeping the first one",
                            self._disk_id, tag_id, seq)  # fmt: skip
            self._set_durable(seq, lsn)

    def checkpoint(self) -> int:
        """Make everything accepted durable; returns the new ``durable_seq``."""
        with self._lock:
            self._heal()
            idle = not (self._batch or self._inflight or self._unsynced)
            if self._applied_seq == self._durable_seq and idle:
                return self._durable_seq
            self._make_durable()
            lsn = self._journal.end_lsn
            self._catalogue.set_checkpoint(self._disk_id, self._applied_seq, lsn)
            self._set_durable(self._applied_seq, lsn)
            return self._durable_seq

    def recover(self) -> int:
        """Forget everything accepted after the last checkpoint (after an apply error):
        the replica goes back to exactly ``durable_seq``, which is returned; resend
        from there."""
        with self._lock:
            self._needs_recovery = True
            self._heal()
            return self._durable_seq

    def close(self) -> None:
        """Checkpoint what was accepted, then release the files."""
        with self._lock:
            if self._closed:
                return
            try:
                if not self._needs_recovery:
                    self.checkpoint()
            finally:
                self._closed = True
                self._quiesce()
                self._writer.shutdown()
                os.close(self._fd)
                self._journal.close()

    # -- maintenance (rollback and retention) --------------------------------------------

    @contextmanager
    def maintenance(self) -> Iterator[None]:
        """Hold off apply calls (and other maintenance) on this disk."""
        with self._lock:
            self._heal()
            yield

    def rollback_to(self, point: PointRow) -> None:
        """Roll the replica itself back to ``point`` (failover; apply must be stopped).

        Raises JournalCorrupt, before changing anything, if a record it needs is damaged.
        """
        with self._lock:
            self._heal()
            self.checkpoint()
            # The stream's numbering goes on after the rollback: what the senders hold
            # (acknowledged, after the point) must read as replays, not as a gap.
            resume_seq = self._durable_seq
            with self._journal.exclusive():
                for _ in self._journal.read(point.lsn):
                    pass  # check every CRC first: afterwards there is no way back
                # Moving the checkpoint back first makes the rest plain crash recovery:
                # a crash from here on rolls back to the point when the disk reopens.
                self._catalogue.rollback_to(self._disk_id, point.seq, point.lsn)
                self._durable_seq = point.seq
                self._checkpoint_lsn = point.lsn
                self._needs_recovery = True
                self._recover()
            if resume_seq > point.seq:
                lsn = self._journal.end_lsn
                self._catalogue.set_checkpoint(self._disk_id, resume_seq, lsn)
                self._set_durable(resume_seq, lsn)

    # -- internals -------------------------------------------------------------------

    def _dropped(self, seq: int) -> bool:
        if self._fenced:
            self._applied_seq = seq  # acknowledged (durable at the next checkpoint), unused
        return self._fenced

    def _admit(self, seq: int) -> bool:
        if self._closed:
            raise ValueError(f"disk {self._disk_id} is closed")
        self._heal()
        if seq <= self._applied_seq:
            return False
        if seq != self._applied_seq + 1:
            raise SequenceGap(self._disk_id, self._applied_seq + 1, seq)
        return True

    def _check_extent(self, offset: int, length: int) -> None:
        if (
            offset < 0 or length <= 0 or offset % SECTOR or length % SECTOR
            or offset + length > self._size
        ):  # fmt: skip
            raise ExtentOutOfRange(
                f"disk {self._disk_id}: extent [{offset}, {offset + length}) is not "
                f"{SECTOR}-byte aligned inside [0, {self._size})"
            )

    def _accept(self, seq: int, offset: int, length: int, data: bytes | memoryview | None) -> None:
        # An extent larger than a batch is split so the batch (and its undo) stays bounded.
        view = None if data is None else memoryview(data)
        for pos in range(0, length, self._batch_limit):
            n = min(self._batch_limit, length - pos)
            start = offset + pos
            # Within a batch every old content is read before any write; an overlap would
            # still be correct, but flushing keeps each undo record the image just before
            # its own write, which is the invariant the rest of the engine states.
            overlap = self._touched.overlaps(start, start + n)
            if self._batch and (overlap or self._batch_bytes + n > self._batch_limit):
                self._flush()
            self._touched.claim(start, start + n)
            piece: bytes | memoryview | None
            if view is None:
                piece = None
            elif n == length:
                piece = data
            else:
                piece = view[pos : pos + n]
            self._batch.append(_Extent(seq, start, n, piece))
            self._batch_bytes += n
        self._applied_seq = seq
        self._pending += length

    def _flush(self) -> None:
        """Hand the batch to the disk's writer thread.

        Its undo records are encoded by the pool right away, reading the replica, so
        the batch in flight must have finished writing first if the two overlap;
        otherwise it may still be running (fdatasync, replica writes) meanwhile.
        """
        if not self._batch:
            return
        # In offset order: the extents of a batch never overlap (see _accept), and the
        # kernel writes (and reads) pages in ascending order several times faster than
        # scattered ones: 5120 random 4 KiB pwrites into a cached file 16 us each, 5.5
        # sorted (ext4 here), and the undo groups below become contiguous ranges.
        batch, touched = sorted(self._batch, key=_by_offset), self._touched
        self._batch, self._touched, self._batch_bytes = [], Coverage(), 0
        encoded: list[Future[list[PendingRecord]]] = []
        try:
            if self._inflight is not None and touched.intersects(self._inflight_touched):
                self._settle()
            encoded = self._encode_batch(batch)
            self._settle()
            self._inflight = self._writer.submit(self._write_batch, batch, encoded)
            self._inflight_touched = touched
        except BaseException as exc:
            _abandon(encoded)
            self._fail(exc)
            raise

    def _encode_batch(self, batch: list[_Extent]) -> list[Future[list[PendingRecord]]]:
        """Start encoding the batch's undo records in groups of about 1 MiB: reading,
        zstd and CRC32 release the GIL, so the pool's threads run them in parallel."""
        groups: list[list[_Extent]] = [[]]
        size = 0
        for ext in batch:
            if size >= _ENCODE_GROUP:
                groups.append([])
                size = 0
            groups[-1].append(ext)
            size += ext.length
        if self._encoders is not None and len(groups) > 1:
            return [self._encoders.submit(self._encode, group) for group in groups]
        done: Future[list[PendingRecord]] = Future()
        done.set_result([rec for group in groups for rec in self._encode(group)])
        return [done]

    def _encode(self, group: list[_Extent]) -> list[PendingRecord]:
        out: list[PendingRecord] = []
        holes = HoleMap(self._fd)
        # Ascending (the batch is sorted), so one pair of lseeks answers for a whole run
        # of holes or of data; extents of a batch never overlap: record order is free.
        for ext in group:
            if holes.is_hole(ext.offset, ext.length):
                out.extend(encode_zeros(ext.seq, ext.offset, ext.length))
                continue
            old = pread_exact(self._fd, ext.length, ext.offset)
            out.extend(encode(ext.seq, ext.offset, old, self._level))
        return out

    def _write_batch(
        self, batch: list[_Extent], encoded: list[Future[list[PendingRecord]]]
    ) -> None:
        """In the writer thread: undo records durable first, then the replica (WAL rule)."""
        try:
            self._journal.append(rec for future in encoded for rec in future.result())
        finally:
            _abandon(encoded)
        fault_point(FaultPoint.JOURNAL_SYNCED)
        self._unsynced = True
        for ext in batch:
            fault_point(FaultPoint.REPLICA_WRITE)
            if ext.data is None:
                write_zeros(self._fd, ext.offset, ext.length)
            else:
                pwrite_all(self._fd, ext.data, ext.offset)
        fault_point(FaultPoint.REPLICA_WRITTEN)

    def _settle(self) -> None:
        """Wait for the batch in flight; raises what it failed with."""
        future, self._inflight = self._inflight, None
        if future is not None:
            future.result()

    def _quiesce(self) -> None:
        """Wait for the writer thread before rolling back. The caller is failing already;
        a second error from the batch in flight is only logged."""
        future, self._inflight = self._inflight, None
        if future is not None and (exc := future.exception()) is not None:
            log.warning("disk %s: the batch in flight failed too: %s", self._disk_id, exc)

    def _make_durable(self) -> None:
        self._flush()
        try:
            self._settle()
            if not self._unsynced:
                return
            os.fdatasync(self._fd)
            fault_point(FaultPoint.REPLICA_SYNCED)
        except BaseException as exc:
            self._fail(exc)
            raise
        self._unsynced = False

    def _set_durable(self, seq: int, lsn: int) -> None:
        self._applied_seq = self._durable_seq = seq
        self._checkpoint_lsn = lsn
        self._pending = 0

    def _fail(self, exc: BaseException) -> None:
        """A flush or sync failed: drop the batch and roll back to the checkpoint.

        Raises StorageFull for ENOSPC/EDQUOT; otherwise the caller re-raises ``exc``.
        """
        self._quiesce()
        self._batch = []
        self._batch_bytes = 0
        self._touched.clear()
        self._needs_recovery = True
        # Whether or not the rollback below can run now, this is where the disk goes
        # back to: the sender resumes from here.
        self._applied_seq = self._durable_seq
        self._pending = 0
        if isinstance(exc, OSError):
            try:
                self._heal()
            except StorageFull:
                log.warning("disk %s: rollback to the checkpoint postponed (no space)",
                            self._disk_id)  # fmt: skip
            if is_no_space(exc):
                raise StorageFull(f"disk {self._disk_id}: {exc.strerror or exc}") from exc

    def _heal(self) -> None:
        """Finish an interrupted rollback to the checkpoint before anything else."""
        if not self._needs_recovery:
            return
        self._quiesce()
        try:
            with self._journal.exclusive():
                self._recover()
        except OSError as exc:
            if is_no_space(exc):
                raise StorageFull(f"disk {self._disk_id}: {exc.strerror or exc}") from exc
            raise

    def _recover(self) -> None:
        roll_back(self._fd, self._journal, self._checkpoint_lsn, self._journal.end_lsn)
        os.fdatasync(self._fd)
        fault_point(FaultPoint.RECOVERY_RESTORED)
        self._journal.truncate(self._checkpoint_lsn)
        self._batch = []
        self._batch_bytes = 0
        self._touched.clear()
        self._applied_seq = self._durable_seq
        self._pending = 0
        self._unsynced = False
        self._needs_recovery = False


def _by_offset(ext: _Extent) -> int:
    return ext.offset


def _abandon(futures: list[Future[list[PendingRecord]]]) -> None:
    """Make sure no encoding job still reads the replica: it may be rolled back next."""
    for future in futures:
        future.cancel()
    wait(futures)
