"""The master target's chunk digests, asked through the agent's own stream.

Checksum resync (agent.resync) runs in a worker thread and asks for digests
synchronously; the StreamSender lives on the event loop. This adapter sends a
DIGEST_REQUEST in the disk's stream order (the process server relays it behind
everything this agent sent before) and blocks the worker until the reply arrives.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from agent.resync import RemoteDigests
from agent.trackers.base import CHUNK
from appliance.wire.messages import DigestRequest
from appliance.wire.sender import StreamSender


def stream_digests(
    sender: StreamSender, loop: asyncio.AbstractEventLoop, chunk: int = CHUNK
) -> Callable[[str], RemoteDigests]:
    """`remote_digests` for the Replicator: per disk, a blocking chunks -> digests call.

    Must be called from a thread other than `loop`'s (it waits on the loop)."""
    ids = itertools.count(1)

    def for_disk(disk_id: str) -> RemoteDigests:
        def remote(chunks: list[int]) -> dict[int, bytes]:
            request = DigestRequest(disk_id, next(ids), chunk, tuple(chunks))
            reply = asyncio.run_coroutine_threadsafe(sender.request(request), loop).result()
            return dict(reply.digests)

        return remote

    return for_disk
