"""zstd for storage records, usable from many threads at once.

zstandard's (de)compressor objects must not be shared between threads, so each thread
keeps its own; compression and decompression release the GIL, so a pool of threads
really compresses in parallel.
"""

from __future__ import annotations

import threading

import zstandard

_local = threading.local()


def compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level`` (made once per thread and level: building
    one per call costs more than compressing a small extent)."""
    cctxs: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctxs", None)
    if cctxs is None:
        cctxs = _local.cctxs = {}
    cctx = cctxs.get(level)
    if cctx is None:
        cctx = cctxs[level] = zstandard.ZstdCompressor(level=level)
    return cctx


def compress(data: bytes, level: int) -> bytes | None:
    """``data`` compressed at ``level``, or None when that would not make it smaller."""
    packed = compressor(level).compress(data)
    return packed if len(packed) < len(data) else None


def decompress(packed: bytes | memoryview, size: int) -> bytes:
    """The ``size`` bytes that ``packed`` holds; ValueError if it holds anything else."""
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    try:
        # A frame header may declare any content size, and zstandard allocates what it
        # declares: refuse a lie before it turns into a huge allocation.
        declared = zstandard.frame_content_size(packed)
        if declared not in (-1, size):
            raise ValueError(f"zstd frame declares {declared} bytes, expected {size}")
        out = dctx.decompress(packed, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ValueError(f"undecodable zstd frame: {exc}") from exc
    if len(out) != size:
        raise ValueError(f"zstd frame holds {len(out)} bytes, expected {size}")
    return out
