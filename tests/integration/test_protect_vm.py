"""Protect by VM through the real configd and secondsitectl, against vcsim.

A source VM is made in vcsim with distinctive hardware (2 CPUs, 2 GiB, EFI, a Debian
guest id, two NICs on different port groups); an agent enrols from a loop disk with
that VM's BIOS UUID as its product_uuid (SECONDSITE_PRODUCT_UUID_FILE: this host has
no DMI of its own). `vms` shows the link, `protect-vm` stores the replica settings made
from the VM, and every bad input is refused with the remedy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.vsphere import vms
from appliance.vsphere.hardware import Firmware
from appliance.vsphere.session import Endpoint, connect
from tests.integration.configsite import Site, machine
from tests.integration.test_failover_e2e import inventory
from tests.loopfs import loop_ext4
from tests.vcsim.fixture import Vcsim

pytestmark = [pytest.mark.integration, pytest.mark.root]

SOURCE_VM = "src-web"


def make_source_vm(sim: Vcsim) -> str:
    """The source VM; returns its BIOS UUID."""
    inv = inventory(sim)
    host = next(h for h in inv.hosts if h.cluster is None)
    spec = vms.VmSpec(
        name=SOURCE_VM, owner="test-source", datastore="LocalDS_0",
        folder=inv.datacenters[0].vm_folder, host=host.moid, cpus=2, memory_mib=2048,
        firmware=Firmware.EFI, guest_id="debian11_64Guest", nics=("VM Network", "DC0_DVPG0"),
    )  # fmt: skip
    endpoint = Endpoint(host=sim.host, port=sim.port, user=sim.user, password=sim.password,
                        thumbprint=sim.cert_sha256, timeout=10.0)  # fmt: skip
    with connect(endpoint) as session:
        vms.ensure_vm(session, spec)
    return inventory(sim).vm(SOURCE_VM).bios_uuid


def enrol_agent(site: Site, device: Path, name: str, uuid: str) -> None:
    """`agent enroll` as a host whose SMBIOS UUID is `uuid` (not run: enrolment is the
    link; replication is the other tests' business)."""
    state = site.tmp / f"agent-{name}"
    config = site.tmp / f"agent-{name}.toml"
    config.write_text(f'[agent]\nmachine_id = "{name}"\nstate_dir = "{state}"\n'
                      f'disks = ["{device}"]\n')  # fmt: skip
    uuid_file = site.tmp / f"{name}.uuid"
    uuid_file.write_text(uuid.upper() + "\n")  # as the kernel shows it
    done = subprocess.run(
        [sys.executable, "-m", "agent", "enroll", "--config", str(config), "--server",
         f"127.0.0.1:{site.configd.port}", "--passphrase-file", str(site.passphrase_file)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "SECONDSITE_PRODUCT_UUID_FILE": str(uuid_file)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def register(site: Site, tmp_path: Path, name: str, sim: Vcsim) -> None:
    password = tmp_path / f"{name}.pass"
    password.write_text(sim.password + "\n")
    site.ctl("vcenter-add", name, f"{sim.host}:{sim.port}", "--user", sim.user,
             "--password-file", str(password), "--thumbprint", sim.cert_sha256)  # fmt: skip


@pytest.fixture
def linked(site: Site, tmp_path: Path, vcsim: Vcsim) -> Iterator[Site]:
    """vcsim registered as the source (vc-src) and the replica vCenter (vc-dr), the
    source VM made, and machine web9 enrolled from inside it."""
    uuid = make_source_vm(vcsim)
    register(site, tmp_path, "vc-src", vcsim)
    register(site, tmp_path, "vc-dr", vcsim)
    with loop_ext4(tmp_path, 16) as (device, _mnt):
        enrol_agent(site, device, "web9", uuid)
        yield site


def placement(sim: Vcsim, *extra: str) -> list[str]:
    inv = inventory(sim)
    cluster = inv.clusters[0]
    return ["--replica-vcenter", "vc-dr", "--datastore", "LocalDS_0", "--target-dir",
            "/var/lib/secondsite/target/datastore", "--folder", inv.datacenters[0].vm_folder,
            "--resource-pool", cluster.resource_pool, "--cluster", cluster.moid,
            *extra]  # fmt: skip


def replica_of(site: Site) -> Any:
    record = machine(site, "web9")
    assert record is not None
    return record.get("replica")


def refused(site: Site, *args: str) -> str:
    done = site.ctl(*args, check=False)
    assert done.returncode != 0, done
    return done.stderr


def test_vms_lists_hardware_and_the_linked_machine(linked: Site, vcsim: Vcsim) -> None:
    listed: list[dict[str, Any]] = linked.ctl_json("vms", "--vcenter", "vc-src")
    by_name = {vm["name"]: vm for vm in listed}
    src = by_name[SOURCE_VM]
    assert src["machine"] == "web9"
    assert (src["cpus"], src["memory_mib"], src["firmware"], src["guest_id"]) == (
        2, 2048, "efi", "debian11_64Guest"
    )  # fmt: skip
    assert [n["network"] for n in src["nics"]] == ["VM Network", "DC0_DVPG0"]
    assert src["bios_uuid"] == inventory(vcsim).vm(SOURCE_VM).bios_uuid
    assert {vm["machine"] for name, vm in by_name.items() if name != SOURCE_VM} == {""}
    table = linked.ctl("vms", "--vcenter", "vc-src").stdout
    assert SOURCE_VM in table and "linked to a machine" in table


def test_protect_vm_stores_replica_settings_from_the_vm(linked: Site, vcsim: Vcsim) -> None:
    made = json.loads(linked.ctl(
        "protect-vm", SOURCE_VM, "--vcenter", "vc-src",
        *placement(vcsim, "--network", "VM Network=VM Network", "--network", "1=DC0_DVPG0"),
        "--json",
    ).stdout)  # fmt: skip
    assert made["machine"] == "web9" and made["vm"] == SOURCE_VM
    record = machine(linked, "web9")
    assert record is not None
    replica = record["replica"]
    vm = inventory(vcsim).vm(SOURCE_VM)
    labels = [n.label for n in vm.nics]
    assert replica["vcenter"] == "vc-dr"
    assert (replica["cpus"], replica["memory_mib"], replica["firmware"], replica["guest_id"]) == (
        2, 2048, "efi", "debian11_64Guest"
    )  # fmt: skip
    assert replica["nics"] == labels
    # vcsim labels both NICs alike, so the map is by index (by label on vCenter).
    keys = labels if len(set(labels)) == 2 else ["0", "1"]
    assert replica["network_map"] == {keys[0]: "VM Network", keys[1]: "DC0_DVPG0"}
    assert replica["source"] == {"vcenter": "vc-src", "vm": SOURCE_VM, "moid": vm.moid,
                                 "bios_uuid": vm.bios_uuid}  # fmt: skip
    assert replica["folder"] == inventory(vcsim).datacenters[0].vm_folder


def test_protect_vm_refuses_bad_input_with_the_remedy(linked: Site, vcsim: Vcsim) -> None:
    before = replica_of(linked)
    # A VM no enrolled agent runs in: install first.
    error = refused(linked, "protect-vm", "DC0_H0_VM0", "--vcenter", "vc-src",
                    *placement(vcsim, "--network", "DC0_DVPG0=VM Network"))  # fmt: skip
    assert "no enrolled agent runs in VM DC0_H0_VM0" in error
    assert "push-install" in error
    # A NIC left unmapped: named, with the option that maps it.
    error = refused(linked, "protect-vm", SOURCE_VM, "--vcenter", "vc-src",
                    *placement(vcsim, "--network", "VM Network=VM Network"))  # fmt: skip
    assert "(on 'DC0_DVPG0') has no port group" in error
    assert "--network 'DC0_DVPG0=PORTGROUP'" in error
    # A VM that does not exist, a port group the replica vCenter lacks, a bad folder.
    error = refused(linked, "protect-vm", "nope", "--vcenter", "vc-src", *placement(vcsim))
    assert "no VM 'nope' in vCenter vc-src" in error and "secondsitectl vms" in error
    error = refused(linked, "protect-vm", SOURCE_VM, "--vcenter", "vc-src",
                    *placement(vcsim, "--network", "VM Network=Nowhere",
                               "--network", "DC0_DVPG0=VM Network"))  # fmt: skip
    assert "vCenter vc-dr has no port group 'Nowhere'" in error
    error = refused(linked, "protect-vm", SOURCE_VM, "--vcenter", "vc-src",
                    *placement(vcsim, "--network", "VM Network=VM Network",
                               "--network", "DC0_DVPG0=VM Network"),
                    "--folder", "group-v999")  # fmt: skip
    assert "group-v999" in error
    error = refused(linked, "protect-vm", SOURCE_VM, "--vcenter", "vc-nope",
                    *placement(vcsim))  # fmt: skip
    assert "vc-nope" in error
    assert replica_of(linked) == before  # nothing stored
