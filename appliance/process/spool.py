"""The process server's crash-safe cache of agent streams (DESIGN "Storage")."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from appliance.process.errors import (
    InvalidName,
    InvalidSettings,
    InvalidSize,
    SpoolCorrupt,
    StorageFull,
    StreamMismatch,
    UnknownStream,
)
from appliance.process.records import META_NAME, SUFFIX, StreamMeta
from appliance.process.spoolio import RECENT_BYTES
from appliance.process.stream import SpaceAccount, SpoolStream
from appliance.storage.atomic import fsync_dir
from appliance.storage.fileio import is_no_space

__all__ = ["Spool", "SpoolSettings", "SpoolStream", "validate_name"]

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
SECTOR = 512
MIN_SEGMENT = 64 * KIB
MAX_SEGMENT = 1 * GIB
# The same rule as the master target's disk names (appliance.target.vmdk), so a stream
# the spool accepts is never refused by the target for its name.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe directory name, else raise InvalidName."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -, starting with a "
            "letter or digit, without '..'"
        )
    return name


@dataclass(frozen=True)
class SpoolSettings:
    segment_bytes: int = 16 * MIB
    limit_bytes: int = 8 * GIB  # over all streams; above it append raises SpoolFull
    # Committed records kept in memory for their first read, over all streams (0: none).
    recent_bytes: int = RECENT_BYTES

    def __post_init__(self) -> None:
        for name in ("segment_bytes", "limit_bytes", "recent_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidSettings(f"spool {name} must be an integer, got {value!r}")
        if not MIN_SEGMENT <= self.segment_bytes <= MAX_SEGMENT:
            raise InvalidSettings(
                f"spool segment_bytes must be {MIN_SEGMENT}..{MAX_SEGMENT}, "
                f"got {self.segment_bytes}"
            )
        if self.recent_bytes < 0:
            raise InvalidSettings(f"spool recent_bytes must be >= 0, got {self.recent_bytes}")
        if self.limit_bytes < 4 * self.segment_bytes:
            raise InvalidSettings(
                f"spool limit_bytes ({self.limit_bytes}) must be at least four segments "
                f"({4 * self.segment_bytes}): whole segments are what a release frees"
            )


class Spool:
    """Per-disk streams of records, durable before the agent is acknowledged and kept
    until the master target has acknowledged them.

    On disk, under the spool directory::

        <disk_id>/meta.json            the stream's metadata, replaced atomically
        <disk_id>/<start:016x>.spool   segments; each starts where the one before ends

    meta.json: ``{"version": 1, "disk_id", "machine_id", "size", "target_acked_seq"}``.
    ``target_acked_seq`` is written lazily (the master target ignores resends), but
    always before the last record that still carries the stream's sequence is deleted.

    A segment is ``SEGMENT_HEADER record*`` (appliance.storage.segments: magic
    b"SSSPOOL1", version 1, start = log position of its first record, owner = disk
    id), created complete via a synced temp file. A log position counts record bytes
    over all segments of the stream, segment headers excluded, from 0.

    ::

        record = RECORD_HEADER body
        RECORD_HEADER (48 bytes, little endian)
            magic        u32  0x4C4F4F50 (b"POOL" on disk)
            kind         u8   the wire message type: 5 DATA, 6 TAG, 17 EXTENTS
            flags        u8   0
            reserved     u16  0
            pos          u64  this record's own log position (resync after damage)
            seq          u64  the message's sequence number
            received_ns  u64  when the process server received it (RPO figures)
            body_len     u32  bytes of body that follow
            payload_len  u32  DATA or EXTENTS payload bytes as on the wire (their
                              wire_size; 0 for TAG): backlog figures and read
                              batches without reading bodies
            crc          u32  CRC-32C of the 40 header bytes before it, continued
                              over the body
            hcrc         u32  CRC-32C of the 44 header bytes before it
        body = the wire message body, exactly as the message's encode() gives it
               (Data, Tag, Extents), so its decode() gives the message back. An
               EXTENTS record is one whole message (many extents, one seq): it is
               written, verified, cut, read and released as one record, like a DATA.

    Sequence numbers in a stream are contiguous. A segment rolls over when the next
    record would take it past ``segment_bytes`` (a larger record gets one of its own).

    Durability: a commit writes every pending record, fdatasyncs once, and only then
    moves ``durable_seq``; a rollover fdatasyncs the full segment before creating the
    next, so only the last segment can hold unsynced bytes. A failed commit (ENOSPC)
    cuts its segments back to the last published record.

    Release: a segment is unlinked (oldest first, then the directory is fsynced) once
    every record in it is <= the target's acknowledged seq. The active segment is not,
    unless a fully acknowledged one is swapped for an empty one: when the spool is
    full, on :meth:`reclaim`, or when the target is ahead of everything spooled.

    Recovery on open: sealed segments are walked by header (``read`` checks their
    payload CRCs), the last segment is verified in full. A bad record in the last
    segment with no intact record after it is the torn tail of an interrupted commit
    (never acknowledged, so the agent resends it): the file is cut there. A bad record
    followed by intact ones, or any damage in a sealed segment, is corruption: nothing
    is dropped, the stream's ``corrupt_at_seq`` is set and ``read`` raises
    SpoolCorrupt there. ``durable_seq`` = ``appended_seq`` = the last intact record's
    seq (or ``target_acked_seq``).
    Records <= ``target_acked_seq`` may remain until the next release.

    Structural damage (an unreadable meta.json, a bad segment header, segments that do
    not chain) makes the constructor raise SpoolCorrupt naming the stream.
    """

    def __init__(self, directory: Path, settings: SpoolSettings) -> None:
        self.directory = directory
        self.settings = settings
        self._account = SpaceAccount(settings.limit_bytes, settings.recent_bytes)
        self._lock = threading.Lock()
        self._streams: dict[str, SpoolStream] = {}
        if not directory.is_dir():
            directory.mkdir(parents=True)
            fsync_dir(directory.parent)
        try:
            for entry in sorted(directory.iterdir()):
                if entry.is_dir() and _NAME_RE.fullmatch(entry.name) and ".." not in entry.name:
                    self._open(entry)  # anything else (lost+found on a mount) is not ours
        except BaseException:
            self.close()
            raise

    def _open(self, entry: Path) -> None:
        if not (entry / META_NAME).exists():
            if any(p.name.endswith(SUFFIX) for p in entry.iterdir()):
                raise SpoolCorrupt(f"{entry}: segments without {META_NAME}")
            for leftover in entry.iterdir():  # a creation that crashed before its metadata
                leftover.unlink()
            entry.rmdir()
            fsync_dir(self.directory)
            return
        meta = StreamMeta.load(entry)
        if meta.disk_id != entry.name:
            raise SpoolCorrupt(f"{entry}: {META_NAME} names disk {meta.disk_id!r}")
        self._streams[meta.disk_id] = SpoolStream(
            entry, meta, self.settings.segment_bytes, self._account
        )

    def stream(self, disk_id: str, machine_id: str, size: int) -> SpoolStream:
        """The stream of ``disk_id``, created (durably, so it does disk I/O) if new."""
        validate_name(disk_id)
        if not isinstance(machine_id, str) or not machine_id:
            raise InvalidName(f"invalid machine id {machine_id!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % SECTOR:
            raise InvalidSize(f"disk size must be a positive multiple of {SECTOR}, got {size!r}")
        with self._lock:
            found = self._streams.get(disk_id)
            if found is None:
                path = self.directory / disk_id
                meta = StreamMeta(disk_id, machine_id, size)
                try:
                    path.mkdir(exist_ok=True)  # left by a creation that failed before
                    fsync_dir(self.directory)
                    meta.save(path)
                    found = SpoolStream(path, meta, self.settings.segment_bytes, self._account)
                except OSError as exc:
                    if is_no_space(exc):
                        raise StorageFull(f"spool: no space to create stream {disk_id}") from exc
                    raise
                self._streams[disk_id] = found
        if found.machine_id != machine_id or found.size != size:
            raise StreamMismatch(
                f"stream {disk_id} belongs to machine {found.machine_id} with "
                f"{found.size} bytes, not {machine_id} with {size}"
            )
        return found

    def get(self, disk_id: str) -> SpoolStream:
        with self._lock:
            found = self._streams.get(disk_id)
        if found is None:
            raise UnknownStream(f"no spool stream for disk {disk_id!r}")
        return found

    def streams(self) -> list[SpoolStream]:
        with self._lock:
            return list(self._streams.values())

    def remove(self, disk_id: str) -> int:
        """Delete a stream and all it holds (protection disabled, or a corrupt stream
        replaced by a resync); returns the bytes freed."""
        with self._lock:
            found = self._streams.pop(disk_id, None)
        if found is None:
            raise UnknownStream(f"no spool stream for disk {disk_id!r}")
        return found.destroy()

    @property
    def total_bytes(self) -> int:
        """Bytes on disk over all streams (segment files, headers included)."""
        return self._account.disk

    def full(self) -> bool:
        return self._account.full()

    def reclaim(self) -> int:
        """Free the fully acknowledged active segments of every stream; bytes freed."""
        return sum(s.reclaim() for s in self.streams())

    def close(self) -> None:
        for found in self.streams():
            found.close()
