"""secondsitectl's vCenter commands: new credentials, the source VMs, protect by VM."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.ctl import render
from appliance.ctl.commands import Context, CtlError, CtlExit, UsageError


def read_password(path: str) -> str:
    try:
        return Path(path).read_text().rstrip("\n")
    except OSError as exc:
        raise CtlError(f"cannot read the password file {path}: {exc.strerror}") from None


def cmd_vcenter_credentials(ctx: Context, args: argparse.Namespace) -> int:
    password = read_password(args.password_file)
    record = ctx.record("SetVCenterCredentials", args.name, args.user, password)
    ctx.print(render.to_json(record) if ctx.json else f"vCenter {args.name}: credentials stored.")
    return CtlExit.OK


VM_COLUMNS = ("name", "moid", "power_state", "cpus", "memory_mib", "firmware", "machine")


def cmd_vms(ctx: Context, args: argparse.Namespace) -> int:
    records = ctx.records("ListVMs", args.vcenter)
    if ctx.json:
        ctx.print(render.to_json(records))
        return CtlExit.OK
    if ctx.legend:
        ctx.print("  ".join(c.upper() for c in VM_COLUMNS) + "  NICS")
    for vm in records:
        nics = ", ".join(f"{n.get('label')}: {n.get('network')}" for n in vm.get("nics") or [])
        ctx.print("  ".join(str(vm.get(c) or "-") for c in VM_COLUMNS) + f"  {nics or '-'}")
    if ctx.legend:
        linked = sum(1 for vm in records if vm.get("machine"))
        ctx.print(f"\n{len(records)} VMs in vCenter {args.vcenter}, {linked} linked to a machine.")
    return CtlExit.OK


def cmd_protect_vm(ctx: Context, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {
        key: value
        for key in PLACEMENT_OPTIONS
        if (value := getattr(args, key, None)) not in (None, "")
    }
    network: dict[str, str] = {}
    for pair in args.network or ():
        source, sep, target = pair.partition("=")
        if not sep or not source or not target:
            raise UsageError(f"--network {pair!r}: expected NIC=PORTGROUP or NETWORK=PORTGROUP")
        network[source] = target
    if network:
        options["network_map"] = network
    made = ctx.record("ProtectVM", args.vm, args.vcenter, args.replica_vcenter, options)
    if ctx.json:
        ctx.print(render.to_json(made))
    else:
        name = made.get("machine")
        ctx.print(f"VM {made.get('vm')} is machine {name}; its replica settings are "
                  f"stored; 'secondsitectl protect {name}' starts replication.")  # fmt: skip
    return CtlExit.OK


#: protect-vm's placement options: the replica settings keys they set.
PLACEMENT_OPTIONS = ("datastore", "disk_datastore", "target_dir", "folder", "resource_pool",
                     "host", "cluster", "vm_name", "datacenter")  # fmt: skip


def add_commands(add: Any) -> None:
    """Register vms and protect-vm with the parser's `add(name, func, text, example)`."""
    vms = add("vms", cmd_vms,
              "list the VMs of a registered vCenter with their hardware, and the machine "
              "each is linked to (by BIOS UUID: an enrolled agent running in it)",
              "vms --vcenter vc-prod")  # fmt: skip
    vms.add_argument("--vcenter", required=True, help="the registered vCenter to list")
    pv = add("protect-vm", cmd_protect_vm,
             "protect a VM of the source vCenter: link it to the machine its agent enrolled "
             "as (matched by BIOS UUID; install the agent first) and store replica settings "
             "made from its hardware (CPUs, memory, firmware, guest OS, NICs) and the "
             "placement given; then 'protect MACHINE' starts replication",
             "protect-vm web01 --vcenter vc-prod --replica-vcenter vc-dr --datastore ds1 "
             "--target-dir /var/lib/secondsite/target/datastore --folder group-v3 "
             "--resource-pool resgroup-22 --cluster domain-c21 "
             "--network 'VM Network=DR Network'")  # fmt: skip
    pv.add_argument("vm", help="the VM's name, or its id (vm-42) when names repeat")
    pv.add_argument("--vcenter", required=True, help="the source vCenter the VM runs in")
    pv.add_argument("--replica-vcenter", required=True,
                    help="the vCenter its replica VM is created in at failover")  # fmt: skip
    pv.add_argument("--datastore", required=True,
                    help="datastore for the replica VM's home (.vmx, logs)")  # fmt: skip
    pv.add_argument("--target-dir", required=True, metavar="DIR",
                    help="the master target's datastore directory, as it sees it")  # fmt: skip
    pv.add_argument("--disk-datastore", metavar="DATASTORE",
                    help="the datastore that is the master target's datastore directory "
                         "(default: --datastore)")  # fmt: skip
    pv.add_argument("--folder", required=True, metavar="ID",
                    help="VM folder id (e.g. group-v3) for the replica VM")  # fmt: skip
    pv.add_argument("--resource-pool", metavar="ID", help="resource pool id (e.g. resgroup-22)")
    pv.add_argument("--host", metavar="ID", help="host id (e.g. host-21)")
    pv.add_argument("--cluster", metavar="ID",
                    help="cluster id: where a drill's isolated network is made")  # fmt: skip
    pv.add_argument("--vm-name", help="the replica VM's name (default: the machine's)")
    pv.add_argument("--datacenter", help="informational: the replica datacenter's name")
    pv.add_argument("--network", action="append", metavar="FROM=PORTGROUP",
                    help="the replica site's port group for a NIC (its label, e.g. 'Network "
                         "adapter 1', or its index) or for every NIC on a source port group "
                         "(repeatable); every NIC must be mapped")  # fmt: skip
