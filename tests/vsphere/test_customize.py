"""Re-IP by guest customization on vcsim: queued while off, applied at power-on."""

from __future__ import annotations

import pytest

from appliance.vsphere.customize import Customization, NicAddress, customize
from appliance.vsphere.errors import VSphereError
from appliance.vsphere.inventory import discover
from appliance.vsphere.session import Session
from appliance.vsphere.vms import VmSpec, destroy_vm, ensure_vm, power_on

pytestmark = [pytest.mark.integration]

CUSTOM = Customization(
    hostname="web01", domain="dr.example", dns_servers=("10.9.0.53",),
    nics=(NicAddress("10.9.0.5/24", "10.9.0.1"), None),
)  # fmt: skip


def make_vm(session: Session, name: str, guest_id: str = "debian12_64Guest") -> object:
    inv = discover(session)
    cluster = inv.clusters[0]
    spec = VmSpec(name=name, owner="test-reip", datastore="LocalDS_0",
                  folder=inv.datacenters[0].vm_folder, resource_pool=cluster.resource_pool,
                  guest_id=guest_id, nics=("VM Network", "VM Network"))  # fmt: skip
    return ensure_vm(session, spec)


def test_the_address_is_applied_at_power_on_once(session: Session) -> None:
    vm: object = make_vm(session, "reip1")
    try:
        assert customize(vm, CUSTOM) is True
        assert customize(vm, CUSTOM) is False  # pending: a re-run queues nothing twice
        power_on(vm)
        net = vm.guest.net  # type: ignore[attr-defined]
        assert list(net[0].ipAddress) == ["10.9.0.5"]
        assert vm.guest.ipAddress == "10.9.0.5"  # type: ignore[attr-defined]
        assert vm.guest.hostName == "web01"  # type: ignore[attr-defined]
        assert customize(vm, CUSTOM) is False  # on: nothing to do
    finally:
        destroy_vm(session, "reip1", "test-reip")


def test_windows_and_bad_addresses_are_refused(session: Session) -> None:
    vm = make_vm(session, "reip2", guest_id="windows2019srv_64Guest")
    try:
        with pytest.raises(VSphereError, match="Sysprep"):
            customize(vm, CUSTOM)
    finally:
        destroy_vm(session, "reip2", "test-reip")
    with pytest.raises(ValueError, match="prefix"):
        NicAddress("10.9.0.5")
    with pytest.raises(ValueError, match="not in"):
        NicAddress("10.9.0.5/24", "10.8.0.1")
    with pytest.raises(ValueError, match="IPv4"):
        NicAddress("fd00::5/64")
