"""Recovery plans: spec validation, and plan jobs over real per-machine failover jobs.

The integration tests reuse test_failover's site (a real targetd on vcsim's datastore,
replicas streamed by the test) and run plan jobs and their children in one real
JobEngine, so a plan's test failover creates real VMs in vcsim, group by group.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import failover, plans
from appliance.config.errors import InvalidArgument
from appliance.config.inventory import Inventory
from appliance.config.jobs import JobEngine
from appliance.config.model import JobKind, JobState
from appliance.config.plans import PlanSpec, plan_point
from appliance.vsphere.inventory import PowerState, discover
from appliance.vsphere.vms import find_vms
from tests.config import test_failover
from tests.config.test_failover import Env, feed, finished, resumed, session_for, snapshot
from tests.conftest import TlsMaterial

site = test_failover.site  # the fixtures, shared
env = test_failover.env

# -- unit: the spec and the point -------------------------------------------------------

KNOWN = {"web1", "db1", "app1"}


def test_a_valid_spec_is_normalised() -> None:
    raw = {"groups": [{"machines": ["db1"], "wait_s": 30, "pre": "true"}, {"machines": ["web1"]}]}
    assert PlanSpec.parse(raw, KNOWN).record() == {
        "groups": [
            {"machines": ["db1"], "wait_s": 30.0, "pre": "true"},
            {"machines": ["web1"], "wait_s": 0.0},
        ]
    }


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"groups": []}, "between 1 and 32"),
        ({"groups": [{"machines": [f"m{i}"]} for i in range(33)]}, "between 1 and 32"),
        ({"groups": [{"machines": ["ghost"]}]}, "'ghost' is not a known machine"),
        ({"groups": [{"machines": ["db1"]}, {"machines": ["db1"]}]}, "in group 1 and group 2"),
        ({"groups": [{"machines": ["db1"], "wait_s": -1}]}, "non-negative"),
        ({"groups": [{"machines": ["db1"], "wait_s": True}]}, "non-negative"),
        ({"groups": [{"machines": []}]}, "non-empty list"),
        ({"groups": [{"machines": ["db1"], "boot": 1}]}, "keys are"),
        ({"groups": [{"machines": ["db1"], "pre": 3}]}, "pre must be a command"),
        ({"groups": [], "colour": "red"}, "a plan spec is"),
    ],
)
def test_a_bad_spec_says_what_is_wrong(raw: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        PlanSpec.parse(raw, KNOWN | {f"m{i}" for i in range(33)})


def test_plan_point_is_latest_or_a_time() -> None:
    assert plan_point("") == plan_point("latest") == "latest"
    assert plan_point("1700000000.5") == 1700000000.5
    assert plan_point("1970-01-01T00:00:15") == 15.0
    assert plan_point("1970-01-01T01:00:15+01:00") == 15.0
    with pytest.raises(InvalidArgument, match=r"or ISO 8601\), not 'p2'"):
        plan_point("p2")  # a tag is one machine's; a plan names a time


# -- jobs -------------------------------------------------------------------------------


def make_engine(inv: Inventory, ops: failover.FailoverOps | None) -> JobEngine:
    engines: list[JobEngine] = []

    def submit(kind: JobKind, machine: str, params: dict[str, Any]) -> str:
        assert ops is not None, "no child job was expected"
        return engines[0].submit(kind, machine, params)

    defs = plans.definitions(submit)
    if ops is not None:
        defs |= failover.definitions(ops)
    engine = JobEngine(inv, defs, lambda signal: None, time.time, poll=0.05)
    engines.append(engine)
    return engine


def start(engine: JobEngine, inv: Inventory, kind: JobKind, name: str, **params: Any) -> str:
    """As ConfigService does: the stored spec is copied into the job."""
    spec = inv.plan(name)["spec"]
    return engine.submit(kind, plans.subject(name), {"plan": name, "spec": spec, **params})


def children(inv: Inventory, plan_job: str) -> list[dict[str, Any]]:
    return [j for j in inv.jobs(True) if (j["params"] or {}).get("plan_job") == plan_job]


def test_a_failing_pre_command_fails_the_plan_with_its_stderr(tmp_path: Path) -> None:
    with Inventory.open(tmp_path / "inv.db") as inv:
        inv.add_machine("db1", "db1", now=1.0)
        pre = "echo start; echo 'db1 is not ready' >&2; exit 3"
        spec = {"groups": [{"machines": ["db1"], "pre": pre}]}
        inv.set_plan("erp", PlanSpec.parse(spec, {"db1"}).record())

        async def run() -> dict[str, Any]:
            engine = make_engine(inv, None)
            try:
                return await finished(inv, start(engine, inv, JobKind.PLAN_FAILOVER, "erp"))
            finally:
                await engine.close()

        job = asyncio.run(run())
    assert job["state"] == JobState.FAILED and job["step"] == "pre-1"
    assert job["error"] == "the pre command of group 1 exited with 3: db1 is not ready"


def two_machine_plan(env: Env, tls: TlsMaterial, prefix: str, log: Path, wait_s: float) -> None:
    """Group 1: PREFIX-db, then group 2: PREFIX-web (names differ per test: a replica's
    stream to the module's target cannot start over)."""
    db, web = f"{prefix}-db", f"{prefix}-web"
    for machine in (db, web):
        feed(env.site, tls, machine)
        env.machine(machine)
    echo = "echo {} $SECONDSITE_MACHINES >> " + str(log)
    spec = {
        "groups": [
            {"machines": [db], "wait_s": wait_s, "post": echo.format("post-1")},
            {"machines": [web], "pre": echo.format("pre-2")},
        ]
    }
    env.inv.set_plan("erp", PlanSpec.parse(spec, {db, web}).record())


@pytest.mark.integration
def test_plan_test_failover_boots_groups_in_order_then_cleanup(
    env: Env, tls: TlsMaterial, tmp_path: Path
) -> None:
    log = tmp_path / "order.log"
    two_machine_plan(env, tls, "plan", log, wait_s=0.5)
    before = snapshot(env.site)

    async def run(kind: JobKind, **params: Any) -> dict[str, Any]:
        env.ops.loop = asyncio.get_running_loop()
        engine = make_engine(env.inv, env.ops)
        try:
            return await finished(env.inv, start(engine, env.inv, kind, "erp", **params))
        finally:
            await engine.close()

    job = asyncio.run(run(JobKind.PLAN_TEST_FAILOVER, point="latest"))
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    db, web = sorted(children(env.inv, job["id"]), key=lambda j: j["created_at"])
    assert (db["subject"], web["subject"]) == ("plan-db", "plan-web")
    assert {db["kind"], web["kind"]} == {JobKind.TEST_FAILOVER}
    assert web["created_at"] - db["finished_at"] >= 0.5  # group 2 after group 1 and its wait
    assert job["result"]["children"] == {"1": {"plan-db": db["id"]}, "2": {"plan-web": web["id"]}}
    assert log.read_text() == "post-1 plan-db\npre-2 plan-web\n"
    with session_for(env.site) as session:
        inv = discover(session)
    for machine in ("plan-db", "plan-web"):
        assert inv.vm(f"{machine}-test").power_state is PowerState.ON

    cleanup = asyncio.run(run(JobKind.PLAN_CLEANUP))
    assert cleanup["state"] == JobState.SUCCEEDED, cleanup["error"]
    assert [j["kind"] for j in children(env.inv, cleanup["id"])] == [JobKind.CLEANUP] * 2
    assert snapshot(env.site) == before
    assert log.read_text().count("\n") == 2  # cleanup runs no pre/post commands

    failed = asyncio.run(run(JobKind.PLAN_TEST_FAILOVER, point=5.0))  # before every point
    assert failed["state"] == JobState.FAILED and failed["step"] == "group-1"
    assert failed["error"].startswith("plan-db (test-failover job ")
    assert "no usable recovery point at or before 5.0" in failed["error"]
    assert snapshot(env.site) == before


@pytest.mark.integration
def test_a_restart_during_group_2_submits_no_child_twice(
    env: Env, tls: TlsMaterial, tmp_path: Path
) -> None:
    two_machine_plan(env, tls, "again", tmp_path / "order.log", wait_s=0)
    before = snapshot(env.site)

    async def run() -> dict[str, Any]:
        env.ops.loop = asyncio.get_running_loop()
        first = make_engine(env.inv, env.ops)
        job_id = start(first, env.inv, JobKind.PLAN_TEST_FAILOVER, "erp")
        async with asyncio.timeout(60):
            while "2" not in (env.inv.job(job_id)["result"] or {}).get("children", {}):
                await asyncio.sleep(0.01)
        await first.close()  # the "server" stops while group 2's child runs
        job = env.inv.job(job_id)
        assert job["state"] == JobState.RUNNING and job["step"] == "group-2"
        # As if it had died between submitting group 2's child and recording its id.
        env.inv.update_job(job_id, result={"children": {"1": job["result"]["children"]["1"]}})
        count, job = await resumed(make_engine(env.inv, env.ops), env.inv, job_id)
        assert count >= 1
        return job

    job = asyncio.run(run())
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    kids = children(env.inv, job["id"])
    assert sorted(k["subject"] for k in kids) == ["again-db", "again-web"]
    assert all(k["state"] == JobState.SUCCEEDED for k in kids)
    with session_for(env.site) as session:
        assert len(find_vms(session, "again-web-test")) == 1

    async def cleanup() -> dict[str, Any]:
        engine = make_engine(env.inv, env.ops)
        try:
            return await finished(env.inv, start(engine, env.inv, JobKind.PLAN_CLEANUP, "erp"))
        finally:
            await engine.close()

    assert asyncio.run(cleanup())["state"] == JobState.SUCCEEDED
    assert snapshot(env.site) == before
