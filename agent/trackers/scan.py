"""The scan tracker: find changed chunks by re-reading the disk and comparing digests.

Works on any host and any kernel, at the cost of one full read of the disk per
`drain`. The tracefs tracker is the fast path; this is the fallback and the reference.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from agent.digest import ALGORITHM, ALIGN, DIGEST_SIZE, READ_SIZE, DeviceReader
from agent.discovery import Disk, refresh
from agent.errors import StateCorrupt
from agent.trackers.base import CHUNK, DirtyMap, Tracker, fine_chunk
from appliance.checksum import crc32c
from appliance.storage.atomic import atomic_write

log = logging.getLogger(__name__)

_MAGIC = b"SSDIGST\n"
_VERSION = 1
_ALGORITHMS = {"xxh3_128": 1}
# magic, version, algorithm, major, minor, size, chunk, nchunks, crc
_HEADER = struct.Struct("<8sHHIIQIQI")
assert _HEADER.size == 44
_CRC_AT = _HEADER.size - 4
_FINE_SIZE = 8  # xxh3_64 per fine block: change detection within a chunk, memory only
FINE_MEMORY = 64 << 20  # fine digests per disk, at most (4 KiB blocks up to 32 GiB)


class ScanTracker:
    """Per-chunk digests of one disk, compared with the digests last replicated.

    Three digest sets, all DIGEST_SIZE bytes per chunk (`agent.digest`):
    - *baseline* (memory): what the disk held at the last scan; `drain` reports the
      chunks whose digest moved away from it, then moves it;
    - *committed* (persisted): what the replica holds, as told by `commit` once the
      master target acknowledged it;
    - *uncertain* (persisted bitmap): chunks whose committed digest may not match the
      replica: never known (first start, lost file), or sent and not yet acknowledged.

    Crash safety: `drain` marks what it reports as uncertain and persists that before
    returning, i.e. before any of it can be sent. `commit` clears a chunk only when its
    digest equals the latest baseline (nothing newer has been reported since). So after
    any crash, every chunk is either certain (the replica holds exactly the committed
    digest: comparing with it is exact) or uncertain (reported by `needs_resync` and
    compared with the master target's digests). An unacknowledged change is never
    lost and never blindly resent; a stale committed digest is never trusted, which
    matters for blocks that flip back to older contents (allocation bitmaps do).

    State file (little-endian), rewritten whole with `atomic_write` on every change:

        offset  size        field
        0       8           magic b"SSDIGST\\n"
        8       2           version (1)
        10      2           algorithm (1 = xxh3_128)
        12      4           device major
        16      4           device minor
        20      8           device size in bytes
        28      4           chunk size in bytes
        32      8           nchunks = ceil(size / chunk)
        40      4           CRC-32C of bytes 0..39 followed by the body
        44      16*nchunks  committed digests, chunk i at 44 + 16 * i (zeros if unknown)
        ...     ceil(n/8)   uncertain bitmap (`DirtyMap.to_bytes` layout)

    A file for another device identity (major:minor, size, chunk, algorithm) is
    ignored as foreign; a file failing magic, version, CRC or length checks is ignored
    as corrupt (logged once). Either way every chunk starts uncertain, which means a
    full checksum resync, never trust and never a blind full copy.

    Fine reporting: `drain` reports at `fine` granularity (4 KiB by default, see
    `fine_chunk`), so a 4 KiB write sends 4 KiB, not its 64 KiB chunk. The scan itself
    stays at `chunk` (one C-speed digest and one compare per 64 KiB, a whole read
    compared at once when nothing moved); only a chunk whose digest moved is looked at
    closer: an 8-byte xxh3_64 per fine block, kept in memory (8 bytes per 4 KiB, capped
    at FINE_MEMORY by coarsening) against the previous scan's. A chunk without fine
    digests (it was written while no agent ran) is reported whole, once; `start` reads
    the disk once for the fine digests of the others.

    Not thread-safe: one caller drives one tracker. Every method may block on I/O.
    """

    name = "scan"

    def __init__(
        self,
        disk: Disk,
        state_path: Path,
        *,
        chunk: int = CHUNK,
        fine: int | None = None,
        read_size: int = READ_SIZE,
        sys_root: Path = Path("/sys"),
    ) -> None:
        if chunk % ALIGN or not ALIGN <= chunk <= read_size:
            raise ValueError(f"chunk {chunk}: a multiple of {ALIGN} up to read_size {read_size}")
        fine = fine or min(chunk, fine_chunk(disk.size, max_bitmap=FINE_MEMORY // 64))
        if fine % ALIGN or chunk % fine:
            raise ValueError(f"fine {fine}: a multiple of {ALIGN} that divides chunk {chunk}")
        self.fine = fine
        self.disk = disk
        self.state_path = state_path
        self.chunk = chunk
        self.read_size = read_size
        self.sys_root = sys_root
        self.nchunks = -(-disk.size // chunk)
        self._baseline = bytearray()
        self._committed = bytearray()
        self._uncertain = DirtyMap(disk.size, chunk)
        self._resync: DirtyMap | None = None
        self._started = False
        # Fine digests of the chunks in `_fine_known` (memory only): see the class doc.
        self._fine = bytearray()
        self._fine_known = DirtyMap(disk.size, chunk)

    # -- the Tracker interface -------------------------------------------------------

    def start(self) -> None:
        """Load the persisted digests and scan the uncertain chunks into the baseline,
        so writes from now on show up in `drain` even while they are being resynced."""
        self.disk = refresh(self.disk, self.sys_root)
        try:
            loaded = self._load()
        except StateCorrupt as exc:
            log.warning("%s; %s", exc, exc.hint)
            loaded = None
        if loaded is None:
            self._committed = bytearray(self.nchunks * DIGEST_SIZE)
            self._uncertain = DirtyMap.full(self.disk.size, self.chunk)
        else:
            self._committed, self._uncertain = loaded
        self._baseline = bytearray(self._committed)
        self._fine = bytearray(-(-self.disk.size // self.fine) * _FINE_SIZE)
        self._fine_known = DirtyMap(self.disk.size, self.chunk)
        if self._uncertain:
            self._scan(self._uncertain.runs(), None)
        self._learn_fine(_gaps(self._uncertain.runs(), self.nchunks))
        self._resync = self._uncertain.copy() if self._uncertain else None
        self._started = True

    def drain(self) -> DirtyMap:
        """Scan the whole disk; the `fine` blocks that changed since the previous scan.

        Raises DeviceGone / DeviceResized (from `discovery.refresh` or a short read).
        """
        self._require_started()
        self.disk = refresh(self.disk, self.sys_root)
        changed = DirtyMap(self.disk.size, self.fine)
        self._scan([(0, self.nchunks)], changed)
        if changed:
            for offset, length in changed.extents():
                self._uncertain.mark(offset, length)
            self._persist()
        return changed

    def needs_resync(self) -> DirtyMap | None:
        self._require_started()
        gap, self._resync = self._resync, None
        return gap

    def stop(self) -> None:
        # Everything worth keeping was persisted when it changed; nothing to flush.
        self._started = False

    # -- replication feedback --------------------------------------------------------

    def commit(self, digests: Mapping[int, bytes]) -> None:
        """Record what the master target acknowledged (or, after a checksum resync, was
        found to hold already): chunk index -> digest of the exact bytes it has.

        Pass the digests of the data as sent (`agent.digest.chunk_digest`), not as
        scanned: the disk may have changed in between. Call in acknowledgement order;
        each call is one atomic write of the state file, so batch acknowledgements.
        """
        self._require_started()
        dirty = False
        for index, digest in digests.items():
            if not 0 <= index < self.nchunks or len(digest) != DIGEST_SIZE:
                raise ValueError(f"bad commit for chunk {index}: {len(digest)}-byte digest")
            at = index * DIGEST_SIZE
            if self._committed[at : at + DIGEST_SIZE] != digest:
                self._committed[at : at + DIGEST_SIZE] = digest
                dirty = True
            # Clear only if no newer content was reported since: then this digest is
            # both what the replica holds and what the disk held at the last scan.
            if index in self._uncertain and self._baseline[at : at + DIGEST_SIZE] == digest:
                self._uncertain.discard_chunk(index)
                dirty = True
        if dirty:
            self._persist()

    @property
    def uncertain(self) -> DirtyMap:
        """Chunks not (yet) known to match the replica; a copy."""
        return self._uncertain.copy()

    # -- internals -------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("ScanTracker used before start() or after stop()")

    def _scan(self, runs: Iterable[tuple[int, int]], changed: DirtyMap | None) -> None:
        """Digest `runs` of chunks into the baseline; mark the fine blocks that moved in
        `changed` (None: the baseline scan of `start`)."""
        baseline, chunk = self._baseline, self.chunk
        with DeviceReader(self.disk.path, self.disk.size, self.read_size) as reader:
            for first, digests, data in reader.scan(runs, chunk):
                at = first * DIGEST_SIZE
                end = at + len(digests)
                if changed is None:  # the baseline is what the disk holds now: so are these
                    self._store_fine(first, data, digests, digests)
                # Fast path: a whole read (64 chunks by default) unchanged is one compare.
                elif baseline[at:end] != digests:
                    for k in range(0, len(digests), DIGEST_SIZE):
                        if baseline[at + k : at + k + DIGEST_SIZE] != digests[k : k + DIGEST_SIZE]:
                            offset = k // DIGEST_SIZE * chunk
                            self._closer(first + k // DIGEST_SIZE,
                                         data[offset : offset + chunk], changed)  # fmt: skip
                baseline[at:end] = digests

    def _learn_fine(self, runs: Iterable[tuple[int, int]]) -> None:
        """Read `runs` of chunks (those `start` did not scan) for the fine digests of
        every chunk that holds its baseline now (not one written while no agent ran:
        that one is reported whole), so that the first change of a chunk is reported
        at `fine` granularity too."""
        if self.fine == self.chunk:
            return
        baseline = self._baseline
        with DeviceReader(self.disk.path, self.disk.size, self.read_size) as reader:
            for first, digests, data in reader.scan(runs, self.chunk):
                at = first * DIGEST_SIZE
                self._store_fine(first, data, digests, baseline[at : at + len(digests)])

    def _store_fine(
        self, first: int, data: memoryview, digests: bytes, baseline: bytes | bytearray
    ) -> None:
        """Fine digests of a read from chunk `first` on; known for the chunks whose
        digest (in `digests`) equals their `baseline` one."""
        if self.fine == self.chunk:
            return
        digest, chunk, fine = xxhash.xxh3_64_digest, self.chunk, self.fine
        at = first * chunk // fine * _FINE_SIZE
        new = b"".join([digest(data[k : k + fine]) for k in range(0, len(data), fine)])
        self._fine[at : at + len(new)] = new
        if digests == baseline:
            self._fine_known.mark(first * chunk, len(data))
            return
        for k in range(0, len(digests), DIGEST_SIZE):
            if digests[k : k + DIGEST_SIZE] == baseline[k : k + DIGEST_SIZE]:
                self._fine_known.mark_chunk(first + k // DIGEST_SIZE)

    def _closer(self, index: int, data: memoryview, changed: DirtyMap) -> None:
        """Chunk `index` moved: mark its fine blocks that did (all of them when its fine
        digests are unknown) and keep their new digests."""
        fine = self.fine
        if fine == self.chunk:
            changed.mark_chunk(index)
            return
        digest = xxhash.xxh3_64_digest
        new = b"".join([digest(data[at : at + fine]) for at in range(0, len(data), fine)])
        first = index * self.chunk // fine
        at, end = first * _FINE_SIZE, first * _FINE_SIZE + len(new)
        if index not in self._fine_known:
            changed.mark(index * self.chunk, len(data))
            self._fine_known.mark_chunk(index)
        else:
            old, moved = self._fine, False
            for k in range(0, len(new), _FINE_SIZE):
                if old[at + k : at + k + _FINE_SIZE] != new[k : k + _FINE_SIZE]:
                    changed.mark_chunk(first + k // _FINE_SIZE)
                    moved = True
            if not moved:  # the 8-byte digests collided where the 16-byte one did not
                changed.mark(index * self.chunk, len(data))
        self._fine[at:end] = new

    def _identity(self) -> tuple[int, int, int, int, int, int]:
        return (
            _ALGORITHMS[ALGORITHM],
            self.disk.major,
            self.disk.minor,
            self.disk.size,
            self.chunk,
            self.nchunks,
        )

    def _persist(self) -> None:
        body = bytes(self._committed) + self._uncertain.to_bytes()
        algorithm, major, minor, size, chunk, nchunks = self._identity()
        header = _HEADER.pack(_MAGIC, _VERSION, algorithm, major, minor, size, chunk, nchunks, 0)
        crc = crc32c(body, crc32c(header[:_CRC_AT]))
        atomic_write(self.state_path, header[:_CRC_AT] + struct.pack("<I", crc) + body, 0o600)

    def _load(self) -> tuple[bytearray, DirtyMap] | None:
        """The persisted (committed, uncertain), or None when absent or foreign."""
        path = self.state_path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            log.info("%s: no digest file, full checksum resync", path)
            return None
        if len(data) < _HEADER.size:
            raise StateCorrupt(path, f"{len(data)} bytes, shorter than the header")
        magic, version, algorithm, major, minor, size, chunk, nchunks, crc = _HEADER.unpack_from(
            data
        )
        if magic != _MAGIC:
            raise StateCorrupt(path, "not a digest file (bad magic)")
        if version != _VERSION:
            raise StateCorrupt(path, f"unsupported version {version}")
        if crc32c(data[_HEADER.size :], crc32c(data[:_CRC_AT])) != crc:
            raise StateCorrupt(path, "CRC mismatch")
        found = (algorithm, major, minor, size, chunk, nchunks)
        if found != self._identity():
            log.warning(
                "%s: digests of %d:%d (%d bytes, %d-byte chunks), not of %s; ignored",
                path,
                major,
                minor,
                size,
                chunk,
                self.disk.devno,
            )
            return None
        digests_end = _HEADER.size + nchunks * DIGEST_SIZE
        bitmap = data[digests_end:]
        try:
            uncertain = DirtyMap.from_bytes(bitmap, size, chunk)
        except ValueError as exc:
            raise StateCorrupt(path, f"uncertain bitmap: {exc}") from exc
        return bytearray(data[_HEADER.size : digests_end]), uncertain


def _gaps(runs: Iterable[tuple[int, int]], n: int) -> Iterator[tuple[int, int]]:
    """The runs [first, end) of 0..n not in the ascending `runs`."""
    previous = 0
    for first, end in runs:
        if first > previous:
            yield previous, first
        previous = end
    if previous < n:
        yield previous, n


if TYPE_CHECKING:

    def _implements_tracker(tracker: ScanTracker) -> Tracker:  # checked by mypy only
        return tracker
