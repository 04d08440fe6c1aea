"""Consistency groups: several machines whose recovery points mark one common instant.

A group's members take a GROUP tag together every `interval_s` seconds (at wall-clock
multiples of it) and on demand (`group_tag`, e.g. before a planned plan failover: the
members take it at the announced time `at`). Each member freezes its filesystems,
copies its dirty set, then calls `group_barrier` on this server while still frozen.
The barrier answers every member at once when all have arrived ("ok": each emits the
same tag id `group:<name>:<slot>`, then thaws), or, as soon as one member's wait (what
is left of its freeze bound) passes, "missed" to every member, with an event naming
the members that did not arrive; they then thaw without the group tag.

Why this is a consistent cut without trusting clocks: a member arrives only while
frozen, and tags only if its freeze still held when the answer came (the agent's
capture refuses a point whose freeze overran). So every member carrying the tag was
frozen at the instant the barrier released, and the tags on all members, applied,
reproduce all the disks as they were at that one instant. "Frozen" must hold every
write: an agent with a disk that has no mounted filesystem (a raw device, whose writes
a freeze does not stop) never arrives, and its group misses (`agent.group_tag`).
A restart of this server loses only the slots in progress: their members' waits end on
the lost connections (their own tags), and no agent arrives at a slot twice
(`GroupTagger.next_slot`; short of its clock set back across an agent restart), so two
releases never share a tag id. Clocks only decide WHEN the members try (liveness):
members whose clocks differ by more than the barrier wait miss their slots, each a
"missed" event, never a wrong point.

The group's common point is the newest group tag usable on EVERY member's master target
(a slot released "ok" may still lack a member whose freeze overran: not a point).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.config.api import Record
from appliance.config.errors import InvalidArgument, NotFound
from appliance.config.inventory import Inventory
from appliance.config.model import ComponentKind
from appliance.config.validation import name as _name

log = logging.getLogger(__name__)

PREFIX = "group:"
LATEST_GROUP = "latest-group"
DEFAULT_INTERVAL = 300.0
MIN_INTERVAL = 5.0  # each point costs every member a freeze
MAX_WAIT = 10.0  # a member's barrier wait: far more than any sane freeze bound
REQUEST_LEAD = 3.0  # an on-demand point is taken this long after it is asked for
SLOT_GAP = 15.0  # more than a round lasts: a freeze bound and MAX_WAIT
SLOT_TTL = 600.0  # barrier outcomes are kept this long (late or repeated arrivals)
MAX_GROUP_NAME = 64  # + "group:" + ":" + a slot fits the target's 128-char tag ids


def tag_id(group: str, slot: int) -> str:
    return f"{PREFIX}{group}:{slot}"


def parse_tag(tag: str) -> tuple[str, int] | None:
    """(group, slot) of a group tag id, None for any other tag."""
    if not tag.startswith(PREFIX):
        return None
    group, _, slot = tag[len(PREFIX) :].rpartition(":")
    return (group, int(slot)) if group and slot.isdigit() else None


def clear_of_slots(at: int, interval: float) -> int:
    """An on-demand slot at least SLOT_GAP from the interval's slots (or one of them):
    a member still busy with one round when the next is due skips that one, so two
    slots closer than a round lasts would each miss some members."""
    k = at // interval
    before, after = int(k * interval), int((k + 1) * interval)
    if at == before or at - before >= SLOT_GAP <= after - at:
        return at  # an interval slot itself, or clear of both
    if after - at < SLOT_GAP or interval < 2 * SLOT_GAP:
        return after  # the interval's own slot serves
    return before + int(SLOT_GAP)  # right after `before`: a little later


def common_point(group: str, points: dict[str, list[Record]]) -> Record | None:
    """The newest group tag of `group` usable on every member (`points`: member ->
    the master target's `points` answer), or None. Its time is the latest member's."""
    if not points:
        return None
    shared: set[int] | None = None
    times: dict[int, list[float]] = {}
    for entries in points.values():
        slots = set()
        for p in entries:
            parsed = parse_tag(str(p.get("tag_id", "")))
            if parsed and parsed[0] == group and p.get("usable"):
                slots.add(parsed[1])
                times.setdefault(parsed[1], []).append(int(p["time_ns"]) / 1e9)
        shared = slots if shared is None else shared & slots
    if not shared:
        return None
    slot = max(shared)
    return {"tag": tag_id(group, slot), "slot": slot, "time": max(times[slot])}


@dataclass
class _Slot:
    members: frozenset[str]
    created: float
    arrived: set[str] = field(default_factory=set)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: str | None = None  # "ok", or why the slot was missed


class Barriers:
    """The in-memory rendezvous of the members' frozen arrivals (nothing to persist:
    after a restart the agents waiting on the lost connections simply thaw)."""

    def __init__(self, on_missed: Callable[[str, int, list[str]], None]) -> None:
        self._slots: dict[tuple[str, int], _Slot] = {}
        self._on_missed = on_missed
        self.last: dict[str, Record] = {}  # group -> its newest barrier outcome

    async def arrive(
        self, group: str, slot: int, member: str, members: Iterable[str], wait: float
    ) -> Record:
        """`member` is frozen for `slot`; answers when everyone is, or after `wait` s."""
        now = time.monotonic()
        for key in [k for k, s in self._slots.items() if now - s.created > SLOT_TTL]:
            del self._slots[key]
        entry = self._slots.get((group, slot))
        if entry is None:
            entry = self._slots[(group, slot)] = _Slot(frozenset(members), now)
        if member not in entry.members:
            raise InvalidArgument(f"{member} is not a member of group {group}")
        if entry.outcome is not None or member in entry.arrived:
            # Released already (this member's freeze is not the one that was waited
            # for), or a repeated arrival: never a point.
            return {"ok": False, "reason": f"slot {slot} of {group} is over"}
        entry.arrived.add(member)
        if entry.arrived == entry.members:
            self._release(group, slot, entry, "ok")
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.released.wait(), max(0.0, wait))
            if entry.outcome is None:  # this member's freeze bound is up: nobody tags
                self._release(group, slot, entry, "missed")
        if entry.outcome == "ok":
            return {"ok": True, "tag": tag_id(group, slot)}
        return {"ok": False, "reason": entry.outcome}

    def _release(self, group: str, slot: int, entry: _Slot, outcome: str) -> None:
        missing = sorted(entry.members - entry.arrived)
        entry.outcome = "ok" if outcome == "ok" else f"missed: {', '.join(missing)} not frozen"
        entry.released.set()
        self.last[group] = {"slot": slot, "ok": outcome == "ok", "missing": missing,
                            "time": time.time()}  # fmt: skip
        if outcome != "ok":
            self._on_missed(group, slot, missing)


class GroupApi(Protocol):
    """What the D-Bus front end calls (the `ConfigService` methods below)."""

    async def groups(self) -> list[Record]: ...
    async def set_group(self, name: str, options: Record) -> Record: ...
    async def delete_group(self, name: str) -> None: ...
    async def group_tag(self, name: str) -> Record: ...


class GroupEntryPoints:
    """Mixin of `ConfigService`: the groups API, the barrier and the answers' part.
    Needs from its host class: the inventory, the clock and `points(machine)`."""

    inventory: Inventory
    _clock: Callable[[], float]
    points: Callable[[str], Awaitable[list[Record]]]

    @functools.cached_property
    def _barriers(self) -> Barriers:
        return Barriers(self._missed)

    @functools.cached_property
    def _group_requests(self) -> dict[str, int]:
        return {}  # group -> the announced time of its on-demand point (memory only)

    def _missed(self, group: str, slot: int, missing: list[str]) -> None:
        who = ", ".join(missing) or "a member whose freeze bound ran out"
        self.inventory.add_event(
            "warning", group, "group-point-missed",
            f"group point {slot} of {group} not taken: {who} did not arrive frozen in time",
            self._clock(),
        )  # fmt: skip

    def _members(self, group: str) -> list[str]:
        return [m["name"] for m in self.inventory.machines() if m.get("group_name") == group]

    def _group_row(self, name: str) -> Record:
        for g in self.inventory.groups():
            if g["name"] == name:
                return g
        raise NotFound(f"no group named {name!r}")

    # -- operator API ----------------------------------------------------------------

    async def groups(self) -> list[Record]:
        """Every group with its members, newest common point (asked of the master
        targets) and newest barrier outcome."""
        out = []
        for g in self.inventory.groups():
            members = self._members(g["name"])
            rec: Record = {"name": g["name"], "interval_s": _interval(g), "members": members}
            try:
                rec["point"] = await self.group_point(g["name"])
            except InvalidArgument as exc:
                rec["point_error"] = exc.message
            if (last := self._barriers.last.get(g["name"])) is not None:
                rec["last_barrier"] = last
            out.append(rec)
        return out

    async def set_group(self, name: str, options: Record) -> Record:
        """Create or change a group: {"add": [machines], "remove": [...], "interval_s"}."""
        _name(name, "group")
        if ":" in name or len(name) > MAX_GROUP_NAME:
            raise InvalidArgument(
                f"a group name has at most {MAX_GROUP_NAME} characters and no ':' "
                "(it is part of the tag ids, at most 128 characters)"
            )
        unknown = set(options) - {"add", "remove", "interval_s"}
        if unknown:
            raise InvalidArgument(f"unknown options: {', '.join(sorted(unknown))}")
        add, remove = _names(options.get("add"), "add"), _names(options.get("remove"), "remove")
        interval = options.get("interval_s")
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int | float)
            or not MIN_INTERVAL <= interval <= 86400
        ):  # fmt: skip
            raise InvalidArgument(f"interval_s must be {MIN_INTERVAL:g} to 86400 seconds")
        with self.inventory.transaction():
            exists = any(g["name"] == name for g in self.inventory.groups())
            if not exists:
                self.inventory.set_group(name)
            if interval is not None or not exists:
                self.inventory.set_group_interval(name, float(interval or DEFAULT_INTERVAL))
            for machine in add:
                current = self.inventory.machine(machine).get("group_name")
                if current not in (None, name):
                    raise InvalidArgument(f"{machine} is already in group {current}")
                self.inventory.update_machine(machine, group_name=name)
            for machine in remove:
                if self.inventory.machine(machine).get("group_name") != name:
                    raise InvalidArgument(f"{machine} is not in group {name}")
                self.inventory.update_machine(machine, group_name=None)
        return {"name": name, "interval_s": _interval(self._group_row(name)),
                "members": self._members(name)}  # fmt: skip

    async def delete_group(self, name: str) -> None:
        self.inventory.delete_group(_name(name, "group"))
        self._group_requests.pop(name, None)

    async def group_tag(self, name: str) -> Record:
        """Ask the members for a group point now; they take it at `at` (Unix seconds),
        once their next reports have carried the request. Returns the tag it will be."""
        self._group_row(_name(name, "group"))
        if not self._members(name):
            raise InvalidArgument(f"group {name} has no members")
        now = self._clock()
        pending = self._group_requests.get(name)
        if pending is not None and pending > now:
            # Still to come, and after this request: the same point serves both. A new
            # time would replace it in the answers, and its asker would wait in vain.
            return {"group": name, "tag": tag_id(name, pending), "at": pending}
        at = int(now + REQUEST_LEAD + 2 * self._report_interval())
        at = clear_of_slots(at, _interval(self._group_row(name)))
        self._group_requests[name] = at
        return {"group": name, "tag": tag_id(name, at), "at": at}

    async def group_point(self, name: str) -> Record | None:
        """The newest common point of group `name` (None: there is none yet)."""
        members = self._members(name)
        if not members:
            return None
        points = {}
        for m in members:
            raw = await self.points(m)
            points[m] = [{"tag_id": p["tag"], "time_ns": int(p["time"] * 1e9),
                          "usable": p["usable"]} for p in raw]  # fmt: skip
        return common_point(name, points)

    def _report_interval(self) -> float:
        settings = getattr(self, "settings", None)
        return float(getattr(settings, "report_interval", 10.0))

    # -- the plans' point --------------------------------------------------------------

    async def plan_group_point(self, machines: list[str], point: Any) -> Any:
        """A plan's point: `latest-group` (the default when the plan's machines are all
        in one group) becomes that group's newest common point, as its tag id."""
        groups = {self.inventory.machine(m).get("group_name") for m in machines}
        one = next(iter(groups)) if len(groups) == 1 and None not in groups else None
        if point not in ("", None, LATEST_GROUP) or (point in ("", None) and one is None):
            return point or "latest"
        if one is None:
            raise InvalidArgument(
                "latest-group needs the plan's machines to be in one consistency group "
                "(secondsitectl group-set)"
            )
        found = await self.group_point(one)
        if found is None:
            raise InvalidArgument(
                f"group {one} has no common recovery point yet (a group point on every "
                f"member); take one with 'secondsitectl group-tag {one}', or give --point"
            )
        return found["tag"]

    async def fresh_group_point(self, point: str) -> Record:
        """For a planned failover to `point` (a group's tag id): ask the members for a
        new group point and have the plan job wait for it ({"point", "await_point"});
        `point` unchanged if it is not a group's."""
        parsed = parse_tag(point)
        if parsed is None:
            return {}
        asked = await self.group_tag(parsed[0])
        return {"point": asked["tag"], "await_point": True}

    async def lacking_point(self, machines: list[str], tag: str) -> list[str]:
        """Which of `machines` do not (yet) have the usable point `tag`."""
        lacking = []
        for m in machines:
            if not any(p["tag"] == tag and p["usable"] for p in await self.points(m)):
                lacking.append(m)
        return lacking

    # -- the agents' side ----------------------------------------------------------------

    async def group_barrier(self, member: str, kind: ComponentKind, params: Record) -> Record:
        """An agent, frozen, waits here for the other members of its group."""
        if kind is not ComponentKind.AGENT:
            raise InvalidArgument("only agents take group points")
        group, slot, wait = params.get("group"), params.get("slot"), params.get("wait", 0)
        if not isinstance(group, str) or not isinstance(slot, int) or isinstance(slot, bool):
            raise InvalidArgument("group_barrier needs a group name and an integer slot")
        if slot < 0:  # its tag id would not parse as a group's (parse_tag)
            raise InvalidArgument(f"slot {slot} is negative: it is a time in Unix seconds")
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
            raise InvalidArgument("wait must be a non-negative number of seconds")
        members = self._members(group)
        if member not in members:
            raise InvalidArgument(f"{member} is not a member of group {group}")
        return await self._barriers.arrive(group, slot, member, members, min(wait, MAX_WAIT))

    def group_answer(self, machine: Record) -> Record | None:
        """The answer's "group" part: what the member needs to take its group points."""
        name = machine.get("group_name")
        if not name:
            return None
        try:
            row = self._group_row(name)
        except NotFound:
            return None
        answer: Record = {"name": name, "interval_s": _interval(row)}
        if (at := self._group_requests.get(name)) is not None and at > self._clock() - 60:
            answer["request_at"] = at
        return answer

    def group_status(self) -> list[Record]:
        return [
            {"name": g["name"], "members": self._members(g["name"]),
             "last_barrier": self._barriers.last.get(g["name"])}
            for g in self.inventory.groups()
        ]  # fmt: skip


def _interval(row: Record) -> float:
    value = row.get("interval_s")
    return float(value) if isinstance(value, int | float) else DEFAULT_INTERVAL


def _names(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidArgument(f"{what} must be a list of machine names")
    return list(value)
