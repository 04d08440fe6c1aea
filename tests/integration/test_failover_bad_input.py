"""Failover jobs given bad input, through the real configd: each fails with an error that
names the cause and the remedy, and leaves nothing behind (no VM, no port group in
vcsim, no copy on the master target).

The site is test_failover_restart.py's (configd, master target, process server, an
agent on an ext4 loop disk). Each fault is real: a vCenter that is gone (its vcsim
stopped), a password changed on the vCenter after registration (vcsim restarted on the
same port and certificate with another password), a master-target datastore that is a
small filesystem filled up, and a VM that is not ours holding the replica's name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from appliance.vsphere.session import Endpoint, Session, connect
from appliance.vsphere.tasks import wait_for_task
from tests.conftest import TlsMaterial, free_port
from tests.integration.configsite import Site
from tests.integration.test_failover_e2e import inventory, shape
from tests.integration.test_failover_restart import files, job, protected, state
from tests.loopfs import small_ext4
from tests.vcsim.fixture import Vcsim, ensure_built

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]


def vcenter(sim: Vcsim) -> Iterator[Session]:
    endpoint = Endpoint(host=sim.host, port=sim.port, user=sim.user, password=sim.password,
                        thumbprint=sim.cert_sha256, timeout=10.0)  # fmt: skip
    with connect(endpoint) as session:
        yield session


session_of = contextlib.contextmanager(vcenter)


def register(site: Site, tmp_path: Path, name: str, sim: Vcsim) -> None:
    password = tmp_path / f"{name}.pass"
    password.write_text(sim.password + "\n")
    site.ctl("vcenter-add", name, f"{sim.host}:{sim.port}", "--user", sim.user,
             "--password-file", str(password), "--thumbprint", sim.cert_sha256)  # fmt: skip


def fails(site: Site, *args: str) -> dict[str, Any]:
    """Run job `args` with --wait; it must fail. Returns its record."""
    done = site.ctl(*args, "--wait", check=False)
    assert done.returncode == 1, done
    kind = args[0]
    (failed,) = [j for j in site.ctl_json("jobs", "--all") if j["kind"] == kind and
                 j["state"] == "failed" and j["subject"] == args[1]]  # fmt: skip
    record = job(site, failed["id"])
    assert record["error"] in done.stderr, (record, done.stderr)
    return record


def nothing_left(
    site: Site, sim: Vcsim, machine: str, datastore: Path, *, before: Any, stored: set[str]
) -> None:
    assert shape(inventory(sim)) == before
    assert files(datastore) == stored
    nothing = site.ctl("cleanup", machine, "--wait", check=False)
    assert nothing.returncode == 1 and "no test failover" in nothing.stderr, nothing


def test_a_vcenter_that_is_gone_fails_the_jobs_before_anything_is_made(
    site: Site, tmp_path: Path, vcsim: Vcsim
) -> None:
    gone = Vcsim(ensure_built(), log_dir=tmp_path / "gone").start(password="gone-pass")
    register(site, tmp_path, "vc-gone", gone)
    assert gone.stop() in (0, None)
    with protected(site, tmp_path, vcsim, "bad1", overrides={"vcenter": "vc-gone"}) as m:
        before, stored = shape(inventory(vcsim)), files(m.datastore)
        for kind in ("test-failover", "failover"):
            record = fails(site, kind, "bad1")
            assert record["step"] == "check", record
            error = record["error"]
            assert error.startswith("vCenter vc-gone does not answer"), error
            assert f"{gone.host}:{gone.port}" in error and "reachable" in error, error
        nothing_left(site, vcsim, "bad1", m.datastore, before=before, stored=stored)
        assert state(site, "bad1") == "protected"  # the failover stopped nothing


def test_a_password_changed_on_the_vcenter_fails_the_jobs_with_the_remedy(
    site: Site, tmp_path: Path, vcsim: Vcsim, tls: TlsMaterial
) -> None:
    port = free_port()
    cert = {"cert": tls.server.cert, "key": tls.server.key}
    old = Vcsim(ensure_built(), log_dir=tmp_path / "old").start(port, password="old-pass", **cert)
    register(site, tmp_path, "vc-moved", old)
    assert old.stop() in (0, None)
    new = Vcsim(ensure_built(), log_dir=tmp_path / "new")
    new.start(port, password=secrets.token_urlsafe(12), **cert)
    try:
        assert new.cert_sha256 == old.cert_sha256  # the same vCenter, only the password
        with protected(site, tmp_path, vcsim, "bad2", overrides={"vcenter": "vc-moved"}) as m:
            before, stored = shape(inventory(vcsim)), files(m.datastore)
            record = fails(site, "test-failover", "bad2")
            assert record["step"] == "check", record
            error = record["error"]
            assert error.startswith("vCenter vc-moved refused the user name or password"), error
            assert "secondsitectl vcenter-credentials vc-moved" in error, error
            nothing_left(site, vcsim, "bad2", m.datastore, before=before, stored=stored)
            # The remedy the error names: new credentials are checked, then stored.
            password = tmp_path / "new.pass"
            password.write_text(new.password + "\n")
            site.ctl("vcenter-credentials", "vc-moved", "--user", new.user,
                     "--password-file", str(password))  # fmt: skip
            wrong = tmp_path / "vc.pass"  # the other vcsim's
            refused = site.ctl("vcenter-credentials", "vc-moved", "--user", new.user,
                               "--password-file", str(wrong), check=False)  # fmt: skip
            assert refused.returncode != 0 and "password refused" in refused.stderr, refused
    finally:
        assert new.stop() in (0, None)


@contextlib.contextmanager
def datastore_on(sim: Vcsim, name: str, path: Path, host: str) -> Iterator[None]:
    """`path` as vcsim datastore `name` on host `host` (moid)."""
    with session_of(sim) as session:
        system = session.ref(vim.HostSystem, host).configManager.datastoreSystem
        datastore = system.CreateLocalDatastore(name=name, path=str(path))
    try:
        yield
    finally:
        with session_of(sim) as session:
            wait_for_task(session.ref(vim.Datastore, datastore._moId).Destroy_Task())


def fill(directory: Path, leave: int) -> Path:
    """A file taking all but `leave` bytes of the filesystem of `directory`."""
    filler = directory / "filler.bin"
    stat = os.statvfs(directory)
    size = stat.f_bavail * stat.f_frsize - leave
    if size > 0:
        subprocess.run(["fallocate", "-l", str(size), str(filler)], check=True)
    else:  # already fuller than asked (the replica and its journal live here too)
        filler.touch()
    return filler


def test_a_full_datastore_fails_the_drill_and_leaves_no_copy(
    site: Site, tmp_path: Path, vcsim: Vcsim
) -> None:
    inv = inventory(vcsim)
    host = min((h for h in inv.hosts if h.cluster == inv.clusters[0].name), key=lambda h: h.moid)
    with small_ext4(tmp_path, 256) as mnt, datastore_on(vcsim, "SmallDS", mnt, host.moid):
        overrides = {"disk_datastore": "SmallDS", "target_dir": str(mnt)}
        with protected(site, tmp_path, vcsim, "bad3", datastore=mnt, overrides=overrides) as m:
            before = shape(inventory(vcsim))
            filler = fill(mnt, 1 << 20)
            record = fails(site, "test-failover", "bad3")
            assert record["step"] == "materialize", record
            error = record["error"]
            assert "no space left" in error.lower() and "free space" in error, error
            assert not list(m.datastore.glob("*test-failover-*")), files(m.datastore)
            filler.unlink()
            nothing_left(site, vcsim, "bad3", m.datastore, before=before, stored=files(m.datastore))
            assert state(site, "bad3") == "protected"


def foreign_vm(sim: Vcsim, name: str) -> None:
    """A VM called `name` that Secondsite did not create (no owner marker)."""
    inv = inventory(sim)
    with session_of(sim) as session:
        folder = session.ref(vim.Folder, inv.datacenters[0].vm_folder)
        pool = session.ref(vim.ResourcePool, inv.clusters[0].resource_pool)
        config = vim.vm.ConfigSpec(name=name, numCPUs=1, memoryMB=256,
                                   guestId="otherLinux64Guest",
                                   files=vim.vm.FileInfo(vmPathName="[LocalDS_0]"))  # fmt: skip
        wait_for_task(folder.CreateVM_Task(config=config, pool=pool))


def remove_vm(sim: Vcsim, name: str) -> None:
    with session_of(sim) as session:
        for vm in session.objects(vim.VirtualMachine):
            if vm.name == name:
                wait_for_task(vm.Destroy_Task())


def test_a_name_held_by_a_vm_that_is_not_ours_fails_the_jobs(
    site: Site, tmp_path: Path, vcsim: Vcsim
) -> None:
    with protected(site, tmp_path, vcsim, "bad4") as m:
        foreign_vm(vcsim, "bad4-test")
        foreign_vm(vcsim, "bad4")
        try:
            before, stored = shape(inventory(vcsim)), files(m.datastore)
            for kind, name in (("test-failover", "bad4-test"), ("failover", "bad4")):
                record = fails(site, kind, "bad4")
                assert record["step"] == "check", record
                error = record["error"]
                assert f"a VM called {name!r} exists and is not Secondsite's" in error, error
                assert "rename or remove it, or set vm_name" in error, error
            nothing_left(site, vcsim, "bad4", m.datastore, before=before, stored=stored)
            assert state(site, "bad4") == "protected"
            assert {v.name for v in inventory(vcsim).vms} >= {"bad4", "bad4-test"}
        finally:
            remove_vm(vcsim, "bad4-test")
            remove_vm(vcsim, "bad4")
