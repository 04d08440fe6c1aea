"""Failover, commit, then failback on vcsim: only what changed after the failover goes back.

Everything is the real program (configd on a private bus driven by secondsitectl, a
master target whose datastore is vcsim's LocalDS_0, a process server, an agent on an
ext4 loop disk). vcsim's VMs do not run, so the failed-over VM's writes are made by
mounting the replica flat file and writing files into it, as the VM would; the failback
then powers the VM off, and the agent on the original machine fetches only the chunks
that differ.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.configsite import Site, machine
from tests.integration.daemons import RoleDaemon
from tests.integration.test_failover_e2e import inventory, replica_settings, sha256
from tests.integration.test_failover_restart import finished, submit
from tests.integration.test_failover_restart import job as job_record
from tests.loopfs import loop_device, loop_ext4, remount_read_only
from tests.vcsim.fixture import Vcsim

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]

DISK_MIB = 256
CHUNK = 64 << 10
VM_NEW = 3 << 20  # a new file the VM writes after the failover
VM_REWRITE = (1 << 20, 1 << 20)  # and a rewrite of part of an old file: (offset, length)


def job_of(site: Site, kind: str) -> dict[str, Any]:
    (job,) = [j for j in site.ctl_json("jobs", "--all") if j["kind"] == kind]
    record: dict[str, Any] = site.ctl_json("job", job["id"])
    return record


def differing_chunks(a: Path, b: Path) -> int:
    count = 0
    with a.open("rb") as fa, b.open("rb") as fb:
        while x := fa.read(CHUNK):
            count += x != fb.read(CHUNK)
    return count


@pytest.mark.parametrize("kill_configd", [False, True], ids=["", "configd-killed-mid-transfer"])
def test_failback_sends_what_changed_not_the_disk(
    site: Site, tmp_path: Path, vcsim: Vcsim, kill_configd: bool
) -> None:
    inv = inventory(vcsim)
    datastore = Path(next(d.url for d in inv.datastores if d.name == "LocalDS_0"))
    for left in datastore.glob("web1*"):  # what an earlier run on this vcsim left
        if left.is_dir():
            shutil.rmtree(left)
        else:
            left.unlink()
    _target, process = site.servers(datastore)
    password = tmp_path / "vc.pass"
    password.write_text(vcsim.password + "\n")
    site.ctl("vcenter-add", "vc-dr", f"{vcsim.host}:{vcsim.port}", "--user", vcsim.user,
             "--password-file", str(password), "--thumbprint", vcsim.cert_sha256)  # fmt: skip

    with loop_ext4(tmp_path, DISK_MIB) as (device, mnt):
        try:
            run(site, vcsim, tmp_path, datastore, device, mnt, process, kill_configd)
        finally:
            for agent in site.agents:  # before its disk goes away
                agent.terminate()
                agent.wait(timeout=30)
            if not os.path.ismount(mnt):  # loop_ext4 unmounts on the way out
                subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], check=True)


def run(  # noqa: PLR0917 - the test's own pieces
    site: Site, vcsim: Vcsim, tmp_path: Path, datastore: Path, device: Path, mnt: Path,
    process: RoleDaemon, kill_configd: bool,
) -> None:  # fmt: skip
    inv = inventory(vcsim)
    old = os.urandom(8 << 20)
    (mnt / "data.bin").write_bytes(old)
    os.sync()
    site.agent(device)
    site.wait("web1 protected",
              lambda: (m := machine(site, "web1")) and m["state"] == "protected")  # fmt: skip
    settings = tmp_path / "replica.json"
    settings.write_text(json.dumps(replica_settings(inv, datastore)))
    site.ctl("replica", "web1", str(settings))

    # The original machine stops writing before the (planned) failover: read-only, so
    # the points still freeze it and the last one holds every write it made.
    remount_read_only(mnt)
    quiet = time.time()
    site.wait(
        "a point after the remount",
        lambda: any(p["time"] > quiet + 2 for p in site.ctl_json("points", "web1")),
    )
    # processd keeps the master target's disk streams open after the agent stopped, and
    # the rollback waits for them ("still streaming"): stop it across the failover.
    assert process.stop() == 0
    site.ctl("failover", "web1", "--wait")
    site.ctl("commit", "web1", "--wait")
    process.start()
    assert machine(site, "web1")["state"] == "failover-committed"  # type: ignore[index]
    vm = inventory(vcsim).vm("web1")
    assert vm is not None and vm.power_state == "poweredOn"
    (flat,) = datastore.rglob("web1-*-flat.vmdk")
    assert sha256(flat) == sha256(device)  # the VM starts from the source's last state

    # The VM runs on the replica and writes through its filesystem (vcsim's VMs do not
    # run, so the test mounts the replica as the VM would see it).
    new = os.urandom(VM_NEW)
    rewrite = os.urandom(VM_REWRITE[1])
    vmdir = tmp_path / "vm"
    vmdir.mkdir()
    with loop_device(flat) as vmdev:
        subprocess.run(["mount", str(vmdev), str(vmdir)], check=True)
        try:
            (vmdir / "after-failover.bin").write_bytes(new)
            with (vmdir / "data.bin").open("r+b") as f:
                f.seek(VM_REWRITE[0])
                f.write(rewrite)
        finally:
            subprocess.run(["umount", str(vmdir)], check=True)
    vm_data = VM_NEW + VM_REWRITE[1]
    differ = differing_chunks(device, flat)
    assert differ * CHUNK >= vm_data

    # Failback needs the original disk unused.
    subprocess.run(["umount", str(mnt)], check=True)
    started = time.time()
    if kill_configd:
        # configd dies while the job waits for the agent's transfer and comes back: the
        # job resumes there and finishes once (the same generation, one VM removed).
        job_id = submit(site, "failback", "web1")
        site.wait("the failback waiting for the transfer",
                  lambda: job_record(site, job_id).get("step") == "transfer")  # fmt: skip
        site.configd.kill()
        site.configd.start()
        record = finished(site, job_id)
        assert record["state"] == "succeeded", str(record) + site_logs(site)
        assert f"resuming job {job_id}" in site.configd.log_path.read_text()
        assert [j["kind"] for j in site.ctl_json("jobs", "--all")].count("failback") == 1
    else:
        done = site.ctl("failback", "web1", "--wait", check=False)
        assert done.returncode == 0, done.stdout + done.stderr + site_logs(site)
    job = job_of(site, "failback")
    assert job["state"] == "succeeded"
    assert sha256(device) == sha256(flat)  # the original machine holds the VM's data

    transfer = job["result"]["transfer"]
    size = DISK_MIB << 20
    sent, written, wire = (transfer["bytes_received"], transfer["bytes_written"],
                           transfer["wire_bytes_in"])  # fmt: skip
    print(f"\nfailback of a {DISK_MIB} MiB disk: the VM wrote {vm_data} bytes of files, "
          f"{differ} chunks ({differ * CHUNK} bytes) differ; data received {sent}, written "
          f"{written}, on the wire {wire} ({wire / size:.2%} of the disk, "
          f"{wire / vm_data:.2f} x the VM's data), {transfer['seconds']} s")  # fmt: skip
    assert written == differ * CHUNK  # exactly the chunks that differ, nothing else
    assert sent <= written + 4096  # random file data: zstd does not pay, sent raw
    assert wire <= 4 * vm_data  # digests of every chunk plus the changed chunks
    assert wire / size < 0.05  # proportional to the change, not to the disk

    # Protected again in the normal direction, new points arriving, the VM gone.
    site.wait("web1 protected again",
              lambda: (m := machine(site, "web1")) and m["state"] == "protected")  # fmt: skip
    site.wait(
        "a point after the failback",
        lambda: any(p["time"] > started for p in site.ctl_json("points", "web1")),
    )
    assert sha256(device) == sha256(flat)  # the resync after it found nothing to send
    assert "web1" not in {v.name for v in inventory(vcsim).vms}
    # The original machine's filesystem now holds what the VM wrote.
    subprocess.run(["mount", "-o", "ro,noload", str(device), str(vmdir)], check=True)
    try:
        assert (vmdir / "after-failover.bin").read_bytes() == new
        data = (vmdir / "data.bin").read_bytes()
        offset, length = VM_REWRITE
        assert data == old[:offset] + rewrite + old[offset + length :]
    finally:
        subprocess.run(["umount", str(vmdir)], check=True)


def site_logs(site: Site) -> str:
    logs = sorted(site.tmp.glob("*.log"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)
