"""kill -9 a real secondsite-targetd at random moments while a sender streams to it.

After every restart: the replica equals, bit for bit, the stream prefix up to the
durable sequence the target reports; that sequence is never below what was already
acknowledged (nothing acknowledged is lost); the sender resumes from it and the
target applies the resend idempotently. At the end every sampled recovery point
materialises to the source image at its tag.

SECONDSITE_CRASH_SEED and SECONDSITE_CRASH_KILLS widen the search when hunting a bug.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path

import pytest
import uvloop

from appliance.wire.connection import open_connection
from appliance.wire.messages import DiskOpened, Hello, OpenDisk, Request, Response
from appliance.wire.sender import StreamSender
from appliance.wire.tls import client_context
from tests.conftest import TlsMaterial
from tests.integration.daemons import RoleDaemon, TargetDaemon
from tests.integration.stream_model import StreamScript, file_sha256

DISK, MACHINE = "disk-a", "machine-a"
SIZE = 64 * 1024 * 1024


async def stream_phase(
    daemon: RoleDaemon,
    tls: TlsMaterial,
    script: StreamScript,
    first: int,
    kill_after: float | None,
) -> int:
    """Stream from `first`; kill the daemon after `kill_after` s. Returns the acked seq."""
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    sender = StreamSender("127.0.0.1", daemon.port, ctx, name="crash-test")
    sender.add_disk(DISK, MACHINE, SIZE)
    await sender.start()

    async def pump() -> None:
        for op in script.ops[first - 1 :]:
            await sender.submit(script.message(op, DISK))
        await sender.wait_acked(DISK, script.ops[-1].seq)

    task = asyncio.create_task(pump())
    try:
        if kill_after is None:
            await asyncio.wait_for(task, 300)
            return sender.acked_seq(DISK)
        await asyncio.wait([task], timeout=kill_after)
        acked = sender.acked_seq(DISK)
        daemon.kill()
        return acked
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sender.close()


async def control(
    daemon: RoleDaemon, tls: TlsMaterial, *requests: Request
) -> tuple[int, list[Response]]:
    """Open the disk (runs crash recovery), then send control requests."""
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    conn = await open_connection("127.0.0.1", daemon.port, ctx, server_hostname="localhost")
    try:
        await conn.send(Hello("admin", "crash-test-check"))
        await conn.recv()  # Welcome
        await conn.send(OpenDisk(DISK, MACHINE, SIZE))
        opened = await conn.recv()
        assert isinstance(opened, DiskOpened)
        answers = []
        for req in requests:
            await conn.send(req)
            while not isinstance(reply := await conn.recv(), Response):
                pass  # ACKs may still arrive
            answers.append(reply)
        return opened.durable_seq, answers
    finally:
        conn.close()
        await conn.wait_closed()


@pytest.mark.integration
@pytest.mark.slow
def test_kill9_at_random_points_loses_nothing(tmp_path: Path, tls: TlsMaterial, port: int) -> None:
    seed = int(os.environ.get("SECONDSITE_CRASH_SEED", "20261125"))
    kills = int(os.environ.get("SECONDSITE_CRASH_KILLS", "10"))
    kill9_run(
        tmp_path, tls, port, seed=seed, kills=kills, script=StreamScript(seed, SIZE, count=3000)
    )


@pytest.mark.integration
@pytest.mark.slow
def test_kill9_mid_stream_of_extents_loses_nothing(
    tmp_path: Path, tls: TlsMaterial, port: int
) -> None:
    """The same with every other change an EXTENTS message (up to 64 extents, one seq):
    each is durable, rolled back and resent as a whole."""
    seed = int(os.environ.get("SECONDSITE_CRASH_SEED", "20261126"))
    kills = int(os.environ.get("SECONDSITE_CRASH_KILLS", "8"))
    script = StreamScript(seed, SIZE, count=1500, extents_every=2)
    assert sum(op.kind == "extents" for op in script.ops) > 500
    kill9_run(tmp_path, tls, port, seed=seed, kills=kills, script=script)


def kill9_run(
    tmp_path: Path, tls: TlsMaterial, port: int, *, seed: int, kills: int, script: StreamScript
) -> None:
    rng = random.Random(seed)
    daemon = TargetDaemon(
        tmp_path / "target", port, tls, extra_config="[stream]\nwindow_mib = 16\n"
    )
    daemon.state_dir.mkdir()
    flat = daemon.datastore / DISK / f"{DISK}-flat.vmdk"
    daemon.start()
    try:
        first, checks = 1, []
        for _ in range(kills):
            acked = uvloop.run(stream_phase(daemon, tls, script, first, rng.uniform(0.05, 0.8)))
            daemon.start()
            durable, _ = uvloop.run(control(daemon, tls))
            assert durable >= acked, f"acknowledged {acked} but only {durable} survived"
            checks.append((durable, file_sha256(flat)))
            first = durable + 1
            if first > len(script.ops):
                break
        expected = script.images_at([d for d, _ in checks])
        for durable, digest in checks:
            assert digest == expected[durable], f"replica differs from the prefix at {durable}"
        distinct = {d for d, _ in checks if d < len(script.ops)}
        assert len(distinct) >= kills // 2, f"too few kills landed mid-stream: {checks}"

        uvloop.run(stream_phase(daemon, tls, script, first, None))
        tags = script.tags()
        sample = sorted([*rng.sample(tags, min(6, len(tags))), tags[-1]], key=lambda t: t.seq)
        requests = [
            Request.make(i, "materialize", machine_id=MACHINE, tag_id=t.tag_id, name=f"mat{i}")
            for i, t in enumerate(sample)
        ]
        durable, answers = uvloop.run(control(daemon, tls, *requests))
        assert durable == len(script.ops)
        expected = script.images_at([t.seq for t in sample] + [durable])
        assert file_sha256(flat) == expected[durable]
        for tag, answer in zip(sample, answers, strict=True):
            assert answer.ok, answer.result
            vmdk = Path(json.loads(answer.result)["vmdks"][0])
            flat_copy = vmdk.with_name(vmdk.stem + "-flat.vmdk")
            assert file_sha256(flat_copy) == expected[tag.seq], f"point {tag.tag_id} differs"
        assert daemon.stop() == 0
    finally:
        if daemon.process and daemon.process.poll() is None:
            daemon.kill()
