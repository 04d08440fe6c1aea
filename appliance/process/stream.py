"""One disk's change stream in the spool (the on-disk format is in :class:`Spool`)."""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_right
from collections import deque
from pathlib import Path
from typing import Any

from appliance.process.errors import (
    InvalidAck,
    SequenceGap,
    SpoolCorrupt,
    StorageFull,
    StreamClosed,
    StreamMismatch,
)
from appliance.process.records import (
    READ_RECORDS,
    SEGMENT_MAGIC,
    SEGMENT_VERSION,
    SUFFIX,
    PendingRecord,
    SpoolMessage,
    StreamMeta,
)
from appliance.process.scan import scan_stream
from appliance.process.spoolio import SpaceAccount, read_run, write_batch
from appliance.storage.atomic import fsync_dir
from appliance.storage.faults import FaultPoint, fault_point
from appliance.storage.fileio import is_no_space
from appliance.storage.segments import (
    SEGMENT_HEADER,
    Segment,
    SegmentCorrupt,
    create_segment,
    cut_segment,
    load_segments,
)

_META_LAZY_NS = 5_000_000_000  # target_acked_seq reaches meta.json at least this often


class SpoolStream:
    """One disk's change stream: records ``seq`` 1, 2, 3... (format: :class:`Spool`).

    ``append`` runs on the event loop thread and only touches memory. ``commit`` (a
    committer thread) writes everything pending with one fdatasync. ``read`` and
    ``release`` run on worker threads. What a commit made durable also stays in memory
    (within the spool's budget, see SpaceAccount) until it is first read, so a forwarder
    keeping up takes it from there instead of reading it back and checking it again.
    Locks, always taken in this order: ``_io_lock``
    keeps reads and releases apart (no segment is unlinked under a reader);
    ``_commit_lock`` keeps commits apart from each other and from replacing the active
    segment; ``_lock`` guards the in-memory state and is never held over I/O.
    """

    def __init__(
        self, directory: Path, meta: StreamMeta, segment_bytes: int, account: SpaceAccount
    ) -> None:
        self.directory = directory
        self.disk_id = meta.disk_id
        self.machine_id = meta.machine_id
        self.size = meta.size
        self.corrupt_at_seq: int | None = None  # first damaged durable seq, if any
        self._damage_to = 0
        self._segment_bytes = segment_bytes
        self._account = account
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._pending: list[PendingRecord] = []
        self._inflight: list[PendingRecord] = []  # taken by the commit in progress
        self._queued_payload = 0  # payload bytes of pending + inflight
        self._queued_bytes = 0  # record bytes of pending + inflight (reserved in account)
        self._recent: deque[PendingRecord] = deque()  # durable, contiguous, not read yet
        self._closed = False
        self._acked = self._persisted_acked = meta.target_acked_seq
        self._persisted_at = time.monotonic_ns()
        self._recover()

    # -- opening -----------------------------------------------------------------------

    def _recover(self) -> None:
        try:
            segments = load_segments(
                self.directory, magic=SEGMENT_MAGIC, version=SEGMENT_VERSION, suffix=SUFFIX
            )
        except SegmentCorrupt as exc:
            raise SpoolCorrupt(f"stream {self.disk_id}: {exc}") from exc
        if not segments:
            segments = [self._create_segment(0)]
        scan = scan_stream(segments, self._acked)
        if scan.cut_to is not None:
            cut_segment(segments[-1], scan.cut_to)  # never durable, so never acked
        self._segments = segments
        self._seg_first = scan.seg_first
        self._index = scan.index
        for first, last in scan.damage:
            self._mark_damage(first, last)
        if not scan.damage or scan.damage[0][0] >= self._index.base:
            # Records below the first one were released, so the target had them.
            self._acked = max(self._acked, self._index.base - 1)
        self._appended = self._durable = self._index.last_seq
        self._end = segments[-1].end
        self._wfd = os.open(segments[-1].path, os.O_WRONLY | os.O_CLOEXEC)
        self._account.settle(0, self.disk_bytes)
        if self._acked > self._durable:  # a crash interrupted a release that rebased
            self._drop_acked()
            self._replace_active(force=True)

    def _create_segment(self, start: int) -> Segment:
        return create_segment(
            self.directory, start, magic=SEGMENT_MAGIC, version=SEGMENT_VERSION,
            owner=self.disk_id, suffix=SUFFIX,
        )  # fmt: skip

    # -- figures -----------------------------------------------------------------------

    @property
    def appended_seq(self) -> int:
        """Highest seq accepted by append (maybe not durable yet)."""
        return self._appended

    @property
    def durable_seq(self) -> int:
        """Highest seq made durable by commit: what the agent may be acknowledged."""
        return self._durable

    @property
    def target_acked_seq(self) -> int:
        """Highest seq the master target acknowledged (see release)."""
        return self._acked

    @property
    def disk_bytes(self) -> int:
        with self._lock:
            return sum(SEGMENT_HEADER.size + s.length for s in self._segments)

    @property
    def backlog_bytes(self) -> int:
        """Payload bytes (as on the wire) of records above target_acked_seq, pending
        records included."""
        with self._lock:
            durable = self._index.payload(self._acked + 1, self._durable)
            return durable + self._queued_payload

    @property
    def backlog_records(self) -> int:
        return max(0, self._appended - self._acked)

    @property
    def oldest_unforwarded_ns(self) -> int | None:
        """Receive time of the oldest record the target has not acknowledged."""
        with self._lock:
            seq = max(self._acked + 1, self._index.base)
            if seq <= self._durable:
                return int(self._index.received[seq - self._index.base])
            queued = self._inflight or self._pending
            return queued[0].received_ns if queued else None

    # -- appending and committing -------------------------------------------------------

    def append(self, msg: SpoolMessage, received_ns: int | None = None) -> bool:
        """Queue ``msg`` for the next commit; False for a resend already accepted.

        No I/O: the record references ``msg``'s payload until it is written, so the
        payload must not change meanwhile. Raises SequenceGap for a seq beyond the next
        one and SpoolFull at the spool's limit (nothing appended either way).
        """
        if msg.disk_id != self.disk_id:
            raise StreamMismatch(f"a record for {msg.disk_id} sent to stream {self.disk_id}")
        with self._lock:
            if self._closed:
                raise StreamClosed(f"stream {self.disk_id} is closed")
            if msg.seq <= self._appended:
                return False
            if msg.seq != self._appended + 1:
                raise SequenceGap(self.disk_id, self._appended + 1, msg.seq)
            rec = PendingRecord.of(msg, time.time_ns() if received_ns is None else received_ns)
            self._account.reserve(rec.size, self.disk_id)
            self._pending.append(rec)
            self._appended = msg.seq
            self._queued_payload += rec.payload_len
            self._queued_bytes += rec.size
        return True

    def commit(self) -> int:
        """Write every pending record, fdatasync once, publish; returns durable_seq.

        On ENOSPC/EDQUOT the segment is cut back to its last good record and the
        longest prefix of the batch that fits is tried (halving), so a full disk still
        lets what fits become durable (and be acknowledged, forwarded, released);
        the rest stays pending and StorageFull is raised after publishing the prefix.
        """
        with self._commit_lock:
            with self._lock:
                if self._closed:
                    raise StreamClosed(f"stream {self.disk_id} is closed")
                batch, self._pending = self._pending, []
                if not batch:
                    return self._durable
                self._inflight = batch
                # Only commits append to _recent (reads and releases take from its
                # front), so this still holds when the batch is published.
                follows = not self._recent or self._recent[-1].seq + 1 == batch[0].seq
            # A batch kept in memory for the forwarder needs no page cache copy.
            claimed = sum(rec.size for rec in batch) if follows else 0
            keep = follows and self._account.take_recent(claimed)
            try:
                (active_length, fresh, end), fitted = self._write_fitting(batch, keep)
            except BaseException as exc:
                if keep:
                    self._account.give_recent(claimed)
                with self._lock:
                    self._pending = batch + self._pending
                    self._inflight = []
                if isinstance(exc, OSError) and is_no_space(exc):
                    raise StorageFull(
                        f"spool of {self.disk_id}: {exc.strerror}; "
                        f"{len(self._pending)} records kept pending"
                    ) from exc
                raise
            batch, rest = batch[:fitted], batch[fitted:]
            written = sum(rec.size for rec in batch)
            with self._lock:
                pos = self._end
                for rec in batch:
                    self._index.add(pos, rec.size, rec.payload_len, rec.received_ns)
                    pos += rec.size
                self._segments[-1].length = active_length
                for f in fresh:
                    self._segments.append(f.segment)
                    self._seg_first.append(f.first_seq)
                self._end = end
                self._durable = batch[-1].seq
                self._inflight = []
                self._pending = rest + self._pending
                self._queued_payload -= sum(rec.payload_len for rec in batch)
                self._queued_bytes -= written
                if keep:
                    self._recent.extend(batch)
                old_fds = [self._wfd] + [f.fd for f in fresh[:-1]] if fresh else []
                if fresh:
                    self._wfd = fresh[-1].fd
            for fd in old_fds:
                os.close(fd)
            self._account.settle(written, written + SEGMENT_HEADER.size * len(fresh))
            if keep and rest:
                self._account.give_recent(claimed - written)
            if rest:
                raise StorageFull(
                    f"spool of {self.disk_id}: no space left on device; durable up to "
                    f"{batch[-1].seq}, {len(self._pending)} records kept pending"
                )
            return batch[-1].seq

    def _write_fitting(self, batch: list[Any], drop_cache: bool) -> tuple[Any, int]:
        """write_batch the longest prefix of `batch` that fits: all, else halves on ENOSPC."""
        count = len(batch)
        while True:
            try:
                result = write_batch(
                    self._segments[-1], self._wfd, self._end, batch[:count],
                    segment_bytes=self._segment_bytes, create=self._create_segment,
                    drop_cache=drop_cache,
                )  # fmt: skip
                return result, count
            except OSError as exc:
                if not is_no_space(exc) or count == 1:
                    raise
                count //= 2

    def _drop_recent(self, upto_seq: int) -> None:
        """(Under _lock.) Forget the kept records <= ``upto_seq``."""
        freed = 0
        while self._recent and self._recent[0].seq <= upto_seq:
            freed += self._recent.popleft().size
        if freed:
            self._account.give_recent(freed)

    # -- reading -----------------------------------------------------------------------

    def read(self, after_seq: int, max_bytes: int) -> list[SpoolMessage]:
        """Durable records with seq > ``after_seq`` in order, up to about ``max_bytes``
        of payload (at least one record if there is any).

        Raises SpoolCorrupt when the first record to return is damaged; damage found
        further on ends the batch early and is raised by the next call.
        """
        with self._io_lock:
            recent = self._read_recent(after_seq, max_bytes)
            if recent:
                return recent
            plan = self._plan_read(after_seq, max_bytes)
            out: list[SpoolMessage] = []
            for segment, first_seq, positions, sizes in plan:
                got, damage = read_run(segment, first_seq, positions, sizes, self.disk_id)
                out += got
                if damage is not None:
                    seq = first_seq + len(got) if damage.seq is None else damage.seq
                    with self._lock:
                        self._mark_damage(seq, seq)
                    if out:
                        return out  # the records before the damage are good
                    raise damage
            return out

    def _read_recent(self, after_seq: int, max_bytes: int) -> list[SpoolMessage]:
        """The records ``read`` would return, from memory, when the first of them is kept
        there (they are forgotten as they are returned); else []."""
        with self._lock:
            if self._closed:
                raise StreamClosed(f"stream {self.disk_id} is closed")
            self._drop_recent(after_seq)
            recent = self._recent
            if not recent or recent[0].seq != after_seq + 1:
                return []
            if self.corrupt_at_seq is not None and after_seq < self._damage_to:
                return []  # the disk path knows what to say about damage
            out: list[SpoolMessage] = []
            payload = freed = 0
            # The same bounds as RecordIndex.count_within: payload, whole size, count.
            while recent and (not out or (
                payload + recent[0].payload_len <= max_bytes
                and freed + recent[0].size <= max_bytes and len(out) < READ_RECORDS
            )):  # fmt: skip
                rec = recent.popleft()
                out.append(rec.msg)
                payload += rec.payload_len
                freed += rec.size
        self._account.give_recent(freed)
        return out

    def _plan_read(
        self, after_seq: int, max_bytes: int
    ) -> list[tuple[Segment, int, list[int], list[int]]]:
        """Which records to read, grouped by segment: (segment, first seq, positions,
        sizes)."""
        with self._lock:
            if self._closed:
                raise StreamClosed(f"stream {self.disk_id} is closed")
            index = self._index
            want, last = after_seq + 1, self._durable
            if self.corrupt_at_seq is not None and want <= self._damage_to:
                if want >= self.corrupt_at_seq:
                    raise SpoolCorrupt(
                        f"stream {self.disk_id}: records {self.corrupt_at_seq}.."
                        f"{self._damage_to} are damaged; the disk needs a resync",
                        self.corrupt_at_seq,
                    )
                last = self.corrupt_at_seq - 1
            first = max(want, index.base)  # below base: released, the target has them
            if first > last:
                return []
            i = first - index.base
            n = index.count_within(first, last, max_bytes)
            positions, sizes = index.pos[i : i + n].tolist(), index.size[i : i + n].tolist()
            plan: list[tuple[Segment, int, list[int], list[int]]] = []
            k = 0
            while k < n:
                s = bisect_right(self._segments, positions[k], key=lambda seg: seg.start) - 1
                end = self._segments[s].end
                j = k
                while j < n and positions[j] < end:
                    j += 1
                plan.append((self._segments[s], first + k, positions[k:j], sizes[k:j]))
                k = j
            return plan

    def _mark_damage(self, first: int, last: int) -> None:
        known = self.corrupt_at_seq
        self.corrupt_at_seq = first if known is None else min(first, known)
        self._damage_to = max(last, self._damage_to)

    # -- releasing ---------------------------------------------------------------------

    def release(self, acked_seq: int) -> int:
        """The master target made everything <= ``acked_seq`` durable: delete the
        segments whose records it all has; returns the bytes freed.

        ``target_acked_seq`` reaches meta.json lazily, and always before the last record
        that carries the sequence goes. Beyond ``appended_seq`` (the target has more
        than this spool ever held: a new spool, a replaced process server) the stream
        moves its base there when nothing is pending, else InvalidAck.
        """
        with self._io_lock:
            with self._lock:
                if self._closed:
                    raise StreamClosed(f"stream {self.disk_id} is closed")
                if acked_seq > self._acked:
                    if acked_seq > self._durable and (self._pending or self._inflight):
                        raise InvalidAck(
                            f"stream {self.disk_id}: target acknowledged {acked_seq}, "
                            f"beyond durable {self._durable} with records pending"
                        )
                    self._acked = acked_seq
                    self._drop_recent(acked_seq)
                    if self.corrupt_at_seq is not None and self._damage_to <= acked_seq:
                        self.corrupt_at_seq = None  # the target has the damaged range
                        self._damage_to = 0
                elif self._acked <= self._durable and not self._account.full():
                    return 0
                rebase = self._acked > self._durable
            freed = self._drop_acked()
            freed += self._replace_active(force=rebase)
            if (
                self._acked > self._persisted_acked
                and time.monotonic_ns() - self._persisted_at >= _META_LAZY_NS
            ):
                try:
                    self._persist_meta()
                except OSError as exc:  # only an optimisation: the target ignores resends
                    if not is_no_space(exc):
                        raise
            return freed

    def _persist_meta(self) -> None:
        acked = self._acked
        StreamMeta(self.disk_id, self.machine_id, self.size, acked).save(self.directory)
        self._persisted_acked = acked
        self._persisted_at = time.monotonic_ns()

    def _drop_acked(self) -> int:
        """Unlink the sealed segments whose records are all acknowledged."""
        with self._lock:
            k = 0
            while k < len(self._segments) - 1 and self._seg_first[k + 1] - 1 <= self._acked:
                k += 1
            doomed = self._segments[:k]
            records_left = k < len(self._segments) - 1 or self._segments[-1].length > 0
            covered = self._seg_first[k] - 1  # the highest seq in the doomed segments
        if not doomed:
            return 0
        if not records_left and self._persisted_acked < covered:
            # No record would be left to carry the sequence: meta.json must.
            try:
                self._persist_meta()
            except OSError as exc:
                if not is_no_space(exc):
                    raise
                doomed = doomed[:-1]  # keep one record; the next release retries
        fault_point(FaultPoint.SPOOL_RELEASE)
        for segment in doomed:  # oldest first: a crash leaves a log that starts later
            segment.path.unlink(missing_ok=True)
        freed = sum(SEGMENT_HEADER.size + s.length for s in doomed)
        if doomed:
            fsync_dir(self.directory)
            with self._lock:
                del self._segments[: len(doomed)]
                del self._seg_first[: len(doomed)]
                self._index.drop_before(self._seg_first[0])
            self._account.settle(0, -freed)
        return freed

    def reclaim(self) -> int:
        """Replace the active segment if every record in it is acknowledged; returns
        the bytes freed. An idle stream otherwise keeps up to one segment of records
        the target already has (a busy one rolls over and releases it)."""
        with self._io_lock:
            return self._replace_active(force=False, eager=True)

    def _replace_active(self, force: bool, eager: bool = False) -> int:
        """Swap a fully acknowledged active segment for an empty one so it can go too:
        when ``force``d (the base moves past everything held), when the spool is full
        (a busy stream rolls over soon anyway; a full spool cannot wait), or ``eager``.
        It costs two atomic creations, so it is not done on every release."""
        with self._commit_lock:
            with self._lock:
                active = self._segments[-1]
                if force and (self._pending or self._inflight):
                    raise InvalidAck(f"stream {self.disk_id}: records arrived while rebasing")
                if force and len(self._segments) > 1:
                    raise StorageFull(f"spool of {self.disk_id}: no space to record the base")
                if self._durable > self._acked or len(self._segments) > 1:
                    return 0
                wanted = eager or self._account.full()
                if not force and not (active.length and wanted):
                    return 0
                old, end = active, self._end
            fresh: Segment | None = None
            try:
                if old.length:
                    fresh = self._create_segment(end)
                self._persist_meta()  # the new base must survive without records to carry it
            except OSError as exc:
                if fresh is not None:
                    fresh.path.unlink(missing_ok=True)
                if not is_no_space(exc):
                    raise
                if force:
                    raise StorageFull(f"spool of {self.disk_id}: {exc.strerror}") from exc
                return 0
            nfd = os.open(fresh.path, os.O_WRONLY | os.O_CLOEXEC) if fresh else -1
            with self._lock:
                self._durable = max(self._durable, self._acked)
                self._appended = max(self._appended, self._acked)
                if fresh is not None:
                    self._segments = [fresh]
                    old_fd, self._wfd = self._wfd, nfd
                self._seg_first = [self._durable + 1]
                self._index.drop_before(self._durable + 1)
            if fresh is None:
                return 0
            os.close(old_fd)
            old.path.unlink(missing_ok=True)
            fsync_dir(self.directory)
            freed = old.length  # net: the new segment's header replaces the old one's
            self._account.settle(0, -freed)
            return freed

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the files; records not committed are dropped (never acknowledged)."""
        with self._io_lock, self._commit_lock:
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                dropped, self._queued_bytes = self._queued_bytes, 0
                self._pending, self._queued_payload = [], 0
                self._drop_recent(self._appended)
            self._account.settle(dropped, 0)
            os.close(self._wfd)
            if self._acked > self._persisted_acked:
                try:
                    self._persist_meta()
                except OSError as exc:  # lazily persisted anyway; resends are harmless
                    if not is_no_space(exc):
                        raise

    def destroy(self) -> int:
        """Close and delete the stream's files; returns the bytes freed."""
        self.close()
        freed = self.disk_bytes
        for segment in self._segments:
            segment.path.unlink(missing_ok=True)
        for leftover in self.directory.iterdir():
            leftover.unlink()
        self.directory.rmdir()
        fsync_dir(self.directory.parent)
        self._account.settle(0, -freed)
        return freed
