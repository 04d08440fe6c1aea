"""Chunk digests and the device reader behind them: the one definition both the scan
tracker and the checksum resync use, and that the master target must match.

The digest of chunk i of a disk of `size` bytes is xxh3_128 (16 bytes, the canonical
big-endian digest of the xxHash spec) over the disk's bytes [i * chunk,
min((i + 1) * chunk, size)): the last chunk is hashed short, never padded. xxh3_128
rather than blake3: it is not a defence against an adversary who writes the disk
(they own the machine anyway), it is change detection, and it runs at ~9 GB/s here
(FIELD-NOTES), so the read, not the hash, sets the scan speed.

`chunk_digest`, `ALGORITHM` and `DIGEST_SIZE` are defined in `appliance.digest` (the
master target computes the same digests and must not import the agent) and re-exported
here.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

import xxhash

from agent.errors import DeviceResized
from appliance.digest import ALGORITHM, DIGEST_SIZE, chunk_digest

assert ALGORITHM == "xxh3_128"  # DeviceReader.scan calls it directly, per chunk

__all__ = ["ALGORITHM", "ALIGN", "DIGEST_SIZE", "READ_SIZE", "DeviceReader", "chunk_digest"]

READ_SIZE = 4 << 20  # large preads: one syscall per 64 chunks of 64 KiB
ALIGN = 4096  # O_DIRECT alignment that covers every logical sector size in use


class DeviceReader:
    """Reads a block device or image file with O_DIRECT into one aligned buffer.

    Why O_DIRECT: a block device's page cache is not kept coherent with writes a
    mounted filesystem makes through its files' own caches, so a buffered re-read can
    return what an earlier scan cached, i.e. miss a change. O_DIRECT first writes back
    and then bypasses that cache. Where O_DIRECT is refused (tmpfs files), it reads
    buffered after dropping the cache for the range with POSIX_FADV_DONTNEED.

    A read that ends short of `size` means the device shrank: `DeviceResized`.
    """

    def __init__(self, path: Path, size: int, read_size: int = READ_SIZE) -> None:
        if read_size <= 0 or read_size % ALIGN:
            raise ValueError(f"read_size {read_size} is not a positive multiple of {ALIGN}")
        self.path = path
        self.size = size
        self.read_size = read_size
        self.direct = True
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.direct = False
        # An anonymous mapping is page aligned, which O_DIRECT needs of the buffer.
        self._buffer = mmap.mmap(-1, read_size)

    def __enter__(self) -> DeviceReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._buffer.close()

    def _fill(self, offset: int, length: int) -> None:
        """Read the device's [offset, offset + length) into the buffer's first bytes."""
        if length > self.read_size or offset + length > self.size or offset % ALIGN:
            raise ValueError(f"read of {length} at {offset} outside the device or buffer")
        done = 0
        with memoryview(self._buffer) as view:
            while done < length:
                # O_DIRECT wants aligned lengths; the disk end is sector aligned, so
                # rounding up to ALIGN only ever asks past the end, which reads short.
                want = min(-(-(length - done) // ALIGN) * ALIGN, self.read_size - done)
                if not self.direct:
                    os.posix_fadvise(self._fd, offset + done, want, os.POSIX_FADV_DONTNEED)
                try:
                    got = os.preadv(self._fd, [view[done : done + want]], offset + done)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not self.direct:
                        raise
                    self._go_buffered()
                    continue
                if got == 0:
                    raise DeviceResized(str(self.path), self.size, self._current_size())
                done += got

    def _go_buffered(self) -> None:
        """Some filesystems accept O_DIRECT at open and refuse it at read: drop it."""
        flags = os.O_RDONLY | os.O_CLOEXEC
        fd = os.open(self.path, flags)
        os.close(self._fd)
        self._fd = fd
        self.direct = False

    def _current_size(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_END)

    def read(self, offset: int, length: int) -> bytes:
        """A copy of the device's bytes [offset, offset + length), any alignment."""
        parts = []
        end = offset + length
        while offset < end:
            aligned = offset - offset % ALIGN
            step = min(self.read_size, end - aligned)
            self._fill(aligned, step)
            parts.append(self._buffer[offset - aligned : step])
            offset = aligned + step
        return b"".join(parts)

    def digests(self, runs: Iterable[tuple[int, int]], chunk: int) -> Iterator[tuple[int, bytes]]:
        """For each run of chunks [first, end), ascending: (first chunk index of a read,
        the concatenated DIGEST_SIZE digests of the chunks that read covered)."""
        for start, digests, _ in self.scan(runs, chunk):
            yield start, digests

    def scan(
        self, runs: Iterable[tuple[int, int]], chunk: int
    ) -> Iterator[tuple[int, bytes, memoryview]]:
        """`digests`, plus the bytes of the read (valid only until the next step): a
        caller that finds a chunk changed can look closer without reading it again."""
        if chunk % ALIGN or chunk > self.read_size:
            raise ValueError(f"chunk {chunk} must be a multiple of {ALIGN} <= {self.read_size}")
        per_read = self.read_size // chunk
        digest = xxhash.xxh3_128_digest  # chunk_digest, without a call and a copy per chunk
        for first, end in runs:
            for start in range(first, end, per_read):
                offset = start * chunk
                length = min(min(start + per_read, end) * chunk, self.size) - offset
                self._fill(offset, length)
                with memoryview(self._buffer) as view, view[:length] as data:
                    out = b"".join(
                        [digest(data[at : at + chunk]) for at in range(0, length, chunk)]
                    )
                    yield start, out, data
