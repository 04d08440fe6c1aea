"""Retention and scrubbing of the undo journals.

A point at LSN ``l`` needs every record from ``l`` to the journal end, so dropping the
oldest segment, covering ``[a, b)``, removes exactly the points with ``lsn < b``. What
is never dropped: the active (last) segment, records at or after the checkpoint (crash
recovery needs them) and records pinned by a materialisation in progress.

- by age: points taken before ``now - retention_seconds`` are deleted, then the
  segments that end at or before the oldest remaining point's LSN (or the checkpoint,
  if no point remains) serve nobody and are dropped;
- by size: while the journal is larger than ``retention_bytes``, the oldest segments
  are dropped along with the points that needed them.

The catalogue is updated before segment files are removed: after a crash in between
a segment may outlive its points (dropped next time), never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.storage.faults import FaultPoint, fault_point
from appliance.target.catalogue import Catalogue
from appliance.target.journal import SEGMENT_HEADER
from appliance.target.replica import DiskReplica

NS = 1_000_000_000


@dataclass(frozen=True)
class PruneReport:
    points_removed: int = 0
    bytes_freed: int = 0
    segments_removed: int = 0

    def __add__(self, other: PruneReport) -> PruneReport:
        return PruneReport(
            self.points_removed + other.points_removed,
            self.bytes_freed + other.bytes_freed,
            self.segments_removed + other.segments_removed,
        )


@dataclass(frozen=True)
class ScrubReport:
    disks_checked: int = 0
    damaged: tuple[tuple[str, int], ...] = ()  # (disk_id, lsn) of each damaged record
    points_marked_unusable: int = 0

    def __add__(self, other: ScrubReport) -> ScrubReport:
        return ScrubReport(
            self.disks_checked + other.disks_checked,
            self.damaged + other.damaged,
            self.points_marked_unusable + other.points_marked_unusable,
        )


def prune_disk(
    replica: DiskReplica,
    catalogue: Catalogue,
    *,
    now_ns: int,
    retention_seconds: float,
    retention_bytes: int,
) -> PruneReport:
    """Apply both retention rules to one disk (holding off its apply calls briefly)."""
    journal = replica.journal
    with replica.maintenance():
        checkpoint = replica.checkpoint_lsn
        removed = catalogue.delete_points_older(
            replica.disk_id, now_ns - int(retention_seconds * NS)
        )
        remaining = catalogue.points(disk_id=replica.disk_id)
        # Records before the oldest remaining point serve no point and no recovery.
        limit = min([checkpoint, *(p.lsn for p in remaining)])
        bounds = journal.segment_bounds()
        total = journal.total_bytes
        drop_to = bounds[0][0]
        for start, end in bounds[:-1]:
            seg_bytes = SEGMENT_HEADER.size + end - start
            if end <= limit or (total > retention_bytes and end <= checkpoint):
                drop_to = end
                total -= seg_bytes
            else:
                break
        floor = journal.pin_floor()
        if floor is not None and floor < drop_to:
            drop_to = max([bounds[0][0], *(e for _, e in bounds[:-1] if e <= floor)])
        if drop_to <= bounds[0][0]:
            return PruneReport(removed, 0, 0)
        removed += catalogue.delete_points_before(replica.disk_id, drop_to)
        fault_point(FaultPoint.RETENTION_DROP)
        before = len(bounds)
        freed = journal.drop_before(drop_to)
        return PruneReport(removed, freed, before - len(journal.segment_bounds()))


def scrub_disk(replica: DiskReplica, catalogue: Catalogue) -> ScrubReport:
    """Check every record of one disk's journal; mark the points that need a bad one.

    A point at ``l`` needs every record at or after ``l``, so the points at or below the
    newest damaged record are unusable and later points are unaffected.
    """
    journal = replica.journal
    token = journal.pin()
    try:
        damaged = journal.scan_corruption()
    finally:
        journal.unpin(token)
    marked = catalogue.mark_unusable(replica.disk_id, max(damaged)) if damaged else 0
    return ScrubReport(1, tuple((replica.disk_id, lsn) for lsn in damaged), marked)
