"""vcsim is a usable vSphere peer for pyVmomi: credentials, TLS, inventory, datastores,
VMs on pre-written disks, port groups, and a clean shutdown."""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Connect, Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.pki import Authority
from tests.vcsim.fixture import BUILD_SCRIPT, Inventory, Vcsim, VcsimError, ensure_built

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Not vcsim's default model, so that the counts prove the flags are honoured.
VCSIM_INVENTORY = Inventory(
    clusters=2, hosts_per_cluster=2, standalone_hosts=1, vms=1, datastores=2, dv_portgroups=2
)
SMALL = Inventory(clusters=1, hosts_per_cluster=1, standalone_hosts=0, vms=1, datastores=2)


@pytest.fixture(scope="module")
def si(vcsim: Vcsim) -> Iterator[Any]:
    service_instance = vcsim.connect()
    yield service_instance
    Disconnect(service_instance)


def objects(si: Any, kind: type) -> list[Any]:
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()


def wait(task: Any) -> Any:
    WaitForTask(task)
    return task.info.result


def test_build_is_cached() -> None:
    if os.environ.get("VCSIM_BINARY"):
        pytest.skip("VCSIM_BINARY names a prebuilt vcsim")
    ensure_built()
    started = time.monotonic()
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "up to date" in out
    assert time.monotonic() - started < 10


def test_login_with_the_right_credentials(vcsim: Vcsim, si: Any) -> None:
    content = si.RetrieveContent()
    assert content.about.apiType == "VirtualCenter"
    assert content.sessionManager.currentSession.userName == vcsim.user
    assert vcsim.host == "127.0.0.1"
    assert vcsim.url == f"https://127.0.0.1:{vcsim.port}/sdk"


def test_wrong_password_or_user_is_refused(vcsim: Vcsim) -> None:
    with pytest.raises(vim.fault.InvalidLogin):
        vcsim.connect(password=vcsim.password + "x")
    with pytest.raises(vim.fault.InvalidLogin):
        vcsim.connect(user="someone-else")


def test_certificate_is_verified_and_can_be_pinned(vcsim: Vcsim, si: Any) -> None:
    # The system trust store does not know vcsim's self-signed certificate...
    with pytest.raises(ssl.SSLCertVerificationError):
        SmartConnect(
            host=vcsim.host,
            port=vcsim.port,
            user=vcsim.user,
            pwd=vcsim.password,
            sslContext=ssl.create_default_context(),
        )
    # ...the fixture's context trusts exactly the certificate vcsim serves (checked against
    # the thumbprint it printed), hostname included; `si` connected with it...
    context = vcsim.ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    # ...and pyVmomi's own pinning (the shape of the product's per-vCenter "trust this
    # thumbprint") accepts that thumbprint and no other. SmartConnect's version probe does
    # not honour `thumbprint`, so this is Connect with the version already known.
    version = si._stub.version
    pinned = Connect(
        host=vcsim.host,
        port=vcsim.port,
        user=vcsim.user,
        pwd=vcsim.password,
        version=version,
        thumbprint=vcsim.cert_sha256,
        sslContext=ssl.create_default_context(),
    )
    assert pinned.content.about.apiType == "VirtualCenter"
    Disconnect(pinned)
    wrong = ":".join(["00"] * 32)
    assert wrong != vcsim.cert_sha256
    with pytest.raises(vim.fault.HostConnectFault, match="thumbprint mismatch"):
        Connect(
            host=vcsim.host,
            port=vcsim.port,
            user=vcsim.user,
            pwd=vcsim.password,
            version=version,
            thumbprint=wrong,
            sslContext=ssl.create_default_context(),
        )


