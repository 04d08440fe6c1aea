"""CRC-32C (Castagnoli), the checksum of wire frames, journal records and segments.

CRC-32C rather than zlib's CRC-32: same strength against the errors it is for (torn
writes, bit flips, framing bugs), but the CPU computes it in hardware (SSE4.2 /
ARMv8 CRC), about five times faster here (27 GB/s against 5.6 GB/s on 1 MiB), and
it is on every byte we send, journal and spool.
"""

from __future__ import annotations

import crc32c as _crc32c


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC-32C of `data`, continuing from `value` (the CRC of what came before)."""
    return int(_crc32c.crc32c(data, value))
