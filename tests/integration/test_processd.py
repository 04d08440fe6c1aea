"""secondsite-processd between a sending agent and a real secondsite-targetd.

The "agent" is a StreamSender in the test process; both daemons are real processes on
loopback. Every test ends by comparing the master target's replica with the source
image the stream describes, bit for bit.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from appliance.wire.reconnect import Backoff
from appliance.wire.sender import StreamSender
from appliance.wire.tls import client_context
from tests.conftest import TlsMaterial, free_port
from tests.integration.daemons import ProcessDaemon, RoleDaemon, TargetDaemon, rpc
from tests.integration.stream_model import StreamScript, file_sha256
from tests.loopfs import small_ext4

pytestmark = pytest.mark.integration

DISK, MACHINE = "disk-p", "machine-p"
SIZE = 32 * 1024 * 1024


def agent(process: RoleDaemon, tls: TlsMaterial) -> StreamSender:
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    sender = StreamSender("127.0.0.1", process.port, ctx, name="agent-test", role="agent",
                          backoff=Backoff(initial=0.05, maximum=0.5))  # fmt: skip
    sender.add_disk(DISK, MACHINE, SIZE)
    return sender


def status(daemon: RoleDaemon, tls: TlsMaterial) -> dict:  # type: ignore[type-arg]
    return uvloop.run(rpc(daemon, tls, "status"))


async def target_durable(target: RoleDaemon, tls: TlsMaterial, seq: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            disks = {d["disk_id"]: d for d in (await rpc(target, tls, "status"))["disks"]}
            if disks.get(DISK, {}).get("durable_seq", 0) >= seq:
                return
            await asyncio.sleep(0.2)


def replica(target: RoleDaemon) -> Path:
    return target.datastore / DISK / f"{DISK}-flat.vmdk"


async def send_all(sender: StreamSender, script: StreamScript, first: int = 1) -> None:
    for op in script.ops[first - 1 :]:
        await sender.submit(script.message(op, DISK, same_as_raw=True))


def deliver(
    process: RoleDaemon, target: RoleDaemon, tls: TlsMaterial, script: StreamScript
) -> dict[str, Any]:
    """Send the whole script through processd, wait until targetd has it durable, check
    the replica against the script's image; processd's status afterwards."""
    last = len(script.ops)

    async def run() -> None:
        sender = agent(process, tls)
        await sender.start()
        await send_all(sender, script)
        await sender.wait_acked(DISK, last, timeout=60)
        await sender.close()
        await target_durable(target, tls, last, 60)

    uvloop.run(run())
    assert file_sha256(replica(target)) == script.images_at([last])[last]
    return status(process, tls)


def test_stream_through_process_server_lands_exactly(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial
) -> None:
    process, target = sites
    summary = deliver(process, target, tls, StreamScript(11, SIZE, count=400))
    disk = summary["disks"][0]
    assert disk["bytes_wire_out"] < disk["bytes_raw_out"], "nothing was compressed"
    assert summary["target"]["compression_ratio"] > 1.2
    assert disk["same_frames"] > 0, "identical rewrites in flight were sent again"


@pytest.mark.slow
@pytest.mark.parametrize("extents_every", [0, 2], ids=["data", "extents"])
def test_kill9_process_server_mid_stream(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial, extents_every: int
) -> None:
    """With EXTENTS (about half the frames, up to 32 extents each) too: an unacknowledged
    EXTENTS is resent whole by the agent and lands once."""
    process, target = sites
    if extents_every:
        script = StreamScript(32, SIZE, count=1200, max_blocks=32, extents_every=2)
    else:
        script = StreamScript(12, SIZE, count=1500)
    last = len(script.ops)
    rng = random.Random(12)

    async def run() -> None:
        sender = agent(process, tls)
        await sender.start()
        pump = asyncio.create_task(send_all(sender, script))
        for _ in range(4):
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            acked = sender.acked_seq(DISK)
            process.kill()  # the agent keeps everything unacknowledged and resends it
            await asyncio.sleep(0.2)
            await asyncio.to_thread(process.start)
            assert sender.acked_seq(DISK) >= acked
        await pump
        try:
            await sender.wait_acked(DISK, last, timeout=30)
        except TimeoutError:
            print("AGENT acked", sender.acked_seq(DISK), sender.state, sender.last_error)
            print("PROCESS", json.dumps(await rpc(process, tls, "status"), indent=1))
            print("TARGET", json.dumps(await rpc(target, tls, "status"), indent=1))
            raise
        await sender.close()
        try:
            await target_durable(target, tls, last, 30)
        except TimeoutError:
            print("PROCESS", json.dumps(await rpc(process, tls, "status"), indent=1))
            print("TARGET", json.dumps(await rpc(target, tls, "status"), indent=1))
            raise

    uvloop.run(run())
    assert process.starts == 5
    assert file_sha256(replica(target)) == script.images_at([last])[last]


@pytest.mark.slow
def test_master_target_outage_spools_then_drains(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial
) -> None:
    process, target = sites
    script = StreamScript(13, SIZE, count=600)
    last = len(script.ops)

    async def run() -> None:
        sender = agent(process, tls)
        await sender.start()
        await target_durable(target, tls, 0, 10)
        target.stop()
        # The agent goes on: the process server acknowledges from its spool.
        await send_all(sender, script)
        await sender.wait_acked(DISK, last, timeout=60)
        spooled = await rpc(process, tls, "status")
        assert spooled["disks"][0]["backlog_bytes"] > 0
        await asyncio.sleep(2.5)  # the monitor notices the missing link
        health = (await rpc(process, tls, "status"))["health"]
        assert "target-unreachable" in health
        await asyncio.to_thread(target.start)
        await target_durable(target, tls, last, 120)
        async with asyncio.timeout(30):
            while (await rpc(process, tls, "status"))["disks"][0]["backlog_bytes"]:
                await asyncio.sleep(0.2)
        await sender.close()

    uvloop.run(run())
    assert file_sha256(replica(target)) == script.images_at([last])[last]
    drained = status(process, tls)
    assert "target-unreachable" not in drained["health"]
    assert drained["target"]["draining_disks"] == 0  # the read budget's count went back
    # Drained and acknowledged: the spool gives the space back (the last, active
    # segment within a couple of monitor rounds).
    spool = process.state_dir / "spool" / DISK
    deadline = time.monotonic() + 15
    while sum(p.stat().st_size for p in spool.glob("*.spool")) >= 1024 * 1024:
        assert time.monotonic() < deadline, sorted(p.stat().st_size for p in spool.glob("*"))
        time.sleep(0.2)


@pytest.mark.slow
def test_garbage_after_the_last_spool_record_is_cut_on_restart(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial
) -> None:
    process, target = sites
    script = StreamScript(14, SIZE, count=300)
    last = len(script.ops)

    async def run() -> None:
        sender = agent(process, tls)
        await sender.start()
        target.stop()  # keep everything in the spool
        await send_all(sender, script)
        await sender.wait_acked(DISK, last, timeout=60)
        process.kill()
        # A crash mid-append leaves garbage after the last record: cut it on restart.
        segment = max((process.state_dir / "spool" / DISK).glob("*.spool"))
        with segment.open("ab") as fh:
            fh.write(random.Random(1).randbytes(3000))
        await asyncio.to_thread(process.start)
        await asyncio.to_thread(target.start)
        await target_durable(target, tls, last, 120)
        await sender.close()

    uvloop.run(run())
    assert file_sha256(replica(target)) == script.images_at([last])[last]


@pytest.mark.root
@pytest.mark.slow
def test_full_spool_filesystem_pauses_the_agent_then_resumes(
    tmp_path: Path, tls: TlsMaterial
) -> None:
    with small_ext4(tmp_path, 8) as mnt:
        target = TargetDaemon(tmp_path / "target", free_port(), tls)
        process = ProcessDaemon(
            tmp_path / "process", free_port(), tls, target.port,
            extra_config=f'[spool]\ndirectory = "{mnt / "spool"}"\nsegment_mib = 1\n'
            "[stream]\nwindow_mib = 4\n",
        )  # fmt: skip
        for d in (target, process):
            d.state_dir.mkdir()
        target.start()
        process.start()
        script = StreamScript(15, SIZE, count=200, max_blocks=64)  # ~25 MiB > the 8 MiB fs
        last = len(script.ops)

        async def run() -> None:
            sender = agent(process, tls)
            await sender.start()
            await target_durable(target, tls, 0, 10)
            target.stop()
            pump = asyncio.create_task(send_all(sender, script))
            # The spool fills: the agent is paused, not failed.
            async with asyncio.timeout(60):
                while "disk-full" not in (await rpc(process, tls, "status"))["health"]:
                    await asyncio.sleep(0.2)
            # What still fits is committed in ever smaller pieces, then nothing moves.
            stalled = -1
            async with asyncio.timeout(30):
                while sender.acked_seq(DISK) != stalled:
                    stalled = sender.acked_seq(DISK)
                    await asyncio.sleep(1.0)
            assert stalled < last and not pump.done()
            assert sender.state.name == "OPEN"  # paused, not failed
            await asyncio.to_thread(target.start)  # room comes back as the target drains
            await pump
            await sender.wait_acked(DISK, last, timeout=120)
            await target_durable(target, tls, last, 120)
            health = (await rpc(process, tls, "status"))["health"]
            assert "disk-full" not in health
            await sender.close()

        try:
            uvloop.run(run())
            assert file_sha256(replica(target)) == script.images_at([last])[last]
        finally:
            for d in (process, target):
                if d.process and d.process.poll() is None:
                    d.kill()
