"""secondsitectl's failover commands: vCenters, replica settings, failover jobs, plans."""

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


def _json_object(path: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text() if path != "-" else input())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {what} from {path}: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object")
    return value


def cmd_replica_set(ctx: Context, args: argparse.Namespace) -> int:
    settings = _json_object(args.file, "replica settings")
    record = ctx.record("SetReplica", args.machine, settings)
    ctx.print(render.to_json(record) if ctx.json else f"Replica settings of {args.machine} set.")
    return CtlExit.OK


def cmd_plans(ctx: Context, args: argparse.Namespace) -> int:
    records = ctx.records("ListPlans")
    if ctx.json:
        ctx.print(render.to_json(records))
        return CtlExit.OK
    for record in records:
        groups = []
        for n, g in enumerate((record.get("spec") or {}).get("groups", []), 1):
            extra = [f"{k} {g[k]!r}" for k in ("pre", "post") if g.get(k)]
            if g.get("wait_s"):
                extra.append(f"then wait {g['wait_s']:g} s")
            groups.append(f"{n}: {' '.join(g['machines'])}" + (f" ({', '.join(extra)})"
                                                               if extra else ""))  # fmt: skip
        ctx.print(f"{record['name']}  " + "; ".join(groups))
    if ctx.legend:
        ctx.print(f"\n{len(records)} plans listed.")
    return CtlExit.OK


def cmd_plan_set(ctx: Context, args: argparse.Namespace) -> int:
    record = ctx.record("SetPlan", args.name, _json_object(args.file, "a plan spec"))
    ctx.print(render.to_json(record) if ctx.json else f"Plan {args.name} set.")
    return CtlExit.OK


def cmd_plan_test_failover(ctx: Context, args: argparse.Namespace) -> int:
    return _start_job(ctx, args, ctx.call("PlanTestFailover", args.name, args.point))


def cmd_plan_cleanup(ctx: Context, args: argparse.Namespace) -> int:
    return _start_job(ctx, args, ctx.call("PlanCleanup", args.name))


def cmd_plan_failover(ctx: Context, args: argparse.Namespace) -> int:
    mode = "unplanned" if args.unplanned else "planned"
    return _start_job(ctx, args, ctx.call("PlanFailover", args.name, args.point, mode))


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
