"""EXTENTS through a real secondsite-processd to a real secondsite-targetd.

The "agent" is a StreamSender in the test process sending a stream where about half
the frames are EXTENTS (up to 64 extents under one sequence number, some of them zero)
between DATA, SAME rewrites and tags. Each test ends by comparing the master target's
replica with the source image the stream describes, bit for bit.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from appliance.process.records import PendingRecord
from appliance.storage.segments import SEGMENT_HEADER
from appliance.wire.messages import Data, Encoding, Extent, Extents, Tag, TagKind
from tests.conftest import TlsMaterial
from tests.integration.daemons import RoleDaemon, rpc
from tests.integration.stream_model import StreamScript, file_sha256
from tests.integration.test_processd import (
    DISK,
    SIZE,
    agent,
    deliver,
    replica,
    send_all,
    status,
    target_durable,
)

pytestmark = pytest.mark.integration
RAW = Encoding.RAW


def script_of(seed: int, count: int) -> StreamScript:
    return StreamScript(seed, SIZE, count=count, max_blocks=32, extents_every=2)


def test_extents_stream_lands_exactly_one_frame_each(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial
) -> None:
    process, target = sites
    script = script_of(31, 300)
    last = len(script.ops)
    extents = [op for op in script.ops if op.kind == "extents"]
    assert len(extents) > 100 and sum(len(op.parts) for op in extents) > 2000
    summary = deliver(process, target, tls, script)
    disk = summary["disks"][0]
    # One frame per sequence number: an EXTENTS is forwarded whole, never split.
    assert (disk["frames_out"], disk["extents_frames"]) == (last, len(extents))
    assert disk["bytes_wire_out"] < disk["bytes_raw_out"], "nothing was compressed"
    assert summary["target"]["compression_ratio"] > 1.2
    assert disk["same_frames"] > 0  # DATA dedupe still works between the EXTENTS


@pytest.mark.slow
def test_spooled_extents_survive_a_torn_tail_and_drain(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial
) -> None:
    process, target = sites
    script = script_of(33, 400)
    last = len(script.ops)
    messages = [script.message(op, DISK, same_as_raw=True) for op in script.ops]
    # The last EXTENTS is torn by the crash: everything before it is acknowledged.
    torn = next(m for m in reversed(messages) if isinstance(m, Extents))
    before = torn.seq - 1
    spooled = sum(m.wire_size for m in messages[:before] if not isinstance(m, Tag))

    async def run() -> None:
        sender = agent(process, tls)
        await sender.start()
        await target_durable(target, tls, 0, 10)
        target.stop()  # everything stays in the spool
        for op in script.ops[:before]:
            await sender.submit(script.message(op, DISK, same_as_raw=True))
        await sender.wait_acked(DISK, before, timeout=60)
        disk = (await rpc(process, tls, "status"))["disks"][0]
        # The backlog counts each EXTENTS' payload as the agent sent it.
        assert (disk["backlog_records"], disk["backlog_bytes"]) == (before, spooled)
        assert disk["bytes_in"] == spooled
        process.kill()
        # A crash while appending the EXTENTS left its header and half its body.
        segment = max((process.state_dir / "spool" / DISK).glob("*.spool"))
        pos = int(segment.stem, 16) + segment.stat().st_size - SEGMENT_HEADER.size
        record = PendingRecord.of(torn, time.time_ns())
        body = b"".join(bytes(p) for p in record.parts)
        with segment.open("ab") as fh:
            fh.write(record.header(pos) + body[: len(body) // 2])
        await asyncio.to_thread(process.start)
        disk = (await rpc(process, tls, "status"))["disks"][0]
        assert (disk["durable_seq"], disk["backlog_records"]) == (before, before)
        # The agent resends it (and the rest); the master target gets it all.
        await send_all(sender, script, first=torn.seq)
        await sender.wait_acked(DISK, last, timeout=60)
        await asyncio.to_thread(target.start)
        await target_durable(target, tls, last, 120)
        await sender.close()

    uvloop.run(run())
    assert file_sha256(replica(target)) == script.images_at([last])[last]


def test_extents_between_identical_writes_in_flight_are_not_skipped(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial
) -> None:
    """DATA P, EXTENTS writing Q inside P's range, DATA P again, all in flight at once:
    the second P must be sent in full (the bytes changed in between); a third P, with
    nothing in between, goes as SAME."""
    process, target = sites
    at, p, q = 1 << 20, b"P" * 4096, b"Q" * 4096
    touching = Extents.of(
        DISK, 2, [Extent(at - 4096, 4096, RAW), Extent(at + 2048, 1024, RAW)], q + q[:1024]
    )
    stream = [
        Data.raw(DISK, 1, at, p),
        touching,
        Data.raw(DISK, 3, at, p),
        Data.raw(DISK, 4, at, p),
        Tag(DISK, 5, "t5", TagKind.CRASH, time.time_ns()),
    ]

    async def run() -> None:
        sender = agent(process, tls)
        await sender.start()
        await target_durable(target, tls, 0, 10)
        target.stop()  # no ACK from the master target: everything stays in flight
        for msg in stream:
            await sender.submit(msg)
        await sender.wait_acked(DISK, 5, timeout=30)
        await asyncio.to_thread(target.start)
        await target_durable(target, tls, 5, 60)
        await sender.close()

    uvloop.run(run())
    with replica(target).open("rb") as fh:
        fh.seek(at - 4096)
        assert fh.read(8192) == q + p
    disk = status(process, tls)["disks"][0]
    assert (disk["same_frames"], disk["extents_frames"], disk["frames_out"]) == (1, 1, 5)