def test_certificate_from_a_ca(tmp_path: Path) -> None:
    ca = Authority.create(tmp_path / "ca", "vCenter Test CA")
    leaf = ca.issue("vcenter.test")
    with Vcsim().start(inventory=SMALL, cert=leaf.cert, key=leaf.key) as sim:
        der = ssl.PEM_cert_to_DER_cert(leaf.cert.read_text())
        assert sim.cert_sha256 == ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
        connection = SmartConnect(
            host=sim.host,
            port=sim.port,
            user=sim.user,
            pwd=sim.password,
            sslContext=sim.ssl_context(cafile=ca.cert),
        )
        Disconnect(connection)


def test_inventory_has_the_requested_size(si: Any) -> None:
    inv = VCSIM_INVENTORY
    assert len(objects(si, vim.HostSystem)) == inv.host_count == 5
    assert len(objects(si, vim.VirtualMachine)) == inv.vm_count == 3
    assert len(objects(si, vim.Datastore)) == inv.datastore_count == 2
    assert len(objects(si, vim.ClusterComputeResource)) == 2
    assert len(objects(si, vim.Datacenter)) == 1
    dvpgs = {pg.name for pg in objects(si, vim.dvs.DistributedVirtualPortgroup)}
    assert {"DC0_DVPG0", "DC0_DVPG1"} <= dvpgs  # plus the switch's uplink port group
    assert [s.name for s in objects(si, vim.DistributedVirtualSwitch)] == ["DVS0"]
    for host in objects(si, vim.HostSystem):
        assert {ds.name for ds in host.datastore} == {"LocalDS_0", "LocalDS_1"}


def test_datastore_urls_are_the_reported_local_directories(vcsim: Vcsim, si: Any) -> None:
    seen = {}
    for ds in objects(si, vim.Datastore):
        path = vcsim.datastore_dir(ds.name)
        assert ds.info.url == ds.summary.url == str(path)
        assert path.is_dir()
        seen[f"DC0/{ds.name}"] = path
    assert seen == vcsim.datastores
    # The model's VMs live there as real files.
    assert (vcsim.datastore_dir() / "DC0_H0_VM0" / "DC0_H0_VM0.vmx").is_file()


def test_sigterm_removes_the_datastore_directories() -> None:
    with Vcsim().start(inventory=SMALL) as sim:
        dirs = list(sim.datastores.values())
        assert len(dirs) == 2
        assert all(d.is_dir() for d in dirs)
        assert sim.process is not None
        pid = sim.process.pid
        assert sim.stop() == 0  # exited by itself on SIGTERM, no SIGKILL
        assert not any(d.exists() for d in dirs)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_parent_gone_means_clean_exit() -> None:
    with Vcsim().start(inventory=SMALL) as sim:
        dirs = list(sim.datastores.values())
        assert sim.process is not None and sim.process.stdin is not None
        sim.process.stdin.close()  # what happens when the test process dies
        assert sim.process.wait(10) == 0
        assert not any(d.exists() for d in dirs)


def test_bad_inventory_is_a_clear_error() -> None:
    with pytest.raises(VcsimError, match="-vm needs -ds"):
        Vcsim().start(inventory=Inventory(vms=1, datastores=0))


def write_flat_vmdk(directory: Path, name: str, size: int) -> Path:
    """A monolithicFlat VMDK pair (what the master target exposes); returns the flat file."""
    directory.mkdir(parents=True)
    flat = directory / f"{name}-flat.vmdk"
    with flat.open("wb") as f:
        f.write(b"secondsite recovery point\n" * 64)
        f.truncate(size)
    (directory / f"{name}.vmdk").write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n# Extent description\n'
        f'RW {size // 512} FLAT "{flat.name}" 0\n\n# The Disk Data Base\n'
        'ddb.adapterType = "lsilogic"\nddb.virtualHWVersion = "13"\n'
    )
    return flat


