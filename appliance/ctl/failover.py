"""secondsitectl's failover commands: vCenters, replica settings, and the failover jobs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from appliance.ctl import render
from appliance.ctl.commands import Context, CtlError, CtlExit, UsageError, _start_job


def _network_map(pairs: list[str] | None) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    for pair in pairs or ():
        nic, sep, portgroup = pair.partition("=")
        if not sep or not nic or not portgroup:
            raise UsageError(f"--network {pair!r}: expected NIC=PORTGROUP, e.g. eth0='VM Network'")
        mapping[nic] = portgroup
    return mapping


def cmd_test_failover(ctx: Context, args: argparse.Namespace) -> int:
    job = ctx.call("TestFailover", args.machine, args.point, _network_map(args.network))
    return _start_job(ctx, args, job)


def cmd_cleanup(ctx: Context, args: argparse.Namespace) -> int:
    return _start_job(ctx, args, ctx.call("Cleanup", args.machine))


def cmd_failover(ctx: Context, args: argparse.Namespace) -> int:
    mode = "unplanned" if args.unplanned else "planned"
    return _start_job(ctx, args, ctx.call("Failover", args.machine, args.point, mode))


def cmd_commit(ctx: Context, args: argparse.Namespace) -> int:
    return _start_job(ctx, args, ctx.call("Commit", args.machine))


def cmd_cancel(ctx: Context, args: argparse.Namespace) -> int:
    return _start_job(ctx, args, ctx.call("Cancel", args.machine))


def cmd_failback(ctx: Context, args: argparse.Namespace) -> int:
    return _start_job(ctx, args, ctx.call("Failback", args.machine))


def cmd_replica_set(ctx: Context, args: argparse.Namespace) -> int:
    try:
        settings = json.loads(Path(args.file).read_text() if args.file != "-" else input())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read replica settings from {args.file}: {exc}") from None
    if not isinstance(settings, dict):
        raise UsageError("replica settings must be a JSON object")
    record = ctx.record("SetReplica", args.machine, settings)
    ctx.print(render.to_json(record) if ctx.json else f"Replica settings of {args.machine} set.")
    return CtlExit.OK


VCENTER_COLUMNS = ("name", "site", "address", "thumbprint")


def cmd_vcenters(ctx: Context, args: argparse.Namespace) -> int:
    records = ctx.records("ListVCenters")
    if ctx.json:
        ctx.print(render.to_json(records))
        return CtlExit.OK
    for record in records:
        ctx.print("  ".join(str(record.get(k) or "-") for k in VCENTER_COLUMNS))
    if ctx.legend:
        ctx.print(f"\n{len(records)} vCenters listed.")
    return CtlExit.OK


def cmd_vcenter_add(ctx: Context, args: argparse.Namespace) -> int:
    try:
        password = Path(args.password_file).read_text().rstrip("\n")
    except OSError as exc:
        raise CtlError(
            f"cannot read the password file {args.password_file}: {exc.strerror}"
        ) from None
    record = ctx.record("RegisterVCenter", args.name, args.site or "", args.address, args.user,
                        password, args.thumbprint or "")  # fmt: skip
    ctx.print(render.to_json(record) if ctx.json else f"vCenter {args.name} registered.")
    return CtlExit.OK
