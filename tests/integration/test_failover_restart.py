"""Failover jobs through the real configd: killed mid-job, bad input, failover then cancel.

The site is the one of test_failover_e2e.py: configd on a private bus driven by
secondsitectl, a master target whose datastore directory is vcsim's LocalDS_0, a process
server, and an agent replicating a mounted ext4 loop disk. This module's vcsim adds
VCSIM_DELAY_MS to every SOAP call, so a job's vSphere steps last long enough (a second
or more) for the test to see them in `secondsitectl job --json` and SIGKILL configd
inside one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.vsphere.network import PORTGROUP_PREFIX
from tests.integration.configsite import Site, machine
from tests.integration.test_failover_e2e import inventory, replica_settings, shape
from tests.loopfs import loop_ext4
from tests.vcsim.fixture import Vcsim, ensure_built

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]

VCSIM_DELAY_MS = 50
FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    """A fresh vcsim for this module, slowed down by VCSIM_DELAY_MS per SOAP call."""
    sim = Vcsim(ensure_built(), log_dir=tmp_path_factory.mktemp("vcsim"))
    sim.start(
        user="secondsite@vsphere.local",
        password=secrets.token_urlsafe(12),
        extra_args=(f"-delay={VCSIM_DELAY_MS}",),
    )
    yield sim
    code = sim.stop()
    assert code in (0, None), sim.stderr_tail()


@dataclass
class Protected:
    """A protected machine with replica settings and at least one recovery point."""

    name: str
    datastore: Path  # vcsim's LocalDS_0, the master target's datastore directory
    agent: subprocess.Popen[bytes]
    disk_id: str  # the agent names a disk <machine>-<device name>


@contextlib.contextmanager
def protected(
    site: Site,
    tmp_path: Path,
    sim: Vcsim,
    name: str,
    *,
    datastore: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Iterator[Protected]:
    """`name` protected onto a master target whose datastore directory is `datastore`
    (default: vcsim's LocalDS_0), its replica settings changed by `overrides`."""
    inv = inventory(sim)
    if datastore is None:
        datastore = Path(next(d.url for d in inv.datastores if d.name == "LocalDS_0"))
    site.servers(datastore)
    password = tmp_path / "vc.pass"
    password.write_text(sim.password + "\n")
    site.ctl("vcenter-add", "vc-dr", f"{sim.host}:{sim.port}", "--user", sim.user,
             "--password-file", str(password), "--thumbprint", sim.cert_sha256)  # fmt: skip
    with loop_ext4(tmp_path, 32) as (device, mnt):
        (mnt / "data.bin").write_bytes(os.urandom(4 << 20))
        os.sync()
        agent = site.agent(device, name)
        try:
            site.wait(f"{name} protected", lambda: state(site, name) == "protected")
            settings = tmp_path / "replica.json"
            settings.write_text(
                json.dumps({**replica_settings(inv, datastore), **(overrides or {})})
            )
            site.ctl("replica", name, str(settings))
            site.wait(f"a recovery point of {name}", lambda: site.ctl_json("points", name))
            yield Protected(name, datastore, agent, f"{name}-{Path(device).name}")
        finally:
            if agent.poll() is None:
                agent.terminate()
                agent.wait(timeout=30)


def state(site: Site, name: str) -> str | None:
    record = machine(site, name)
    return None if record is None else record["state"]


def job(site: Site, job_id: str) -> dict[str, Any]:
    record: dict[str, Any] = site.ctl_json("job", job_id)
    return record


def submit(site: Site, *args: str) -> str:
    job_id: str = site.ctl_json(*args)["job"]
    return job_id


def finished(site: Site, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    record: dict[str, Any] = site.wait(
        f"job {job_id} to finish",
        lambda: (j := job(site, job_id))["state"] in FINISHED and j,
        timeout=timeout,
    )
    return record


def files(datastore: Path) -> set[str]:
    return {str(p.relative_to(datastore)) for p in datastore.rglob("*")}


def test_configd_killed_mid_test_failover_finishes_it_once(
    site: Site, tmp_path: Path, vcsim: Vcsim
) -> None:
    with protected(site, tmp_path, vcsim, "web1") as m:
        before, stored = shape(inventory(vcsim)), files(m.datastore)

        job_id = submit(site, "test-failover", "web1")
        started = time.monotonic()
        seen: list[str] = []
        while True:
            record = job(site, job_id)
            assert record["state"] not in FINISHED, f"job over before the kill: {seen} {record}"
            seen.append(record.get("step") or "")
            if record.get("step") in ("vm", "power-on"):
                break
            assert time.monotonic() - started < 60, f"never reached vm or power-on: {seen}"
        site.configd.kill()
        print(f"configd killed at step {seen[-1]} (seen: {' '.join(seen)})")
        site.configd.start()
        assert site.configd.starts == 2

        done = finished(site, job_id)
        assert done["state"] == "succeeded", done
        assert f"resuming job {job_id}" in site.configd.log_path.read_text()
        after = inventory(vcsim)
        vms = [v for v in after.vms if v.name == "web1-test"]
        assert len(vms) == 1, f"killed at {seen[-1]}: {shape(after)}"
        (vm,) = vms
        assert vm.power_state == "poweredOn"
        isolated = [n.name for n in after.networks if n.name.startswith(PORTGROUP_PREFIX)]
        assert isolated == [f"{PORTGROUP_PREFIX}{job_id}"]
        assert [n.network for n in vm.nics] == isolated
        copies = sorted(p.name for p in m.datastore.glob("*test-failover-*"))
        (descriptor,) = [c for c in copies if not c.endswith("-flat.vmdk")]
        assert job_id in descriptor
        assert copies == sorted([descriptor, descriptor.replace(".vmdk", "-flat.vmdk")])
        (disk,) = vm.disks
        assert disk.file_name == f"[LocalDS_0] {descriptor}"
        assert state(site, "web1") == "protected"  # replication kept running

        site.ctl("cleanup", "web1", "--wait")
        assert shape(inventory(vcsim)) == before
        assert files(m.datastore) == stored
        kinds = {j["kind"]: j["state"] for j in site.ctl_json("jobs", "--all")}
        assert kinds["test-failover"] == kinds["cleanup"] == "succeeded"


def test_test_failover_to_an_unknown_point_fails_and_creates_nothing(
    site: Site, tmp_path: Path, vcsim: Vcsim
) -> None:
    with protected(site, tmp_path, vcsim, "web2") as m:
        before, stored = shape(inventory(vcsim)), files(m.datastore)
        refused = site.ctl("test-failover", "web2", "--point", "no-such-tag", "--wait",
                           check=False)  # fmt: skip
        assert refused.returncode == 1, refused
        assert "web2 has no recovery point 'no-such-tag'" in refused.stderr
        assert "secondsitectl points web2" in refused.stderr
        (failed,) = [j for j in site.ctl_json("jobs", "--all") if j["kind"] == "test-failover"]
        record = job(site, failed["id"])
        assert record["state"] == "failed" and record["step"] == "check", record
        assert record["error"].startswith("web2 has no recovery point 'no-such-tag'")
        assert shape(inventory(vcsim)) == before
        assert files(m.datastore) == stored
        # Nothing to clean up: the failed drill left no test failover behind.
        nothing = site.ctl("cleanup", "web2", "--wait", check=False)
        assert nothing.returncode == 1 and "no test failover" in nothing.stderr


def test_failover_then_cancel_protects_the_machine_again(
    site: Site, tmp_path: Path, vcsim: Vcsim
) -> None:
    with protected(site, tmp_path, vcsim, "web3") as m:
        before = shape(inventory(vcsim))
        site.ctl("failover", "web3", "--wait")
        assert state(site, "web3") == "failed-over"
        during = inventory(vcsim)
        vm = during.vm("web3")
        assert vm is not None, shape(during)
        assert vm.power_state == "poweredOn"
        assert [n.network for n in vm.nics] == ["VM Network"]
        assert [d.file_name for d in vm.disks] == [f"[LocalDS_0] {m.disk_id}/{m.disk_id}.vmdk"]

        site.ctl("cancel", "web3", "--wait")
        cancelled = time.time()
        site.wait("web3 protected again", lambda: state(site, "web3") == "protected",
                  timeout=120)  # fmt: skip
        assert shape(inventory(vcsim)) == before
        # Protected means replicating: the master target takes the agent's points again.
        site.wait("a recovery point after the cancel", lambda: any(
            p["time"] > cancelled for p in site.ctl_json("points", "web3")
        ), timeout=120)  # fmt: skip
        kinds = {j["kind"]: j["state"] for j in site.ctl_json("jobs", "--all")}
        assert kinds["failover"] == kinds["cancel"] == "succeeded"
