"""The job engine: steps in order, progress, failure, bugs, resume after a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from appliance.config.api import JobProgress, Signal
from appliance.config.errors import Conflict
from appliance.config.inventory import Inventory
from appliance.config.jobs import JobContext, JobEngine, JobFailed, Step
from appliance.config.model import JobKind, JobState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def engine_for(inv: Inventory, steps: list[Step], signals: list[Signal], clock: Clock) -> JobEngine:
    def defs(params: dict[str, Any]) -> list[Step]:
        return steps

    return JobEngine(inv, {JobKind.PROTECT: defs}, signals.append, clock, poll=0.01)


async def until_finished(inv: Inventory, job_id: str, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while (job := inv.job(job_id))["finished_at"] is None:
            await asyncio.sleep(0.01)
    return job


@pytest.fixture
def inv(tmp_path: Path) -> Any:
    inventory = Inventory.open(tmp_path / "inv.db")
    yield inventory
    inventory.close()


def test_steps_run_in_order_and_wait(inv: Inventory) -> None:
    asyncio.run(_test_steps_run_in_order_and_wait(inv))


async def _test_steps_run_in_order_and_wait(inv: Inventory) -> None:
    ran: list[str] = []
    gate = {"open": False}

    async def first(ctx: JobContext) -> bool:
        ran.append("first")
        return True

    async def waits(ctx: JobContext) -> bool:
        ctx.progress(50.0)
        ran.append("waits")
        return gate["open"]

    signals: list[Signal] = []
    engine = engine_for(inv, [Step("first", first), Step("waits", waits)], signals, Clock())
    job_id = engine.submit(JobKind.PROTECT, "m1")
    await asyncio.sleep(0.1)
    job = inv.job(job_id)
    assert job["state"] == JobState.RUNNING and job["step"] == "waits"
    assert job["percent"] == pytest.approx(75.0)
    with pytest.raises(Conflict):
        engine.submit(JobKind.PROTECT, "m1")
    gate["open"] = True
    engine.poke()
    job = await until_finished(inv, job_id)
    assert job["state"] == JobState.SUCCEEDED and job["percent"] == 100.0
    assert ran[0] == "first" and ran.count("first") == 1 and ran.count("waits") >= 2
    finals = [s for s in signals if isinstance(s, JobProgress) and s.state == "succeeded"]
    assert len(finals) == 1 and finals[0].job == job_id
    assert any("succeeded" in e["message"] for e in inv.events(10))
    await engine.close()


def test_failure_and_bug_and_timeout_fail_the_job(inv: Inventory) -> None:
    asyncio.run(_test_failure_and_bug_and_timeout_fail_the_job(inv))


async def _test_failure_and_bug_and_timeout_fail_the_job(inv: Inventory) -> None:
    async def refuses(ctx: JobContext) -> bool:
        raise JobFailed("no process server is enrolled")

    async def buggy(ctx: JobContext) -> bool:
        raise KeyError("oops")

    clock = Clock()

    async def never(ctx: JobContext) -> bool:
        clock.now += 10
        return False

    for steps, message in (
        ([Step("place", refuses)], "no process server is enrolled"),
        ([Step("bug", buggy)], "internal error"),
        ([Step("slow", never, timeout=25)], "did not finish within 25 s"),
    ):
        engine = engine_for(inv, steps, [], clock)
        job_id = engine.submit(JobKind.PROTECT, f"m-{message[:4]}")
        job = await until_finished(inv, job_id)
        assert job["state"] == JobState.FAILED
        assert message in job["error"]
        await engine.close()


def test_a_restarted_engine_resumes_at_the_unfinished_step(inv: Inventory) -> None:
    asyncio.run(_test_a_restarted_engine_resumes_at_the_unfinished_step(inv))


async def _test_a_restarted_engine_resumes_at_the_unfinished_step(inv: Inventory) -> None:
    runs: dict[str, int] = {"a": 0, "b": 0}
    gate = {"open": False}

    async def a(ctx: JobContext) -> bool:
        runs["a"] += 1
        return True

    async def b(ctx: JobContext) -> bool:
        runs["b"] += 1
        return gate["open"]

    steps = [Step("a", a), Step("b", b)]
    first = engine_for(inv, steps, [], Clock())
    job_id = first.submit(JobKind.PROTECT, "m1")
    await asyncio.sleep(0.1)
    await first.close()  # the daemon stops (or dies) while step b waits
    assert inv.job(job_id)["state"] == JobState.RUNNING
    gate["open"] = True
    second = engine_for(inv, steps, [], Clock())
    assert second.resume() == 1
    job = await until_finished(inv, job_id)
    assert job["state"] == JobState.SUCCEEDED
    assert runs["a"] == 1  # a finished before the restart: not run again
    await second.close()
