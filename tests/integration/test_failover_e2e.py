"""A drill from end to end: a protected loop disk, then test failover and cleanup on vcsim.

Everything is the real program: configd on a private bus driven by secondsitectl, a
master target whose datastore directory is vcsim's LocalDS_0 (so the copies it
materialises are files vcsim's VMs can use), a process server, and an agent on a
mounted ext4 loop disk, all enrolled with the passphrase.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.vsphere.inventory import Inventory as VInventory
from appliance.vsphere.inventory import discover
from appliance.vsphere.session import Endpoint, connect
from tests.integration.configsite import Site, machine
from tests.loopfs import loop_ext4
from tests.vcsim.fixture import Vcsim

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]


def inventory(sim: Vcsim) -> VInventory:
    endpoint = Endpoint(host=sim.host, port=sim.port, user=sim.user, password=sim.password,
                        thumbprint=sim.cert_sha256, timeout=10.0)  # fmt: skip
    with connect(endpoint) as session:
        return discover(session)


SUPERBLOCK_END = 4096  # ext4's primary superblock is at 1024..2047


def sha256(path: Path, skip: int = 0) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(skip)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def replica_settings(inv: VInventory, target_dir: Path) -> dict[str, Any]:
    cluster = inv.clusters[0]
    # One host: vcsim adds a standard port group to a cluster's first host only.
    host = min((h for h in inv.hosts if h.cluster == cluster.name), key=lambda h: h.moid)
    return {
        "vcenter": "vc-dr", "datacenter": inv.datacenters[0].name, "datastore": "LocalDS_0",
        "target_dir": str(target_dir), "folder": inv.datacenters[0].vm_folder,
        "resource_pool": cluster.resource_pool, "host": host.moid, "nics": ["eth0"],
        "network_map": {"eth0": "VM Network"}, "cpus": 2, "memory_mib": 2048,
        "firmware": "efi", "guest_id": "debian11_64Guest",
    }  # fmt: skip


def shape(inv: VInventory) -> tuple[list[str], list[str]]:
    return sorted(v.name for v in inv.vms), sorted(n.name for n in inv.networks)


def test_drill_on_vcsim(site: Site, tmp_path: Path, vcsim: Vcsim) -> None:
    inv = inventory(vcsim)
    datastore = Path(next(d.url for d in inv.datastores if d.name == "LocalDS_0"))
    site.servers(datastore)

    # vCenter registration: first refused with the thumbprint to check, then trusted.
    password = tmp_path / "vc.pass"
    password.write_text(vcsim.password + "\n")
    add = ["vcenter-add", "vc-dr", f"{vcsim.host}:{vcsim.port}", "--user", vcsim.user,
           "--password-file", str(password)]  # fmt: skip
    refused = site.ctl(*add, check=False)
    assert refused.returncode == 6 and vcsim.cert_sha256.upper() in refused.stderr.upper()
    site.ctl(*add, "--thumbprint", vcsim.cert_sha256)
    assert [v["name"] for v in site.ctl_json("vcenters")] == ["vc-dr"]

    data = os.urandom(4 << 20)
    with loop_ext4(tmp_path, 32) as (device, mnt):
        (mnt / "data.bin").write_bytes(data)
        os.sync()
        agent = site.agent(device)
        site.wait("web1 protected",
                  lambda: (m := machine(site, "web1")) and m["state"] == "protected")  # fmt: skip
        settings = tmp_path / "replica.json"
        settings.write_text(json.dumps(replica_settings(inv, datastore)))
        site.ctl("replica", "web1", str(settings))

        # No writes from here on. Each tag's freeze still writes a little (ext4 flushes
        # its superblock), so stop the agent: then its last point is the device as it is.
        os.sync()
        synced = time.time()

        def point_after_sync() -> bool:
            return any(p["time"] > synced + 1 for p in site.ctl_json("points", "web1"))

        site.wait("a point after the sync", point_after_sync)
        agent.terminate()
        assert agent.wait(timeout=30) == 0
        expected = sha256(device, skip=SUPERBLOCK_END)
        before = shape(inventory(vcsim))

        site.ctl("test-failover", "web1", "--wait")
        drill = inventory(vcsim)
        vm = drill.vm("web1-test")
        assert vm is not None, shape(drill)
        assert (vm.cpus, vm.memory_mib, vm.firmware) == (2, 2048, "efi")
        assert vm.power_state == "poweredOn"
        (nic,) = vm.nics
        assert nic.network is not None and nic.network.startswith("secondsite-iso-")
        (disk,) = vm.disks
        rel = disk.file_name.split("] ", 1)[1]
        flat = datastore / rel.replace(".vmdk", "-flat.vmdk")
        # The point is the device as frozen; thawing rewrites the superblock (ext4 sets
        # needs_recovery again), after the last point: all but that block must match.
        assert sha256(flat, skip=SUPERBLOCK_END) == expected
        check = subprocess.run(["e2fsck", "-fn", str(flat)], capture_output=True, text=True,
                               check=False, timeout=60)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        inside = subprocess.run(["debugfs", "-R", "cat /data.bin", str(flat)],
                                capture_output=True, check=True, timeout=60).stdout  # fmt: skip
        assert inside == data
        assert machine(site, "web1")["state"] == "protected"  # type: ignore[index]

        site.ctl("cleanup", "web1", "--wait")
        assert shape(inventory(vcsim)) == before
        assert not flat.exists() and not (datastore / rel).exists()
        jobs = {j["kind"]: j["state"] for j in site.ctl_json("jobs", "--all")}
        assert jobs["test-failover"] == jobs["cleanup"] == "succeeded"
