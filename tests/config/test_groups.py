"""Consistency groups on the configuration server: the API, the answers, the barrier
(real asyncio tasks for the members) and the common point.

The end-to-end proof with real agents on loop devices is tests/integration/test_groups.py.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import groups, plans
from appliance.config.errors import Conflict, InvalidArgument, NotFound
from appliance.config.inventory import Inventory
from appliance.config.jobs import JobEngine
from appliance.config.model import ComponentKind, JobKind, JobState
from appliance.config.passphrase import PassphraseStore
from appliance.config.plans import PlanSpec
from appliance.config.service import ConfigService, ServiceSettings
from appliance.ctl.commands import Context, cmd_status


def point(tag: str, t: float, usable: bool = True) -> dict[str, Any]:
    return {"tag_id": tag, "time_ns": int(t * 1e9), "usable": usable}


def test_group_tag_ids_round_trip() -> None:
    assert groups.tag_id("erp", 1700000100) == "group:erp:1700000100"
    assert groups.parse_tag("group:erp:1700000100") == ("erp", 1700000100)
    assert groups.parse_tag("group:a:b:7") == ("a:b", 7)
    for other in ("3f2a9c", "group:erp:", "group::5", "group:erp:x1"):
        assert groups.parse_tag(other) is None


def test_the_common_point_is_the_newest_group_tag_on_every_member() -> None:
    g = groups.tag_id
    points = {
        "db1": [point(g("erp", 100), 100.1), point(g("erp", 200), 200.1), point("abc", 250)],
        "app1": [point(g("erp", 100), 100.2), point(g("erp", 200), 200.3, usable=False)],
        "web1": [point(g("erp", 100), 100.3), point(g("erp", 200), 200.2), point(g("x", 300), 1)],
    }
    # Slot 200 is unusable on app1, so 100 is the newest point all three share.
    assert groups.common_point("erp", points) == {"tag": g("erp", 100), "slot": 100,
                                                   "time": 100.3}  # fmt: skip
    points["app1"][1]["usable"] = True
    assert groups.common_point("erp", points)["slot"] == 200  # type: ignore[index]
    points["web1"] = [point("plain", 5)]
    assert groups.common_point("erp", points) is None
    assert groups.common_point("erp", {}) is None


def test_the_barrier_releases_all_members_with_one_tag() -> None:
    missed: list[tuple[str, int, list[str]]] = []

    async def scenario() -> list[dict[str, Any]]:
        barriers = groups.Barriers(lambda *a: missed.append(a))
        members = ["db1", "app1", "web1"]
        return list(await asyncio.gather(
            *(barriers.arrive("erp", 60, m, members, 5.0) for m in members)
        ))  # fmt: skip

    answers = asyncio.run(scenario())
    assert answers == [{"ok": True, "tag": "group:erp:60"}] * 3
    assert missed == []


def test_a_missing_member_times_the_barrier_out_for_everyone() -> None:
    missed: list[tuple[str, int, list[str]]] = []

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any], groups.Barriers]:
        barriers = groups.Barriers(lambda *a: missed.append(a))
        members = ["db1", "app1", "web1"]
        # db1 may wait 0.2 s, app1 5 s: db1's bound ending releases app1 at once.
        first = await asyncio.gather(barriers.arrive("erp", 60, "db1", members, 0.2),
                                     barriers.arrive("erp", 60, "app1", members, 5.0))  # fmt: skip
        late = await barriers.arrive("erp", 60, "web1", members, 5.0)
        return list(first), late, barriers

    answers, late, barriers = asyncio.run(scenario())
    assert [a["ok"] for a in answers] == [False, False]
    assert "web1 not frozen" in answers[0]["reason"]
    assert late == {"ok": False, "reason": "slot 60 of erp is over"}  # a late one never tags
    assert missed == [("erp", 60, ["web1"])]
    assert barriers.last["erp"]["missing"] == ["web1"] and not barriers.last["erp"]["ok"]


def test_a_repeated_arrival_or_a_stranger_is_refused() -> None:
    async def scenario() -> dict[str, Any]:
        barriers = groups.Barriers(lambda *a: None)
        with pytest.raises(InvalidArgument, match="not a member"):
            await barriers.arrive("erp", 1, "mallory", ["db1"], 1)
        await barriers.arrive("erp", 2, "db1", ["db1"], 1)
        return await barriers.arrive("erp", 2, "db1", ["db1"], 1)

    assert asyncio.run(scenario())["ok"] is False


# -- through the service ----------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Any:
    inv = Inventory.open(tmp_path / "inv.db")
    clock = [1_000_000.0]
    svc = ConfigService(inv, PassphraseStore(tmp_path / "pp.json"),
                        ServiceSettings(report_interval=1), clock=lambda: clock[0])  # fmt: skip
    for name in ("db1", "app1", "web1"):
        inv.add_machine(name, name, now=clock[0])
    yield svc
    inv.close()


def test_groups_are_created_changed_and_deleted(service: ConfigService) -> None:
    async def scenario() -> None:
        made = await service.set_group("erp", {"add": ["db1", "app1"], "interval_s": 60})
        assert made == {"name": "erp", "interval_s": 60.0, "members": ["app1", "db1"]}
        assert (await service.set_group("erp", {"remove": ["app1"]}))["members"] == ["db1"]
        assert (await service.set_group("erp", {}))["interval_s"] == 60.0  # kept
        await service.set_group("web", {"add": ["web1"]})
        assert (await service.set_group("web", {}))["interval_s"] == groups.DEFAULT_INTERVAL
        bad: list[tuple[str, dict[str, Any], str]] = [
            ("erp", {"add": ["web1"]}, "already in group web"),
            ("erp", {"remove": ["web1"]}, "not in group erp"),
            ("erp", {"add": ["ghost"]}, "no machine named 'ghost'"),
            ("erp", {"interval_s": 1}, "5 to 86400"),
            ("erp", {"interval_s": True}, "5 to 86400"),
            ("erp", {"add": "db1"}, "list of machine names"),
            ("erp", {"colour": 1}, "unknown options: colour"),
            ("a:b", {}, "no ':'"),
            ("x" * 65, {}, "at most 64"),
        ]
        for name, options, needle in bad:
            with pytest.raises((InvalidArgument, NotFound), match=needle):
                await service.set_group(name, options)
        assert (await service.set_group("erp", {}))["members"] == ["db1"]  # nothing half-done
        await service.delete_group("web")
        assert service.inventory.machine("web1")["group_name"] is None
        with pytest.raises(NotFound, match="no group named 'web'"):
            await service.delete_group("web")

    asyncio.run(scenario())


def test_members_learn_their_group_and_on_demand_points(service: ConfigService) -> None:
    async def scenario() -> None:
        await service.set_group("erp", {"add": ["db1", "app1"], "interval_s": 60})
        answer = service.report("db1", ComponentKind.AGENT, {"disks": []})
        assert answer["group"] == {"name": "erp", "interval_s": 60.0}
        assert "group" not in service.report("web1", ComponentKind.AGENT, {"disks": []})
        asked = await service.group_tag("erp")
        assert asked["tag"] == groups.tag_id("erp", asked["at"]) and asked["at"] > 1_000_000
        answer = service.report("app1", ComponentKind.AGENT, {"disks": []})
        assert answer["group"]["request_at"] == asked["at"]

    asyncio.run(scenario())


def test_the_barrier_through_the_service_and_the_missed_event(service: ConfigService) -> None:
    async def scenario() -> None:
        await service.set_group("erp", {"add": ["db1", "app1"]})
        params: dict[str, Any] = {"group": "erp", "slot": 300, "wait": 2.0}
        both = await asyncio.gather(
            service.group_barrier("db1", ComponentKind.AGENT, params),
            service.group_barrier("app1", ComponentKind.AGENT, params),
        )
        assert list(both) == [{"ok": True, "tag": "group:erp:300"}] * 2
        alone = await service.group_barrier("db1", ComponentKind.AGENT,
                                            {"group": "erp", "slot": 600, "wait": 0.1})  # fmt: skip
        assert not alone["ok"] and "app1" in alone["reason"]
        cases: list[tuple[str, ComponentKind, dict[str, Any], str]] = [
            ("web1", ComponentKind.AGENT, params, "web1 is not a member"),
            ("db1", ComponentKind.TARGET, params, "only agents"),
            ("db1", ComponentKind.AGENT, {"group": "erp", "slot": "9"}, "integer slot"),
            ("db1", ComponentKind.AGENT, {"group": "erp", "slot": -60}, "slot -60 is negative"),
            ("db1", ComponentKind.AGENT, params | {"wait": -1}, "non-negative"),
        ]
        for who, kind, p, needle in cases:
            with pytest.raises(InvalidArgument, match=needle):
                await service.group_barrier(who, kind, p)
        events = [e for e in service.inventory.events(20) if e["kind"] == "group-point-missed"]
        assert len(events) == 1 and "app1" in events[0]["message"]
        (status,) = (await service.status())["groups"]
        assert status["members"] == ["app1", "db1"] and status["last_barrier"]["slot"] == 600

    asyncio.run(scenario())


def test_a_plan_of_one_group_resolves_to_its_common_point(
    service: ConfigService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The master target's answers (the real one is in the integration test).
    answers: dict[str, list[dict[str, Any]]] = {"db1": [], "app1": []}

    async def points(machine: str) -> list[dict[str, Any]]:
        return [{"tag": p["tag_id"], "time": p["time_ns"] / 1e9, "usable": p["usable"]}
                for p in answers.get(machine, [])]  # fmt: skip

    monkeypatch.setattr(service, "points", points)

    async def scenario() -> None:
        await service.set_group("erp", {"add": ["db1", "app1"]})
        with pytest.raises(InvalidArgument, match="group erp has no common recovery point"):
            await service.plan_group_point(["db1", "app1"], "")
        answers["db1"] = [point("group:erp:100", 100), point("group:erp:200", 200)]
        answers["app1"] = [point("group:erp:100", 100)]
        assert await service.plan_group_point(["db1", "app1"], "") == "group:erp:100"
        assert await service.plan_group_point(["db1", "app1"], "latest-group") == "group:erp:100"
        assert await service.plan_group_point(["db1", "app1"], "latest") == "latest"
        assert await service.plan_group_point(["db1", "web1"], "") == "latest"  # not one group
        with pytest.raises(InvalidArgument, match="in one consistency group"):
            await service.plan_group_point(["db1", "web1"], "latest-group")

    asyncio.run(scenario())


def test_requests_for_a_point_while_one_is_pending_share_it(service: ConfigService) -> None:
    clock = service._clock  # the fixture's: a list's first item, advanced by hand

    async def scenario() -> None:
        await service.set_group("erp", {"add": ["db1", "app1"]})
        first = await service.group_tag("erp")
        # A second asker (say a planned failover) a second later: replacing the time in
        # the answers would leave the first waiting for a point nobody takes.
        service._clock = lambda: clock() + 1
        assert await service.group_tag("erp") == first
        answer = service.report("db1", ComponentKind.AGENT, {"disks": []})
        assert answer["group"]["request_at"] == first["at"]
        service._clock = lambda: first["at"] + 1.0  # taken: the next request is a new one
        later = await service.group_tag("erp")
        assert later["at"] > first["at"]

    asyncio.run(scenario())


def test_an_on_demand_point_keeps_clear_of_the_interval_slots(service: ConfigService) -> None:
    # A member still in one round when the next slot is due skips it: slots closer than
    # a round lasts would each miss someone (and a planned failover wait in vain).
    gap = int(groups.SLOT_GAP)
    cases = [(1150, 300, 1150), (1200 - gap + 1, 300, 1200), (1200, 300, 1200),
             (1201, 300, 1200 + gap), (1002, 5, 1005), (1003, 7.5, 1005),
             (1007, 20, 1020)]  # fmt: skip
    for at, interval, expected in cases:
        assert groups.clear_of_slots(at, interval) == expected, (at, interval)

    async def scenario() -> int:
        await service.set_group("erp", {"add": ["db1", "app1"], "interval_s": 300})
        lead = groups.REQUEST_LEAD + 2 * 1  # the fixture's report interval
        service._clock = lambda: 1_200_000 - 5 - lead  # asked 5 s before a slot's time
        return int((await service.group_tag("erp"))["at"])

    assert asyncio.run(scenario()) == 1_200_000  # that slot itself


def test_a_planned_failover_asks_for_a_fresh_group_point(service: ConfigService) -> None:
    async def scenario() -> None:
        await service.set_group("erp", {"add": ["db1", "app1"]})
        fresh = await service.fresh_group_point("group:erp:100")
        assert fresh["await_point"] is True and fresh["point"].startswith("group:erp:")
        at = groups.parse_tag(fresh["point"])[1]  # type: ignore[index]
        assert (
            service.report("db1", ComponentKind.AGENT, {"disks": []})["group"]["request_at"] == at
        )
        assert await service.fresh_group_point("latest") == {}

    asyncio.run(scenario())


@pytest.mark.parametrize("lands", [True, False])
def test_the_plan_job_waits_for_the_group_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lands: bool
) -> None:
    monkeypatch.setattr(plans, "GROUP_POINT_TIMEOUT", 60.0 if lands else 0.3)
    asked: list[tuple[list[str], str]] = []

    async def lacking(machines: list[str], tag: str) -> list[str]:  # the targets' answer
        asked.append((machines, tag))
        return [] if lands and len(asked) > 2 else ["app1"]

    def submit(kind: JobKind, machine: str, params: dict[str, Any]) -> str:
        raise Conflict(f"{machine} has a job running")  # past the wait: enough

    with Inventory.open(tmp_path / "inv.db") as inv:
        for name in ("db1", "app1"):
            inv.add_machine(name, name, now=1.0)
        spec = PlanSpec.parse({"groups": [{"machines": ["db1", "app1"]}]}, {"db1", "app1"})

        async def run() -> dict[str, Any]:
            engine = JobEngine(inv, plans.definitions(submit, lacking), lambda s: None,
                               time.time, poll=0.05)  # fmt: skip
            try:
                job = engine.submit(JobKind.PLAN_FAILOVER, plans.subject("erp"), {
                    "plan": "erp", "spec": spec.record(), "point": "group:erp:500",
                    "mode": "planned", "await_point": True})  # fmt: skip
                async with asyncio.timeout(30):
                    while inv.job(job)["finished_at"] is None:
                        await asyncio.sleep(0.05)
                return inv.job(job)
            finally:
                await engine.close()

        job = asyncio.run(run())
    assert job["state"] == JobState.FAILED
    assert asked[0] == (["db1", "app1"], "group:erp:500")
    if lands:
        assert job["step"] == "group-1" and "db1 has a job running" in job["error"]
    else:
        assert job["step"] == "group-point"
        assert job["error"].startswith("the group point group:erp:500 did not reach app1")


# -- the inventory's part ----------------------------------------------------------------


def test_the_inventory_sets_a_groups_interval_and_deletes_it(tmp_path: Path) -> None:
    with Inventory.open(tmp_path / "inv.db") as inv:
        inv.add_machine("db1", "db1", now=1.0)
        inv.set_group("erp")
        assert inv.groups()[0]["interval_s"] == groups.DEFAULT_INTERVAL  # the column's default
        inv.set_group_interval("erp", 60)
        assert inv.groups()[0]["interval_s"] == 60.0
        for bad in (0, -5, True, "60", float("nan")):
            with pytest.raises(InvalidArgument, match="group interval"):
                inv.set_group_interval("erp", bad)  # type: ignore[arg-type]
        with pytest.raises(NotFound, match="no group named 'web'"):
            inv.set_group_interval("web", 60)
        inv.update_machine("db1", group_name="erp")
        inv.delete_group("erp")  # with a member: it leaves (the reference is not left dangling)
        assert inv.groups() == [] and inv.machine("db1")["group_name"] is None
        with pytest.raises(NotFound, match="no group named 'erp'"):
            inv.delete_group("erp")


# -- secondsitectl status -----------------------------------------------------------------


class InProcessClient:
    """secondsitectl's client answered by the real service in this process (the D-Bus
    layer in between is tested in test_dbus_service.py)."""

    def __init__(self, service: ConfigService, loop: asyncio.AbstractEventLoop) -> None:
        self.service, self.loop = service, loop
        self.calls: list[str] = []

    def call(self, method: str, *args: Any) -> Any:
        self.calls.append(method)
        methods = {"Status": self.service.status, "ListGroups": self.service.groups,
                   "ListMachines": self.service.machines}  # fmt: skip
        return self.loop.run_until_complete(methods[method](*args))

    def properties(self) -> dict[str, Any]:
        return {}


def test_status_shows_the_groups_and_their_common_point(
    service: ConfigService, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {"db1": [point("group:erp:100", 100), point("group:erp:200", 200)],
               "app1": [point("group:erp:100", 100.5)]}  # fmt: skip

    async def points(machine: str) -> list[dict[str, Any]]:  # the master targets' answers
        return [{"tag": p["tag_id"], "time": p["time_ns"] / 1e9, "usable": p["usable"]}
                for p in answers.get(machine, [])]  # fmt: skip

    monkeypatch.setattr(service, "points", points)
    loop = asyncio.new_event_loop()
    try:
        client = InProcessClient(service, loop)
        ctx = Context(lambda bus: client, None, io.StringIO(), width=200, now=lambda: 1_000_000.0)

        def status() -> str:
            ctx.out = io.StringIO()
            assert cmd_status(ctx, argparse.Namespace()) == 0
            return ctx.out.getvalue()

        assert "Groups:" not in status() and "ListGroups" not in client.calls  # none yet
        loop.run_until_complete(service.set_group("erp", {"add": ["db1", "app1"]}))
        loop.run_until_complete(service.set_group("web", {"add": ["web1"]}))
        loop.run_until_complete(service.group_barrier(
            "db1", ComponentKind.AGENT, {"group": "erp", "slot": 300, "wait": 0.05}))  # fmt: skip
        out = status()
    finally:
        loop.close()
    lines = out[out.index("Groups:") :].splitlines()
    assert lines[1].split() == ["GROUP", "MEMBERS", "COMMON", "POINT", "LAST", "BARRIER"]
    erp, web = lines[2], lines[3]
    assert erp.startswith("erp ") and "app1 db1" in erp
    assert "group:erp:100" in erp  # the newest slot BOTH members have
    assert "missed" in erp and erp.rstrip().endswith("app1")
    assert web.startswith("web ") and "none yet" in web
