"""OVF environment documents as vSphere writes them (tests and the image boot test)."""

from __future__ import annotations

from xml.sax.saxutils import quoteattr


def environment(properties: dict[str, str], macs: tuple[str, ...] = ("00:50:56:8a:3c:01",)) -> str:
    """An OVF environment as vSphere 8 writes it to guestinfo.ovfEnv."""
    props = "\n".join(
        f"         <Property oe:key={quoteattr(k)} oe:value={quoteattr(v)}/>"
        for k, v in properties.items()
    )
    adapters = "\n".join(
        f'      <ve:Adapter ve:mac="{mac}" ve:network="DR-Management" ve:unitNumber="{7 + i}"/>'
        for i, mac in enumerate(macs)
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Environment
     xmlns="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:ve="http://www.vmware.com/schema/ovfenv"
     oe:id=""
     ve:vCenterId="vm-1042">
   <PlatformSection>
      <Kind>VMware ESXi</Kind>
      <Version>8.0.2</Version>
      <Vendor>VMware, Inc.</Vendor>
      <Locale>en</Locale>
   </PlatformSection>
   <PropertySection>
{props}
   </PropertySection>
   <ve:EthernetAdapterSection>
{adapters}
   </ve:EthernetAdapterSection>
</Environment>
"""
