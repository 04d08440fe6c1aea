"""The chunk digest: one definition for the agent's trackers and the master target.

The agent compares its disk's chunk digests with the master target's replica to find
what differs after a gap in tracking (checksum resync), so both sides must hash the
same bytes the same way. The digest of chunk i of a disk of `size` bytes is xxh3_128
(16 bytes, the canonical big-endian digest of the xxHash spec) over the disk's bytes
[i * chunk, min((i + 1) * chunk, size)): the last chunk is hashed short, never padded.

It lives here rather than in `agent/` because the appliance must not import the agent;
`agent.digest` re-exports it.
"""

from __future__ import annotations

import xxhash

ALGORITHM = "xxh3_128"
DIGEST_SIZE = 16


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of one chunk's bytes (see the module doc for which bytes)."""
    return bytes(xxhash.xxh3_128_digest(data))
