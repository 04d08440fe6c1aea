"""The OVF template (image/secondsite.ovf.in) against what first boot reads: both
environment transports declared, a CD-ROM for the iso one, and exactly the
ProductSection keys that appliance/setup/ovfenv.py knows."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from appliance.setup.ovfenv import Key

OVF = Path(__file__).resolve().parents[2] / "image" / "secondsite.ovf.in"
NS = {
    "ovf": "http://schemas.dmtf.org/ovf/envelope/1",
    "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData",
}
CDROM, IDE = "15", "5"  # CIM ResourceType values


def system() -> ET.Element:
    found = ET.parse(OVF).getroot().find("ovf:VirtualSystem", NS)
    assert found is not None
    return found


def test_both_transports_are_declared() -> None:
    hardware = system().find("ovf:VirtualHardwareSection", NS)
    assert hardware is not None
    transports = hardware.get(f"{{{NS['ovf']}}}transport", "").split()
    assert sorted(transports) == ["com.vmware.guestInfo", "iso"]


def test_a_cdrom_drive_for_the_iso_transport() -> None:
    items = system().findall("ovf:VirtualHardwareSection/ovf:Item", NS)
    by_id = {i.findtext("rasd:InstanceID", namespaces=NS): i for i in items}
    drives = [i for i in items if i.findtext("rasd:ResourceType", namespaces=NS) == CDROM]
    assert len(drives) == 1
    parent = by_id[drives[0].findtext("rasd:Parent", namespaces=NS)]
    assert parent.findtext("rasd:ResourceType", namespaces=NS) == IDE


def test_product_properties_are_the_ones_first_boot_reads() -> None:
    properties = system().findall("ovf:ProductSection/ovf:Property", NS)
    keys = {p.get(f"{{{NS['ovf']}}}key") for p in properties}
    assert keys == {k.value for k in Key}
