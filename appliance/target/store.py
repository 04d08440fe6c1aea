"""The master target's storage engine as one object: disks, points, failover, upkeep.

Layout::

    <state_dir>/catalogue.db          recovery points and checkpoints (catalogue.py)
    <state_dir>/journal/<disk_id>/    undo journal segments (journal.py)
    <datastore>/<disk_id>/            replica VMDK pair (vmdk.py)

Opening the store opens every disk the catalogue knows and runs its crash recovery, so
after a restart each replica holds exactly its stream up to ``durable_seq``. A disk
whose recovery fails (its journal is damaged after the checkpoint) is kept aside:
:meth:`ReplicaStore.disk` re-raises that error, the other disks work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from appliance.storage.atomic import fsync_dir
from appliance.storage.fileio import is_no_space
from appliance.target import vmdk
from appliance.target.catalogue import Catalogue, DiskRow, PointRow
from appliance.target.errors import (
    AlreadyExists,
    DiskSizeMismatch,
    JournalCorrupt,
    PointUnusable,
    ReplicaMissing,
    StorageFull,
    TargetError,
    UnknownDisk,
    UnknownPoint,
)
from appliance.target.journal import Journal
from appliance.target.points import PointKind, RecoveryPoint, materialize_disk
from appliance.target.replica import DiskReplica
from appliance.target.retention import PruneReport, ScrubReport, prune_disk, scrub_disk

__all__ = [
    "DiskInfo",
    "DiskReplica",
    "PointKind",
    "PruneReport",
    "RecoveryPoint",
    "ReplicaStore",
    "ScrubReport",
    "StoreSettings",
]

log = logging.getLogger(__name__)

MIB = 1 << 20
GIB = 1 << 30
MIN_SEGMENT = 64 << 10


@dataclass(frozen=True)
class StoreSettings:
    """Resolved storage settings (validated here, whatever file they came from)."""

    journal_level: int = 1
    segment_bytes: int = 64 * MIB
    batch_bytes: int = 8 * MIB
    retention_seconds: float = 72 * 3600
    retention_bytes: int = 64 * GIB

    def __post_init__(self) -> None:
        if not 1 <= self.journal_level <= 22:
            raise ValueError(f"journal_level must be 1..22 (zstd), got {self.journal_level}")
        if self.segment_bytes < MIN_SEGMENT:
            # A record larger than a segment gets a segment of its own, so this is only
            # a sanity floor, not a fit requirement.
            raise ValueError(f"segment_bytes must be at least {MIN_SEGMENT}")
        if self.batch_bytes < vmdk.SECTOR or self.batch_bytes % vmdk.SECTOR:
            raise ValueError(f"batch_bytes must be a positive multiple of {vmdk.SECTOR}")
        if self.batch_bytes > 1 << 30:
            raise ValueError("batch_bytes above 1 GiB would defeat the memory bound")
        if self.retention_seconds <= 0 or self.retention_bytes <= 0:
            raise ValueError("retention_seconds and retention_bytes must be positive")


@dataclass(frozen=True)
class DiskInfo:
    disk_id: str
    machine_id: str
    size: int
    vmdk: Path
    applied_seq: int
    durable_seq: int
    journal_bytes: int


class ReplicaStore:
    """Thread-safe façade over the catalogue, the journals and the replica disks."""

    def __init__(self, state_dir: Path, datastore: Path, settings: StoreSettings) -> None:
        self.state_dir = state_dir
        self.datastore = datastore
        self.settings = settings
        state_dir.mkdir(parents=True, exist_ok=True)
        datastore.mkdir(parents=True, exist_ok=True)
        (state_dir / "journal").mkdir(exist_ok=True)
        self._lock = threading.RLock()
        # Shared by every disk: encoding undo records is the CPU-heavy part of apply.
        self._encoders = ThreadPoolExecutor(
            max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="undo-encode"
        )
        self._catalogue = Catalogue(state_dir / "catalogue.db")
        self._disks: dict[str, DiskReplica] = {}
        self._broken: dict[str, TargetError] = {}
        for row in self._catalogue.disks():
            try:
                self._disks[row.disk_id] = self._load(row)
            except (JournalCorrupt, ReplicaMissing) as exc:
                log.error("disk %s cannot be recovered: %s", row.disk_id, exc)
                self._broken[row.disk_id] = exc

    def _load(self, row: DiskRow) -> DiskReplica:
        pair = vmdk.replica_paths(self.datastore, row.disk_id)
        if not pair.flat.exists() and row.durable_seq == 0 and row.checkpoint_lsn == 0:
            # The crash window between the catalogue insert and the file creation.
            vmdk.create_replica(self.datastore, row.disk_id, row.size)
        journal = Journal(
            self.state_dir / "journal" / row.disk_id, row.disk_id,
            segment_bytes=self.settings.segment_bytes, durable_lsn=row.checkpoint_lsn,
        )  # fmt: skip
        try:
            return DiskReplica(
                disk_id=row.disk_id, machine_id=row.machine_id, size=row.size,
                vmdk=pair.descriptor, flat=pair.flat, journal=journal,
                catalogue=self._catalogue, durable_seq=row.durable_seq,
                checkpoint_lsn=row.checkpoint_lsn, batch_bytes=self.settings.batch_bytes,
                journal_level=self.settings.journal_level, encoders=self._encoders,
            )  # fmt: skip
        except BaseException:
            journal.close()
            raise

    # -- disks -----------------------------------------------------------------------

    def open_disk(self, disk_id: str, machine_id: str, size: int) -> DiskReplica:
        """The replica of ``disk_id``, created (sparse VMDK pair) if new."""
        vmdk.validate_name(disk_id)
        vmdk.validate_size(size)
        with self._lock:
            replica = self._disks.get(disk_id)
            if replica is None:
                row = self._catalogue.disk(disk_id)
                if row is None:
                    row = DiskRow(disk_id, machine_id, size,
                                  str(vmdk.replica_paths(self.datastore, disk_id).descriptor),
                                  0, 0, time.time_ns())  # fmt: skip
                    # Catalogue first: a crash before the files exist is repaired by
                    # _load; the reverse order would leave files that block the name.
                    self._catalogue.add_disk(row)
                self._check(row.disk_id, row.machine_id, row.size, machine_id, size)
                replica = self._load(row)
                self._broken.pop(disk_id, None)
                self._disks[disk_id] = replica
            self._check(disk_id, replica.machine_id, replica.size, machine_id, size)
            return replica

    @staticmethod
    def _check(disk_id: str, have_machine: str, have_size: int, machine: str, size: int) -> None:
        if have_size != size:
            raise DiskSizeMismatch(f"disk {disk_id} is {have_size} bytes, not {size}")
        if have_machine != machine:
            raise AlreadyExists(f"disk {disk_id} belongs to machine {have_machine}, not {machine}")

    def disk(self, disk_id: str) -> DiskReplica:
        with self._lock:
            replica = self._disks.get(disk_id)
            if replica is not None:
                return replica
            broken = self._broken.get(disk_id)
        if broken is not None:
            raise broken
        raise UnknownDisk(f"no replica disk {disk_id!r}")

    def disks(self) -> list[DiskInfo]:
        with self._lock:
            replicas = sorted(self._disks.values(), key=lambda r: r.disk_id)
        return [
            DiskInfo(r.disk_id, r.machine_id, r.size, r.vmdk, r.applied_seq, r.durable_seq,
                     r.journal.total_bytes)
            for r in replicas
        ]  # fmt: skip

    def _machine_disks(self, machine_id: str) -> list[DiskReplica]:
        rows = self._catalogue.disks(machine_id)
        if not rows:
            raise UnknownPoint(f"no disks for machine {machine_id!r}")
        return [self.disk(row.disk_id) for row in rows]

    # -- points ----------------------------------------------------------------------

    def newest_points(self) -> dict[str, tuple[str, int, str, int | None]]:
        """Per machine: the newest usable recovery point (tag id, time_ns, kind) and the
        time_ns of the newest app-consistent one (the configuration server's RPO)."""
        return self._catalogue.newest_points()

    def points(
        self, machine_id: str | None = None, disk_id: str | None = None
    ) -> list[RecoveryPoint]:
        """Recovery points oldest first: of one disk, or machine-level (the tag is on
        every disk of the machine), of one machine or of all."""
        if disk_id is not None:
            rows = self._catalogue.points(disk_id=disk_id)
            machine = self.disk(disk_id).machine_id
            return [
                RecoveryPoint(p.tag_id, p.time_ns, PointKind(p.kind), machine, (disk_id,),
                              (p.seq,), p.usable)
                for p in rows
            ]  # fmt: skip
        all_disks = self._catalogue.disks(machine_id)
        by_machine: dict[str, list[str]] = {}
        for row in all_disks:
            by_machine.setdefault(row.machine_id, []).append(row.disk_id)
        result: list[RecoveryPoint] = []
        for machine, disk_ids in by_machine.items():
            tags: dict[str, dict[str, PointRow]] = {}
            for p in self._catalogue.points(machine_id=machine):
                tags.setdefault(p.tag_id, {})[p.disk_id] = p
            for tag_id, per_disk in tags.items():
                if len(per_disk) != len(disk_ids):
                    continue  # not every disk has applied it: not a recovery point (yet)
                rows = [per_disk[d] for d in disk_ids]
                result.append(RecoveryPoint(
                    tag_id, min(r.time_ns for r in rows), PointKind(rows[0].kind), machine,
                    tuple(disk_ids), tuple(r.seq for r in rows), all(r.usable for r in rows),
                ))  # fmt: skip
        result.sort(key=lambda p: (p.time_ns, p.machine_id, p.seqs))
        return result

    def _point(self, disk_id: str, tag_id: str) -> PointRow:
        row = self._catalogue.point(disk_id, tag_id)
        if row is None:
            raise UnknownPoint(f"disk {disk_id} has no recovery point {tag_id!r}")
        if not row.usable:
            raise PointUnusable(
                f"recovery point {tag_id!r} of disk {disk_id} needs a damaged journal record"
            )
        return row

    def _damaged(self, replica: DiskReplica, tag_id: str, exc: JournalCorrupt) -> PointUnusable:
        marked = self._catalogue.mark_unusable(replica.disk_id, exc.lsn)
        log.error("disk %s: %s; %d recovery points marked unusable", replica.disk_id, exc, marked)
        return PointUnusable(f"recovery point {tag_id!r} of disk {replica.disk_id}: {exc}")

    def materialize_disk(self, disk_id: str, tag_id: str, out_dir: Path, name: str) -> Path:
        """Write disk ``disk_id`` at point ``tag_id`` to a new pair ``out_dir/<name>.vmdk``
        without pausing apply; returns the descriptor path."""
        replica = self.disk(disk_id)
        point = self._point(disk_id, tag_id)
        try:
            token = replica.journal.pin(point.lsn)
        except JournalCorrupt as exc:  # its records were pruned meanwhile
            raise PointUnusable(f"recovery point {tag_id!r} of disk {disk_id} was pruned") from exc
        try:
            pair = materialize_disk(
                replica.journal, replica_flat=replica.flat, size=replica.size,
                point_lsn=point.lsn, out_dir=out_dir, name=name,
            )  # fmt: skip
        except JournalCorrupt as exc:
            raise self._damaged(replica, tag_id, exc) from exc
        except OSError as exc:
            if not is_no_space(exc):
                raise
            # An operator's condition, not a bug: answered, not a dropped connection.
            raise StorageFull(
                f"no space left on {out_dir} for the copy of disk {disk_id} "
                f"({replica.size} bytes, sparse)"
            ) from exc
        finally:
            replica.journal.unpin(token)
        return pair.descriptor

    def materialize(self, machine_id: str, tag_id: str, out_dir: Path, suffix: str) -> list[Path]:
        """One new VMDK ``out_dir/<disk_id><suffix>.vmdk`` per disk of the machine, at
        point ``tag_id``. All or nothing: on failure the copies made so far are removed."""
        replicas = self._machine_disks(machine_id)
        for r in replicas:
            vmdk.validate_name(r.disk_id + suffix)
            self._point(r.disk_id, tag_id)
        made: list[Path] = []
        try:
            for r in replicas:
                made.append(self.materialize_disk(r.disk_id, tag_id, out_dir, r.disk_id + suffix))
        except BaseException:
            for descriptor in made:
                flat = descriptor.with_name(descriptor.stem + "-flat.vmdk")
                descriptor.unlink(missing_ok=True)
                flat.unlink(missing_ok=True)
            raise
        return made

    def discard(self, machine_id: str, out_dir: Path, suffix: str) -> list[Path]:
        """Remove the copies `materialize(machine_id, _, out_dir, suffix)` made (a test
        failover's cleanup); nothing if they are gone. Never the replica itself: the
        suffix must be non-empty, and only `<disk_id><suffix>` pairs are touched."""
        if not suffix:
            raise ValueError("discard needs the copy's suffix (the replica is never discarded)")
        removed = []
        for r in self._machine_disks(machine_id):
            name = r.disk_id + suffix
            vmdk.validate_name(name)
            for path in (out_dir / f"{name}.vmdk", out_dir / f"{name}-flat.vmdk"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
        if removed:
            fsync_dir(out_dir)
        return removed

    def rollback_disk(self, disk_id: str, tag_id: str) -> None:
        """Roll the replica of ``disk_id`` itself back to ``tag_id`` (apply stopped)."""
        replica = self.disk(disk_id)
        point = self._point(disk_id, tag_id)
        if point.lsn < replica.journal.start_lsn:
            raise PointUnusable(f"recovery point {tag_id!r} of disk {disk_id} was pruned")
        try:
            replica.rollback_to(point)
        except JournalCorrupt as exc:
            raise self._damaged(replica, tag_id, exc) from exc

    def rollback(self, machine_id: str, tag_id: str) -> None:
        """Failover: fence every disk of the machine (see `DiskReplica.fence`), then roll
        it back to ``tag_id``; later points go. The disks stay fenced until `unfence`."""
        replicas = self._machine_disks(machine_id)
        for r in replicas:  # refuse before touching any disk
            self._point(r.disk_id, tag_id)
        for r in replicas:
            self.disk(r.disk_id).fence(True)
        for r in replicas:
            self.rollback_disk(r.disk_id, tag_id)

    def unfence(self, machine_id: str) -> list[str]:
        """Let the machine's streams apply again (cancel, failback); the disks unfenced."""
        done = []
        for r in self._machine_disks(machine_id):
            replica = self.disk(r.disk_id)
            if replica.fenced:
                replica.fence(False)
                done.append(r.disk_id)
        return done

    def drop_points(self, machine_id: str) -> int:
        """A committed failover: the VM wrote to the replicas with no journal, so every
        older point is gone (retention then frees their journal)."""
        return sum(self._catalogue.drop_points(r.disk_id) for r in self._machine_disks(machine_id))

    # -- upkeep ----------------------------------------------------------------------

    def prune(self, now_ns: int | None = None) -> PruneReport:
        """Apply retention (age and journal size) to every disk."""
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            replicas = list(self._disks.values())
        report = PruneReport()
        for r in replicas:
            report += prune_disk(
                r, self._catalogue, now_ns=now,
                retention_seconds=self.settings.retention_seconds,
                retention_bytes=self.settings.retention_bytes,
            )  # fmt: skip
        return report

    def scrub(self) -> ScrubReport:
        """Check every journal record's CRC; points needing a damaged one become unusable."""
        with self._lock:
            replicas = list(self._disks.values())
        report = ScrubReport()
        for r in replicas:
            report += scrub_disk(r, self._catalogue)
        return report

    def close(self) -> None:
        """Checkpoint and close every disk, then the catalogue."""
        with self._lock:
            replicas = list(self._disks.values())
            self._disks.clear()
        first: BaseException | None = None
        for r in replicas:
            try:
                r.close()
            except (OSError, TargetError) as exc:  # close the others, then report it
                log.error("disk %s did not close cleanly: %s", r.disk_id, exc)
                first = first or exc
        self._catalogue.close()
        self._encoders.shutdown()
        if first is not None:
            raise first