def test_create_vm_on_an_existing_flat_disk_powers_on(vcsim: Vcsim, si: Any) -> None:
    flat = write_flat_vmdk(vcsim.datastore_dir() / "replicas" / "web01", "web01", 16 << 20)
    digest = hashlib.sha256(flat.read_bytes()).hexdigest()
    dc = objects(si, vim.Datacenter)[0]
    cluster = next(c for c in objects(si, vim.ClusterComputeResource) if c.name == "DC0_C0")
    add = vim.vm.device.VirtualDeviceSpec.Operation.add
    scsi = vim.vm.device.ParaVirtualSCSIController(key=-100, busNumber=0, sharedBus="noSharing")
    disk = vim.vm.device.VirtualDisk(
        key=-101,
        controllerKey=-100,
        unitNumber=0,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName="[LocalDS_0] replicas/web01/web01.vmdk", diskMode="persistent"
        ),
    )
    nic = vim.vm.device.VirtualVmxnet3(
        key=-102,
        backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
        connectable=vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True),
    )
    spec = vim.vm.ConfigSpec(
        name="web01",
        numCPUs=2,
        memoryMB=2048,
        guestId="debian11_64Guest",
        firmware="efi",
        # The VM's home is not the disks' directory: Destroy_Task deletes the home.
        files=vim.vm.FileInfo(vmPathName="[LocalDS_0] web01/web01.vmx"),
        # No fileOperation on the disk: attach the existing file, do not create one.
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation=add, device=d) for d in (scsi, disk, nic)
        ],
    )
    vm = wait(dc.vmFolder.CreateVM_Task(config=spec, pool=cluster.resourcePool))
    assert vm.config.files.vmPathName == "[LocalDS_0] web01/web01.vmx"
    disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    backings = [d.backing for d in disks]
    assert all(isinstance(b, vim.vm.device.VirtualDisk.FlatVer2BackingInfo) for b in backings)
    assert [getattr(b, "fileName", None) for b in backings] == [
        "[LocalDS_0] replicas/web01/web01.vmdk"
    ]
    assert (vm.config.hardware.numCPU, vm.config.hardware.memoryMB) == (2, 2048)
    assert vm.config.firmware == "efi"
    assert [n.name for n in vm.network] == ["VM Network"]

    wait(vm.PowerOnVM_Task())
    assert vm.runtime.powerState == vim.VirtualMachine.PowerState.poweredOn
    assert hashlib.sha256(flat.read_bytes()).hexdigest() == digest  # untouched

    # Cleanup that keeps the replica: detach the disk (no fileOperation), then destroy.
    wait(vm.PowerOffVM_Task())
    remove = vim.vm.device.VirtualDeviceSpec(
        operation=vim.vm.device.VirtualDeviceSpec.Operation.remove, device=disks[0]
    )
    wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[remove])))
    wait(vm.Destroy_Task())
    assert not (vcsim.datastore_dir() / "web01").exists()
    assert hashlib.sha256(flat.read_bytes()).hexdigest() == digest
    assert (flat.parent / "web01.vmdk").is_file()


def test_standard_port_group_add_and_remove(si: Any) -> None:
    dc = objects(si, vim.Datacenter)[0]
    host = next(h for h in objects(si, vim.HostSystem) if h.name == "DC0_C0_H0")
    netsys = host.configManager.networkSystem
    name = "secondsite-isolated-web01"
    netsys.AddPortGroup(
        portgrp=vim.host.PortGroup.Specification(
            name=name, vlanId=0, vswitchName="vSwitch0", policy=vim.host.NetworkPolicy()
        )
    )
    assert name in {n.name for n in dc.networkFolder.childEntity}
    assert name in {pg.spec.name for pg in netsys.networkInfo.portgroup}
    with pytest.raises(vim.fault.DuplicateName):
        netsys.AddPortGroup(
            portgrp=vim.host.PortGroup.Specification(
                name=name, vlanId=0, vswitchName="vSwitch0", policy=vim.host.NetworkPolicy()
            )
        )

    netsys.RemovePortGroup(pgName=name)
    assert name not in {n.name for n in dc.networkFolder.childEntity}
    assert name not in {pg.spec.name for pg in netsys.networkInfo.portgroup}
    with pytest.raises(vim.fault.NotFound):
        netsys.RemovePortGroup(pgName=name)
