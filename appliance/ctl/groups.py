"""secondsitectl's consistency-group commands: groups, group-set, group-delete, group-tag."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

from appliance.ctl import render
from appliance.ctl.commands import Context, CtlExit, UsageError
from appliance.ctl.render import Column

Add = Callable[..., argparse.ArgumentParser]


def register(add: Add, duration: Callable[[str], int | float]) -> None:
    """The commands, on secondsitectl's `add` (name, function, help, example)."""
    add("groups", cmd_groups,
        "list consistency groups: members, interval, the newest point common to all "
        "members (asked of the master targets) and the last barrier's outcome",
        "groups --json")  # fmt: skip
    spec = add("group-set", cmd_group_set,
               "create or change a consistency group: its members then take a group point "
               "together every interval (all frozen at one instant; a member that does not "
               "arrive frozen in time makes everyone skip it, an event names it), and a "
               "plan of its machines fails over to their newest common point",
               "group-set erp --add db01 --add app01 --interval 5m")  # fmt: skip
    spec.add_argument("name", help="the group (at most 64 characters, no ':')")
    spec.add_argument("--add", action="append", default=[], metavar="MACHINE",
                      help="make MACHINE a member (repeatable; one group per machine)")  # fmt: skip
    spec.add_argument("--remove", action="append", default=[], metavar="MACHINE",
                      help="MACHINE leaves the group (repeatable)")  # fmt: skip
    spec.add_argument("--interval", type=duration, metavar="DURATION",
                      help="how often the members take a group point, e.g. 300, 5m "
                           "(5 s to 1 day; new groups: 5m)")  # fmt: skip
    delete = add("group-delete", cmd_group_delete,
                 "delete a consistency group (its members leave it; their points stay)",
                 "group-delete erp")  # fmt: skip
    delete.add_argument("name")
    tag = add("group-tag", cmd_group_tag,
              "ask the members for a group point now (e.g. before a planned failover); "
              "they take it a few seconds later, once their reports carry the request",
              "group-tag erp")  # fmt: skip
    tag.add_argument("name")


def cmd_groups(ctx: Context, args: argparse.Namespace) -> int:
    records = ctx.records("ListGroups")
    if ctx.json:
        ctx.print(render.to_json(records))
        return CtlExit.OK
    for g in records:
        ctx.print(f"{g['name']}  every {render.fmt_duration(g.get('interval_s'))}  "
                  f"members: {' '.join(g.get('members') or []) or '-'}")  # fmt: skip
        ctx.print(f"  common point: {_point(ctx, g)}")
        last = g.get("last_barrier")
        if isinstance(last, dict):
            outcome = "all frozen" if last.get("ok") else (
                "missed, not frozen: " + ", ".join(last.get("missing") or ["?"])
            )  # fmt: skip
            ctx.print(f"  last barrier: slot {last.get('slot')} {ctx.time(last.get('time'))}: "
                      f"{outcome}")  # fmt: skip
    if ctx.legend:
        ctx.print(f"\n{len(records)} groups listed.")
    return CtlExit.OK


def status_lines(ctx: Context) -> list[str]:
    """`secondsitectl status`'s groups section: each group's newest common point (asked
    of the master targets, as `groups` does) and its last barrier."""
    records = ctx.records("ListGroups")
    if not records:
        return []
    columns = [
        Column("GROUP", render.field("name"), shrink=True, min_width=10),
        Column("MEMBERS", _members, drop=2, shrink=True),
        Column("COMMON POINT", lambda g: _point(ctx, g), shrink=True, min_width=20),
        Column("LAST BARRIER", lambda g: _barrier(ctx, g), drop=1, shrink=True),
    ]
    return ["", "Groups:", *render.table(columns, records, ctx.width)]


def _members(g: Mapping[str, Any]) -> str:
    return " ".join(g.get("members") or []) or "-"


def _barrier(ctx: Context, g: Mapping[str, Any]) -> str:
    last = g.get("last_barrier")
    if not isinstance(last, dict):
        return "-"
    if last.get("ok"):
        return f"all frozen {ctx.time(last.get('time'))}"
    missing = ", ".join(last.get("missing") or ["?"])
    return f"missed {ctx.time(last.get('time'))}, not frozen: {missing}"


def _point(ctx: Context, g: Mapping[str, Any]) -> str:
    point = g.get("point")
    if isinstance(point, dict):
        return f"{point.get('tag')} ({ctx.time(point.get('time'))})"
    return str(g.get("point_error") or "none yet")


def cmd_group_set(ctx: Context, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    if args.add:
        options["add"] = args.add
    if args.remove:
        options["remove"] = args.remove
    if args.interval is not None:
        options["interval_s"] = float(args.interval)
    if overlap := set(args.add) & set(args.remove):
        raise UsageError(f"--add and --remove both name {', '.join(sorted(overlap))}")
    record = ctx.record("SetGroup", args.name, options)
    if ctx.json:
        ctx.print(render.to_json(record))
    else:
        members = " ".join(record.get("members") or []) or "no members"
        ctx.print(f"Group {args.name} set: {members}, every "
                  f"{render.fmt_duration(record.get('interval_s'))}.")  # fmt: skip
    return CtlExit.OK


def cmd_group_delete(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("DeleteGroup", args.name)
    ctx.print(render.to_json({"deleted": args.name}) if ctx.json else f"Group {args.name} deleted.")
    return CtlExit.OK


def cmd_group_tag(ctx: Context, args: argparse.Namespace) -> int:
    record = ctx.record("GroupTag", args.name)
    if ctx.json:
        ctx.print(render.to_json(record))
    else:
        ctx.print(f"Group point {record.get('tag')} asked for {ctx.time(record.get('at'))}.")
    return CtlExit.OK
