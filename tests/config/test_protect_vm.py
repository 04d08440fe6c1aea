"""Protect by VM without a vCenter: matching by BIOS UUID, settings from the hardware."""

from __future__ import annotations

import pytest

from appliance.config.errors import InvalidArgument
from appliance.config.protect_vm import machine_for, replica_settings, swapped
from appliance.config.replica import ReplicaSettings
from appliance.vsphere.hardware import Firmware, Nic
from appliance.vsphere.inventory import PowerState, VirtualMachine

UUID = "4223c0de-1234-5678-9abc-def012345678"


def vm(*nics: tuple[str, str]) -> VirtualMachine:
    return VirtualMachine(
        moid="vm-42", name="web01", datacenter="DC0", folder="group-v3",
        resource_pool="resgroup-1", host="esx1", cpus=4, memory_mib=8192,
        firmware=Firmware.EFI, guest_id="debian12_64Guest", power_state=PowerState.ON,
        uuid="5000-instance", vmx_path="[ds] web01/web01.vmx", annotation="", template=False,
        disks=(), nics=tuple(Nic(label, net, "00:50:56:00:00:01", "vmxnet3")
                             for label, net in nics),
        bios_uuid=UUID,
    )  # fmt: skip


PLACEMENT = {"datastore": "ds-dr", "target_dir": "/srv/target", "folder": "group-v9",
             "resource_pool": "resgroup-9"}  # fmt: skip


def test_both_smbios_spellings_match() -> None:
    assert swapped(UUID) == "dec02342-3412-7856-9abc-def012345678"
    assert swapped(swapped(UUID)) == UUID
    machines = [{"name": "a", "agent": {"bios_uuid": "other"}},
                {"name": "b", "agent": {"bios_uuid": swapped(UUID)}},
                {"name": "c", "agent": None}]  # fmt: skip
    assert machine_for(machines, UUID) == "b"
    assert machine_for(machines, UUID.upper()) == "b"
    assert machine_for(machines, "") is None
    assert machine_for(machines[:1], UUID) is None


def test_settings_come_from_the_hardware_and_parse() -> None:
    source = vm(("Network adapter 1", "Prod"), ("Network adapter 2", "Backup"))
    settings = replica_settings(source, "vc-prod", "vc-dr", PLACEMENT,
                                {"Prod": "DR-Prod", "1": "DR-Backup"})  # fmt: skip
    parsed = ReplicaSettings.parse(settings)
    assert (parsed.cpus, parsed.memory_mib, parsed.firmware, parsed.guest_id) == (
        4, 8192, "efi", "debian12_64Guest"
    )  # fmt: skip
    assert parsed.nics == ("Network adapter 1", "Network adapter 2")
    assert parsed.network_map == {"Network adapter 1": "DR-Prod", "Network adapter 2": "DR-Backup"}
    assert parsed.source == {"vcenter": "vc-prod", "vm": "web01", "moid": "vm-42",
                             "bios_uuid": UUID}  # fmt: skip
    assert parsed.vcenter == "vc-dr" and parsed.folder == "group-v9"


def test_repeated_labels_are_mapped_by_index() -> None:
    source = vm(("ethernet-0", "A"), ("ethernet-0", "B"))
    settings = replica_settings(source, "s", "d", PLACEMENT, {"A": "x", "B": "y"})
    assert settings["network_map"] == {"0": "x", "1": "y"}
    parsed = ReplicaSettings.parse(settings)
    assert [parsed.port_group(i, n, None) for i, n in enumerate(parsed.nics)] == ["x", "y"]


def test_an_unmapped_nic_or_a_stray_key_is_refused() -> None:
    source = vm(("Network adapter 1", "Prod"))
    with pytest.raises(InvalidArgument, match="--network 'Prod=PORTGROUP'"):
        replica_settings(source, "s", "d", PLACEMENT, {})
    with pytest.raises(InvalidArgument, match="no NIC or network Nope"):
        replica_settings(source, "s", "d", PLACEMENT, {"Prod": "x", "Nope": "y"})


def test_a_malformed_source_record_is_refused() -> None:
    settings = replica_settings(vm(), "s", "d", PLACEMENT, {})
    ReplicaSettings.parse(settings)
    with pytest.raises(InvalidArgument, match="source must map"):
        ReplicaSettings.parse({**settings, "source": {"vm": 3}})
