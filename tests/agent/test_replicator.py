"""The replicator end to end: a mounted ext4 loop disk under churn, real processd and
targetd, the tracefs tracker. Every tag the test saw frozen is materialized on the
master target and must equal the frozen device bit for bit (and fsck clean); an
initial copy stopped half way resumes where its ACKs left it."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from agent.discovery import Disk
from agent.errors import DeviceResized, TrackerUnavailable
from agent.remote import stream_digests
from agent.replicator import AckRelay, Replicator
from agent.trackers.base import Tracker
from agent.trackers.tracefs import TracefsTracker
from appliance.wire.messages import Data, Tag
from appliance.wire.reconnect import Backoff
from appliance.wire.sender import StreamSender
from appliance.wire.tls import client_context
from tests.agent.helpers import find, read_all, write_file
from tests.conftest import TlsMaterial
from tests.integration.daemons import RoleDaemon, rpc
from tests.loopfs import loop_ext4

pytestmark = [pytest.mark.root, pytest.mark.integration, pytest.mark.slow]
MACHINE = "machine-r"
MIB = 64


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[Disk, Path]]:
    with loop_ext4(tmp_path, MIB) as (device, mnt):
        found = find(device)
        probe = TracefsTracker(found)
        try:
            probe.start()
        except TrackerUnavailable as err:
            pytest.skip(f"tracefs tracker unavailable here: {err}")
        probe.stop()
        yield found, mnt


def make_sender(process: RoleDaemon, tls: TlsMaterial, acks: AckRelay) -> StreamSender:
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    return StreamSender("127.0.0.1", process.port, ctx, name="agent-test", role="agent",
                        backoff=Backoff(initial=0.05, maximum=0.5), on_ack=acks)  # fmt: skip


def device_sha256(disk: Disk) -> str:
    return hashlib.sha256(read_all(disk.path, disk.size)).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def target_durable(target: RoleDaemon, tls: TlsMaterial, disk_id: str, seq: int) -> None:
    async with asyncio.timeout(60):
        while True:
            disks = {d["disk_id"]: d for d in (await rpc(target, tls, "status"))["disks"]}
            if disks.get(disk_id, {}).get("durable_seq", 0) >= seq:
                return
            await asyncio.sleep(0.2)


async def materialized_sha256(
    target: RoleDaemon, tls: TlsMaterial, tag_id: str, name: str, tmp_path: Path
) -> str:
    """The point's flat image: its hash, after `e2fsck -fn` found a copy of it clean."""
    made = await rpc(target, tls, "materialize", machine_id=MACHINE, tag_id=tag_id, name=name)
    (descriptor,) = map(Path, made["vmdks"])
    flat = descriptor.with_name(descriptor.stem + "-flat.vmdk")
    copy = tmp_path / f"{name}.img"
    shutil.copyfile(flat, copy)
    fsck = subprocess.run(["e2fsck", "-fn", str(copy)], check=False, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    copy.unlink()
    return file_sha256(flat)


class Churn(threading.Thread):
    """New files (fsynced), overwrites in place and deletes, until stopped."""

    def __init__(self, mnt: Path) -> None:
        super().__init__(daemon=True)
        self.mnt = mnt
        self.halt = threading.Event()
        self.rounds = 0

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            write_file(self.mnt, f"churn-{n % 40}", 4096 * (1 + n % 64))
            if n % 3 == 0:
                with open(self.mnt / f"churn-{(n // 2) % 40}", "r+b") as f:
                    f.write(b"x" * 5000)
            n += 1
            self.rounds = n
            time.sleep(0.02)


def test_tags_materialize_to_the_frozen_device_under_churn(
    sites: tuple[RoleDaemon, RoleDaemon],
    disk: tuple[Disk, Path],
    tls: TlsMaterial,
    tmp_path: Path,
) -> None:
    process, target = sites
    source, mnt = disk
    for i in range(8):
        write_file(mnt, f"seed-{i}", 512 * 1024 * (i + 1))
    frozen: dict[str, str] = {}
    churn = Churn(mnt)

    async def run() -> None:
        acks = AckRelay()
        sender = make_sender(process, tls, acks)
        rep = Replicator(
            [source], sender, TracefsTracker, tmp_path / "agent", machine_id=MACHINE,
            acks=acks, tag_interval=1.0, freeze_timeout=5.0,
            on_frozen=lambda tag_id: frozen.__setitem__(tag_id, device_sha256(source)),
        )  # fmt: skip
        (disk_id,) = rep.disk_ids
        await sender.start()
        churn.start()  # writes during the initial copy too
        await rep.start()
        await rep.wait_initial(timeout=60)
        async with asyncio.timeout(40):
            while len(set(rep.tags(disk_id)) & set(frozen)) < 3:
                await asyncio.sleep(0.1)
        churn.halt.set()
        await rep.stop()
        tags = {t: s for t, s in rep.tags(disk_id).items() if t in frozen}
        status = rep.status()[disk_id]
        print("status", status, "points compared", len(tags))
        assert status["tracker"] == "tracefs" and status["initial"]["done"]
        await target_durable(target, tls, disk_id, max(tags.values()))
        await sender.close()
        for i, tag_id in enumerate(sorted(tags, key=tags.__getitem__)):
            got = await materialized_sha256(target, tls, tag_id, f"-p{i}", tmp_path)
            assert got == frozen[tag_id], f"point {i} ({tag_id}) differs from the frozen device"

    try:
        uvloop.run(run())
    finally:
        churn.halt.set()
    assert churn.rounds > 20, "the churn did not run during replication"


def test_initial_copy_resumes_after_a_restart(
    sites: tuple[RoleDaemon, RoleDaemon],
    disk: tuple[Disk, Path],
    tls: TlsMaterial,
    tmp_path: Path,
) -> None:
    process, target = sites
    source, mnt = disk
    for i in range(10):  # ~40 MiB of random data: little of the disk is zero
        write_file(mnt, f"seed-{i}", 4 << 20)
    state_dir = tmp_path / "agent"
    frozen: dict[str, str] = {}

    def trackers(d: Disk) -> Tracker:
        return TracefsTracker(d)

    async def first_run() -> tuple[str, int, int]:
        acks = AckRelay()
        sender = make_sender(process, tls, acks)
        submit = sender.submit

        async def slow_submit(msg: Data | Tag) -> None:  # so the copy is still running
            await asyncio.sleep(0.03)
            await submit(msg)

        sender.submit = slow_submit  # type: ignore[method-assign]
        rep = Replicator([source], sender, trackers, state_dir, machine_id=MACHINE, acks=acks)
        (disk_id,) = rep.disk_ids
        await sender.start()
        await rep.start()
        async with asyncio.timeout(30):
            while rep.progress[disk_id].percent < 25:
                await asyncio.sleep(0.02)
        await rep.stop()
        progress = rep.progress[disk_id]
        assert not progress.done, "the copy ended before the test could stop it"
        durable = rep.status()[disk_id]["durable_offset"]
        acked = sender.acked_seq(disk_id)
        await sender.close()
        # The stand-in for the digest request (not in the sender yet) reads the
        # replica, so it must have applied everything the process server acked.
        await target_durable(target, tls, disk_id, acked)
        return disk_id, durable, acked

    disk_id, durable_offset, _ = uvloop.run(first_run())

    async def second_run() -> None:
        acks = AckRelay()
        sender = make_sender(process, tls, acks)
        rep = Replicator(
            [source], sender, trackers, state_dir, machine_id=MACHINE, acks=acks,
            tag_interval=0.5, freeze_timeout=5.0,
            # The real thing: DIGEST_REQUEST through processd, answered by targetd.
            remote_digests=stream_digests(sender, asyncio.get_running_loop()),
            on_frozen=lambda tag_id: frozen.__setitem__(tag_id, device_sha256(source)),
        )  # fmt: skip
        await sender.start()
        await rep.start()
        await rep.wait_initial(timeout=60)
        async with asyncio.timeout(30):
            while not set(rep.tags(disk_id)) & set(frozen):
                await asyncio.sleep(0.05)
        await rep.stop()
        status = rep.status()[disk_id]
        print("resumed", status, "durable before restart", durable_offset)
        assert status["resumed_from"] == durable_offset - durable_offset % (1 << 20) > 0
        # Only the rest of the disk was read and sent again, and the part copied
        # before the restart was checked by digest rather than sent.
        image = read_all(source.path, source.size)
        start = status["resumed_from"]
        rest = sum(
            1 << 20
            for at in range(start, source.size, 1 << 20)
            if image[at : at + (1 << 20)].count(0) != 1 << 20
        )
        print("non-zero bytes from the resume offset on:", rest)
        assert status["bytes_sent"] <= rest + (1 << 20)  # + what a tag captured
        assert status["resync_checked_chunks"] > 0 and status["resent_chunks"] == 0
        tag_id, seq = next((t, s) for t, s in rep.tags(disk_id).items() if t in frozen)
        await target_durable(target, tls, disk_id, seq)
        await sender.close()
        got = await materialized_sha256(target, tls, tag_id, "-resumed", tmp_path)
        assert got == frozen[tag_id]

    uvloop.run(second_run())


def test_a_requested_resync_of_a_disk_in_step_sends_nothing(
    sites: tuple[RoleDaemon, RoleDaemon],
    disk: tuple[Disk, Path],
    tls: TlsMaterial,
    tmp_path: Path,
) -> None:
    """The configuration server's resync (after a failback, or `secondsitectl resync`)
    compares the whole disk by digest: a replica in step gets nothing sent again. With
    the replicator's 1 MiB chunks compared against the target's 64 KiB digests, every
    chunk used to differ and the whole disk went out again."""
    process, _ = sites
    source, mnt = disk
    write_file(mnt, "data", 16 << 20)

    async def run() -> None:
        acks = AckRelay()
        sender = make_sender(process, tls, acks)
        rep = Replicator(
            [source], sender, TracefsTracker, tmp_path / "agent", machine_id=MACHINE,
            acks=acks, tag_interval=0.5, freeze_timeout=5.0,
            remote_digests=stream_digests(sender, asyncio.get_running_loop()),
        )  # fmt: skip
        (disk_id,) = rep.disk_ids
        await sender.start()
        await rep.start()
        await rep.wait_initial(timeout=60)
        async with asyncio.timeout(30):
            while not rep.tags(disk_id):
                await asyncio.sleep(0.05)
        before = rep.status()[disk_id]
        rep.request_resync(1)
        async with asyncio.timeout(60):
            while rep.resync_done < 1:
                await asyncio.sleep(0.05)
        after = rep.status()[disk_id]
        await rep.stop()
        await sender.close()
        print("before", before, "after", after)
        checked = after["resync_checked_chunks"] - before["resync_checked_chunks"]
        assert checked == source.size // (64 << 10)  # every 64 KiB chunk compared
        assert after["resent_chunks"] == before["resent_chunks"]
        # Only what the tags' freezes rewrote (ext4's superblock), never the 16 MiB file.
        assert after["bytes_sent"] - before["bytes_sent"] < 1 << 20

    uvloop.run(run())


def test_untagged_rounds_under_a_tiny_budget_then_a_point_when_quiet(
    sites: tuple[RoleDaemon, RoleDaemon],
    disk: tuple[Disk, Path],
    tls: TlsMaterial,
    tmp_path: Path,
) -> None:
    """Dirty sets over the capture budget go out without a tag (and status says why);
    once the churn stops, the next round is small enough and its point is exact."""
    process, target = sites
    source, mnt = disk
    frozen: dict[str, str] = {}
    churn = Churn(mnt)

    async def run() -> None:
        acks = AckRelay()
        sender = make_sender(process, tls, acks)
        rep = Replicator(
            [source], sender, TracefsTracker, tmp_path / "agent", machine_id=MACHINE,
            acks=acks, tag_interval=0.3, freeze_timeout=5.0, capture_budget=64 * 1024,
            on_frozen=lambda tag_id: frozen.__setitem__(tag_id, device_sha256(source)),
        )  # fmt: skip
        (disk_id,) = rep.disk_ids
        await sender.start()
        await rep.start()
        await rep.wait_initial(timeout=60)
        churn.start()
        async with asyncio.timeout(30):
            while rep.status()[disk_id]["untagged_rounds"] < 3:
                await asyncio.sleep(0.05)
        churn.halt.set()
        await asyncio.to_thread(churn.join)
        seen = set(rep.tags(disk_id))
        async with asyncio.timeout(30):
            while not (set(rep.tags(disk_id)) - seen) & set(frozen):
                await asyncio.sleep(0.05)
        await rep.stop()
        status = rep.status()[disk_id]
        print("untagged", status)
        assert "exceeds the capture budget" in str(status["last_untagged_reason"])
        tag_id = max(set(rep.tags(disk_id)) & set(frozen), key=rep.tags(disk_id).__getitem__)
        await target_durable(target, tls, disk_id, rep.tags(disk_id)[tag_id])
        await sender.close()
        assert await materialized_sha256(target, tls, tag_id, "-quiet", tmp_path) == frozen[tag_id]

    try:
        uvloop.run(run())
    finally:
        churn.halt.set()


def test_app_consistent_points_run_the_scripts_and_a_failing_script_costs_no_point(
    sites: tuple[RoleDaemon, RoleDaemon],
    disk: tuple[Disk, Path],
    tls: TlsMaterial,
    tmp_path: Path,
) -> None:
    """The first point after the initial sync is app-consistent (the pre-script ran
    before the freeze, the post-script after the thaw) and the master target lists it
    as "app"; with a pre-script that fails, points keep coming as crash-consistent and
    status says why the app-consistent one was skipped."""
    process, target = sites
    source, _ = disk
    journal = tmp_path / "scripts.log"
    pre, post, broken = tmp_path / "pre.sh", tmp_path / "post.sh", tmp_path / "broken.sh"
    pre.write_text(f"#!/bin/sh\necho pre >> {journal}\n")
    post.write_text(f"#!/bin/sh\necho post >> {journal}\n")
    broken.write_text("#!/bin/sh\necho 'database refused to quiesce' >&2\nexit 3\n")
    for script in (pre, post, broken):
        script.chmod(0o755)

    async def run() -> None:
        acks = AckRelay()
        sender = make_sender(process, tls, acks)
        rep = Replicator(
            [source], sender, TracefsTracker, tmp_path / "agent", machine_id=MACHINE,
            acks=acks, tag_interval=0.3, app_interval=3600.0, pre_script=[str(pre)],
            post_script=[str(post)],
        )  # fmt: skip
        (disk_id,) = rep.disk_ids
        await sender.start()
        await rep.start()
        await rep.wait_initial(timeout=60)
        async with asyncio.timeout(30):
            while rep.last_app_tag_ns is None:
                await asyncio.sleep(0.05)
        assert journal.read_text().split() == ["pre", "post"]
        # A policy change: a pre-script that fails, app points due at once.
        rep.set_schedule(0.3, 1.0, [str(broken)], None)
        tagged = len(rep.tags(disk_id))
        async with asyncio.timeout(30):
            while rep.app_failure is None or len(rep.tags(disk_id)) < tagged + 3:
                await asyncio.sleep(0.05)
        assert "exited with 3" in rep.app_failure
        await rep.stop()
        last_seq = max(rep.tags(disk_id).values())
        await target_durable(target, tls, disk_id, last_seq)
        await sender.close()
        points = await rpc(target, tls, "points", machine_id=MACHINE)
        kinds = [p["kind"] for p in sorted(points, key=lambda p: p["time_ns"])]
        assert kinds.count("app") == 1 and kinds.count("crash") >= 3, kinds

    uvloop.run(run())


def test_a_disk_that_grows_ends_replication_with_the_reason(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial, tmp_path: Path
) -> None:
    """A replica sized for the old disk cannot take the new one: replication stops with
    DeviceResized naming both sizes (the operator re-enables protection), instead of
    silently replicating only the first part."""
    process, _ = sites
    with loop_ext4(tmp_path, MIB) as (device, _):
        source = find(device)

        async def run() -> None:
            acks = AckRelay()
            sender = make_sender(process, tls, acks)
            rep = Replicator([source], sender, TracefsTracker, tmp_path / "agent",
                             machine_id=MACHINE, acks=acks, tag_interval=0.2)  # fmt: skip
            await sender.start()
            await rep.start()
            await rep.wait_initial(timeout=60)
            image = tmp_path / f"disk{MIB}.img"
            with image.open("r+b") as f:
                f.truncate((MIB + 8) << 20)
            subprocess.run(["losetup", "-c", str(device)], check=True)
            with pytest.raises(DeviceResized, match="grew from"):
                async with asyncio.timeout(30):
                    await rep.wait()
            await rep.stop()
            await sender.close()

        uvloop.run(run())
