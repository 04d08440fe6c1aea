"""For the tracker, quiesce and capture tests: where a file's bytes live on its block
device (FIEMAP), direct reads, a thaw of last resort, and a reader slowed on purpose."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import time
from pathlib import Path

import pytest

from agent.quiesce import FITHAW
from agent.trackers.tracefs import TracefsTracker

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 rsv
assert _HEAD.size == 32 and _EXTENT.size == 56


def file_extents(path: Path) -> list[tuple[int, int]]:
    """(device offset, length) of every extent of `path`."""
    return [(physical, length) for _, physical, length in fiemap(path)]


def device_offset(path: Path, file_offset: int) -> int:
    for logical, physical, length in fiemap(path):
        if logical <= file_offset < logical + length:
            return physical + file_offset - logical
    raise ValueError(f"{path}: offset {file_offset} is not mapped")


def fiemap(path: Path) -> list[tuple[int, int, int]]:
    """(file offset, device offset, length) of every extent of `path`, synced first
    (FIEMAP_FLAG_SYNC) so delayed allocation has placed them."""
    result: list[tuple[int, int, int]] = []
    start = 0
    with open(path, "rb") as f:
        while True:
            count = 64
            request = bytearray(_HEAD.size + count * _EXTENT.size)
            _HEAD.pack_into(request, 0, start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC, 0, count, 0)
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, request)
            mapped = _HEAD.unpack_from(request)[3]
            if mapped == 0:
                return result
            last = False
            for i in range(mapped):
                logical, physical, length, _, _, flags, *_ = _EXTENT.unpack_from(
                    request, _HEAD.size + i * _EXTENT.size
                )
                result.append((logical, physical, length))
                start = logical + length
                last = bool(flags & FIEMAP_EXTENT_LAST)
            if last:
                return result


def chunks_of(extents: list[tuple[int, int]], chunk: int) -> set[int]:
    return {
        i
        for offset, length in extents
        for i in range(offset // chunk, (offset + length - 1) // chunk + 1)
    }


def read_direct(device: Path, offset: int, length: int) -> bytes:
    """Bytes of the device bypassing its page cache (which fs writes do not update)."""
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = mmap.mmap(-1, length)
        with memoryview(buffer) as view:
            done = 0
            while done < length:
                got = os.preadv(fd, [view[done:]], offset + done)
                assert got > 0
                done += got
        data = buffer[:]
        buffer.close()
        return data
    finally:
        os.close(fd)


def ensure_thawed(mountpoint: Path) -> bool:
    """FITHAW regardless (a test's last resort: a frozen fs blocks writers for good);
    True if it was frozen."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
    return True


def slow_reader(monkeypatch: pytest.MonkeyPatch, delay: float = 0.25) -> None:
    """Fault injection: the tracefs reader thread takes `delay` per batch (a page of
    text), as on a starved host, so it lags well behind the kernel."""
    consume = TracefsTracker._consume

    def slow(self: TracefsTracker, lines: list[bytes]) -> None:
        time.sleep(delay)
        consume(self, lines)

    monkeypatch.setattr(TracefsTracker, "_consume", slow)
