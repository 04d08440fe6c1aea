"""Positional I/O on large data files: whole-buffer reads and writes, hole punching,
and a sparse-aware copy.

Replica disks and materialised copies are sparse files; keeping them sparse matters
(a 2 TiB disk that is 10 % used must not cost 2 TiB on the datastore), so zeros are
written back as holes where the filesystem allows it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

# fallocate(2) mode bits from <linux/falloc.h>; Python only exposes posix_fallocate.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_COPY_CHUNK = 8 << 20
_IOV_MAX = 1024  # the kernel's limit on buffers per pwritev
_ZERO_GRANULE = 64 << 10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_punch_supported = True


def is_no_space(exc: BaseException) -> bool:
    """True when ``exc`` says the filesystem (or the quota) is full."""
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read exactly ``length`` bytes at ``offset``; a short file is an EIO."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"short read at {offset + got} (wanted {length - got} more)")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (os.pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def pwritev_all(fd: int, buffers: list[bytes], offset: int) -> None:
    """Write ``buffers`` back to back at ``offset`` with as few syscalls as possible."""
    for i in range(0, len(buffers), _IOV_MAX):
        chunk: list[bytes | memoryview] = list(buffers[i : i + _IOV_MAX])
        while chunk:
            written = os.pwritev(fd, chunk, offset)
            offset += written
            while chunk and written >= len(chunk[0]):
                written -= len(chunk[0])
                chunk.pop(0)
            if chunk and written:
                chunk[0] = memoryview(chunk[0])[written:]


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` read as zeros, as a hole when possible.

    Punching a hole needs no free space, which matters when a write has to be undone
    on a full filesystem; where punching is unsupported, zeros are written.
    """
    global _punch_supported  # noqa: PLW0603 - a process-wide capability probe
    if length <= 0:
        return
    if _punch_supported:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(fd, mode, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        _punch_supported = False
    zeros = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        pwrite_all(fd, memoryview(zeros)[:n], offset)
        offset += n


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(offset, length)`` of the allocated regions of the first ``size`` bytes.

    Uses SEEK_DATA/SEEK_HOLE; a filesystem without them reports one region covering
    everything, which is still correct, only not sparse.
    """
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                return
            if exc.errno == errno.EINVAL:  # no SEEK_DATA support
                yield pos, size - pos
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        pos = end


def copy_sparse(src: int, dst: int, size: int) -> int:
    """Copy the first ``size`` bytes of ``src`` into ``dst`` (a sparse file of at least
    ``size`` bytes that reads as zeros), leaving holes where ``src`` has holes or
    all-zero 64 KiB blocks. Returns the number of bytes written to ``dst``.
    """
    written = 0
    zeros = bytes(_ZERO_GRANULE)
    for start, length in data_extents(src, size):
        pos = start
        end = start + length
        while pos < end:
            chunk = pread_exact(src, min(_COPY_CHUNK, end - pos), pos)
            view = memoryview(chunk)
            # Write maximal runs of non-zero granules; zero granules stay holes. (bytes
            # slices compare with memcmp; memoryview comparison is far slower.)
            run_start = -1
            for g in range(0, len(chunk), _ZERO_GRANULE):
                block = chunk[g : g + _ZERO_GRANULE]
                if block == (zeros if len(block) == _ZERO_GRANULE else bytes(len(block))):
                    if run_start >= 0:
                        pwrite_all(dst, view[run_start:g], pos + run_start)
                        written += g - run_start
                        run_start = -1
                elif run_start < 0:
                    run_start = g
            if run_start >= 0:
                pwrite_all(dst, view[run_start:], pos + run_start)
                written += len(chunk) - run_start
            pos += len(chunk)
    return written
