"""Isolated networks for test failover: a standard port group on a vSwitch with no uplink.

Each isolated network gets its own vSwitch (port groups on one vSwitch with the same
VLAN reach each other, so sharing a switch would join two drills), created on every
host of the target cluster (or on the one target host), so a VM placed on any of them
finds it. Names carry our prefixes, which is how the objects are recognised as ours:
removal touches only names with those prefixes, and only a vSwitch without physical
NICs or foreign port groups.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from appliance.vsphere.errors import NameTaken, NotFound, NotOurs
from appliance.vsphere.session import Session
from appliance.vsphere.tasks import translated

log = logging.getLogger(__name__)

PORTGROUP_PREFIX = "secondsite-iso-"
VSWITCH_PREFIX = "ss-iso-"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,23}$")  # vSwitch names: < 32 chars
_PORTS = 128


@dataclass(frozen=True)
class IsolatedNetwork:
    """An isolated port group as created on a set of hosts."""

    network_id: str
    portgroup: str
    vswitch: str
    hosts: tuple[str, ...]  # host names


def isolated_names(network_id: str) -> tuple[str, str]:
    """(port group, vSwitch) names for an isolated network id (e.g. a job id)."""
    if not _ID_RE.fullmatch(network_id):
        raise ValueError(f"isolated network id {network_id!r}: 1-24 of A-Z a-z 0-9 _ -")
    return f"{PORTGROUP_PREFIX}{network_id}", f"{VSWITCH_PREFIX}{network_id}"


def target_hosts(session: Session, target: str) -> list[Any]:
    """The hosts behind `target`: a host's moid, or a cluster's / compute resource's."""
    found = session.collect({vim.HostSystem: ["name"], vim.ComputeResource: ["host"]})
    for obj, props in found:
        if obj._moId != target:
            continue
        if isinstance(obj, vim.HostSystem):
            return [obj]
        return sorted(props.get("host") or [], key=lambda h: h._moId)
    raise NotFound(f"no host or cluster {target!r} on {session.endpoint.label}")


def ensure_isolated_portgroup(session: Session, target: str, network_id: str) -> IsolatedNetwork:
    """Create (or find) the isolated port group on every host of `target`.

    A failure part-way (say a collision on the third host) leaves the first hosts
    configured; `remove_isolated_portgroup` cleans up either way.
    """
    portgroup, vswitch = isolated_names(network_id)
    names = []
    for host in target_hosts(session, target):
        with translated(f"isolated network on {host.name}"):
            _ensure_on_host(host, portgroup, vswitch)
            names.append(str(host.name))
    log.info("isolated port group %s on %s", portgroup, ", ".join(names))
    return IsolatedNetwork(network_id, portgroup, vswitch, tuple(names))


def _ensure_on_host(host: Any, portgroup: str, vswitch: str) -> None:
    netsys = host.configManager.networkSystem
    info = netsys.networkInfo
    # Check the port group first, so that a collision leaves no vSwitch behind.
    existing = next((p for p in info.portgroup or [] if p.spec.name == portgroup), None)
    if existing is not None and existing.spec.vswitchName != vswitch:
        raise NameTaken(f"{host.name}: port group {portgroup} is on another vSwitch")
    switch = next((s for s in info.vswitch or [] if s.name == vswitch), None)
    if switch is None:
        spec = vim.host.VirtualSwitch.Specification(numPorts=_PORTS)  # no bridge: no uplink
        netsys.AddVirtualSwitch(vswitchName=vswitch, spec=spec)
    elif switch.pnic:
        raise NameTaken(f"{host.name}: vSwitch {vswitch} has physical NICs; not ours")
    if existing is not None:
        return
    policy = vim.host.NetworkPolicy(
        security=vim.host.NetworkPolicy.SecurityPolicy(
            allowPromiscuous=False, macChanges=False, forgedTransmits=False
        )
    )
    pg_spec = vim.host.PortGroup.Specification(
        name=portgroup, vlanId=0, vswitchName=vswitch, policy=policy
    )
    try:
        netsys.AddPortGroup(portgrp=pg_spec)
    except vim.fault.DuplicateName as fault:
        # The datacenter already has a network of this name. A standard one carrying our
        # prefix is this port group seen from another host (vcsim refuses the second host
        # this way, vCenter merges them); anything else, e.g. a distributed port group of
        # the same name, is a real collision.
        if not _is_standard_network(fault.object):
            raise
        log.debug("%s: port group %s exists datacenter-wide", host.name, portgroup)


def _is_standard_network(obj: Any) -> bool:
    return isinstance(obj, vim.Network) and not isinstance(
        obj, vim.dvs.DistributedVirtualPortgroup | vim.OpaqueNetwork
    )


def remove_isolated_portgroup(session: Session, target: str, network_id: str) -> bool:
    """Remove the isolated port group and its vSwitch from every host of `target`.

    Returns whether anything was removed; a second call is a no-op. A VM still on the
    port group makes vSphere refuse (TaskFailed, fault ResourceInUse).
    """
    portgroup, vswitch = isolated_names(network_id)
    removed = False
    for host in target_hosts(session, target):
        with translated(f"remove isolated network on {host.name}"):
            removed |= _remove_on_host(host, portgroup, vswitch)
    if removed:
        log.info("removed isolated port group %s", portgroup)
    return removed


def _remove_on_host(host: Any, portgroup: str, vswitch: str) -> bool:
    netsys = host.configManager.networkSystem
    info = netsys.networkInfo
    removed = False
    existing = next((p for p in info.portgroup or [] if p.spec.name == portgroup), None)
    if existing is not None:
        if existing.spec.vswitchName != vswitch:
            raise NotOurs(f"{host.name}: port group {portgroup} is on another vSwitch")
        netsys.RemovePortGroup(pgName=portgroup)
        removed = True
    switch = next((s for s in info.vswitch or [] if s.name == vswitch), None)
    if switch is None:
        return removed
    if switch.pnic:
        raise NotOurs(f"{host.name}: vSwitch {vswitch} has physical NICs; left alone")
    others = [name for name in _portgroups_on(switch) if name != portgroup]
    if others:
        log.warning("%s: vSwitch %s still has %s; left in place", host.name, vswitch, others)
        return removed
    netsys.RemoveVirtualSwitch(vswitchName=vswitch)
    return True


def _portgroups_on(switch: Any) -> list[str]:
    # Keys look like "key-vim.host.PortGroup-<name>".
    return [str(key).split("PortGroup-", 1)[-1] for key in switch.portgroup or []]
