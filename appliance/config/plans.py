"""Recovery plans: ordered boot groups of machines, run as jobs over the per-machine jobs.

A plan (stored by `Inventory.set_plan`) is ``{"groups": [{"machines": [...], "wait_s":
30, "pre": "cmd", "post": "cmd"}, ...]}``. A plan job's steps per group N are
"pre-N" (the group's ``pre`` command), "group-N" (one per-machine job for each machine
of the group, waited for together), "post-N" and "wait-N" (``wait_s`` before the next
group). ``pre`` and ``post`` run ON THE CONFIGURATION SERVER, as its service user,
through ``/bin/sh -c`` with a timeout; a non-zero exit fails the plan with the tail of
their stderr. They may run again after a configuration-server restart that interrupted
them, so they must be safe to repeat.

The spec is copied into the job's params when the job is submitted, so a restart resumes
the same plan even if the stored one changed meanwhile. The child job ids are recorded
in the job's result, and every child carries its plan job's id in its params: a re-run
of "group-N" finds the children it submitted before a crash instead of submitting again.

The point of a plan is a consistency group's common point (`groups`: the default when
the plan's machines are all in one group, "latest-group"; resolved to the group's tag id
when the job is submitted, so every machine fails over to the same instant), or
"latest" or a time: each machine gets its OWN newest usable point at or before that
time, a common time, not a coordinated multi-machine consistency point.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.config import groups
from appliance.config.errors import ConfigServerError, InvalidArgument
from appliance.config.failover_base import job_result, record_result
from appliance.config.jobs import Definitions, JobContext, JobFailed, Step, StepFn
from appliance.config.model import JobKind, JobState

MAX_GROUPS = 32
SCRIPT_TIMEOUT = 300.0  # a hung pre/post command does not hold a failover forever
STDERR_TAIL = 2000  # characters of a failed command's stderr kept in the job's error
GROUP_KEYS = frozenset({"machines", "wait_s", "pre", "post"})

#: Submits a per-machine job: (kind, machine, params) -> job id (`JobEngine.submit`).
Submit = Callable[[JobKind, str, dict[str, Any]], str]

#: Which of the machines lack a usable point (`groups.GroupEntryPoints.lacking_point`).
Lacking = Callable[[list[str], str], Awaitable[list[str]]]
GROUP_POINT_TIMEOUT = 120.0  # a planned failover's fresh group point must land by then

#: The per-machine job each plan job runs for every machine of a group.
CHILD_KIND = {
    JobKind.PLAN_TEST_FAILOVER: JobKind.TEST_FAILOVER,
    JobKind.PLAN_CLEANUP: JobKind.CLEANUP,
    JobKind.PLAN_FAILOVER: JobKind.FAILOVER,
}


def subject(name: str) -> str:
    """A plan job's subject: one plan job at a time per plan."""
    return f"plan:{name}"


@dataclass(frozen=True)
class Group:
    machines: tuple[str, ...]
    wait_s: float = 0.0
    pre: str | None = None
    post: str | None = None

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"machines": list(self.machines), "wait_s": self.wait_s}
        rec |= {k: v for k, v in (("pre", self.pre), ("post", self.post)) if v}
        return rec


@dataclass(frozen=True)
class PlanSpec:
    groups: tuple[Group, ...]

    @classmethod
    def parse(cls, raw: Any, known: Collection[str]) -> PlanSpec:
        """Check a spec from an operator; InvalidArgument says what is wrong."""
        if not isinstance(raw, dict) or set(raw) != {"groups"}:
            raise InvalidArgument('a plan spec is {"groups": [{"machines": [...]}, ...]}')
        groups = raw["groups"]
        if not isinstance(groups, list) or not 0 < len(groups) <= MAX_GROUPS:
            raise InvalidArgument(f"a plan has between 1 and {MAX_GROUPS} groups")
        seen: dict[str, int] = {}
        parsed = []
        for n, g in enumerate(groups, 1):
            if not isinstance(g, dict) or set(g) - GROUP_KEYS:
                raise InvalidArgument(f"group {n}: keys are {', '.join(sorted(GROUP_KEYS))}")
            machines = g.get("machines")
            if not isinstance(machines, list) or not machines:
                raise InvalidArgument(f"group {n}: machines must be a non-empty list")
            for m in machines:
                if not isinstance(m, str) or m not in known:
                    raise InvalidArgument(f"group {n}: {m!r} is not a known machine")
                if m in seen:
                    raise InvalidArgument(f"{m} is in group {seen[m]} and group {n}")
                seen[m] = n
            wait = g.get("wait_s", 0)
            if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
                raise InvalidArgument(f"group {n}: wait_s must be a non-negative number")
            for key in ("pre", "post"):
                if not isinstance(g.get(key) or "", str):
                    raise InvalidArgument(f"group {n}: {key} must be a command line")
            parsed.append(
                Group(tuple(machines), float(wait), g.get("pre") or None, g.get("post") or None)
            )
        return cls(tuple(parsed))

    def record(self) -> dict[str, Any]:
        return {"groups": [g.record() for g in self.groups]}


def plan_point(point: str) -> str | float:
    """ "latest", a consistency group's tag id (`groups.plan_group_point` resolved
    "latest-group" to one), or a time (Unix seconds, or ISO 8601, UTC unless it has an
    offset) as Unix seconds: every machine gets its newest usable point at or before it."""
    if not point or point == "latest":
        return "latest"
    if groups.parse_tag(point) is not None:
        return point
    with contextlib.suppress(ValueError):
        return float(point)
    try:
        when = datetime.fromisoformat(point)
    except ValueError:
        raise InvalidArgument(
            f"a plan's point is 'latest' or a time (Unix seconds or ISO 8601), not {point!r}"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def definitions(submit: Submit, lacking: Lacking | None = None) -> Definitions:
    """The plan jobs' steps. Params: {"plan", "spec", "point", "mode", "await_point"}:
    with "await_point" (a planned failover asked its group for a fresh point) a first
    step "group-point" waits until every machine has that point."""

    def steps(kind: JobKind) -> Callable[[dict[str, Any]], list[Step]]:
        def make(params: dict[str, Any]) -> list[Step]:
            groups = list(enumerate(PlanSpec.parse(params["spec"], _all(params)).groups, 1))
            if kind is JobKind.PLAN_CLEANUP:
                # Cleanup removes the drill's VMs in reverse boot order, without scripts.
                return [Step(f"group-{n}", _group(submit, kind, n, g)) for n, g in groups[::-1]]
            out: list[Step] = []
            if lacking is not None and params.get("await_point"):
                machines = [m for _, g in groups for m in g.machines]
                out.append(Step("group-point", _await_point(lacking, machines)))
            for n, g in groups:
                if g.pre:
                    out.append(Step(f"pre-{n}", _script(g.pre, "pre", n, g)))
                out.append(Step(f"group-{n}", _group(submit, kind, n, g)))
                if g.post:
                    out.append(Step(f"post-{n}", _script(g.post, "post", n, g)))
                if g.wait_s and n < len(groups):
                    out.append(Step(f"wait-{n}", _wait(n, g.wait_s)))
            return out

        return make

    return {kind: steps(kind) for kind in CHILD_KIND}


def _all(params: dict[str, Any]) -> set[str]:
    return {m for g in params["spec"]["groups"] for m in g["machines"]}


def _child_params(ctx: JobContext, kind: JobKind, n: int) -> dict[str, Any]:
    params: dict[str, Any] = {"plan_job": ctx.job_id, "plan_group": n}
    if kind is not JobKind.PLAN_CLEANUP:
        params["point"] = ctx.params.get("point", "latest")
    if kind is JobKind.PLAN_FAILOVER:
        params["mode"] = ctx.params.get("mode", "planned")
    return params


def _group(submit: Submit, kind: JobKind, n: int, group: Group) -> StepFn:
    async def run(ctx: JobContext) -> bool:
        children: dict[str, str] = dict(job_result(ctx).get("children", {}).get(str(n), {}))
        for machine in group.machines:
            if machine in children:
                continue
            earlier = _earlier_child(ctx, machine)
            if earlier is not None:
                children[machine] = earlier
            elif kind is JobKind.PLAN_CLEANUP and not _has_test(ctx, machine):
                children[machine] = ""  # no drill of this machine is up: nothing to remove
            else:
                children[machine] = _submit(ctx, submit, kind, n, machine)
            # Recorded before the next submit: a crash leaves no child unrecorded twice.
            _record_children(ctx, n, children)
        jobs = {m: ctx.inventory.job(j) for m, j in children.items() if j}
        for machine, job in jobs.items():
            if job["state"] in (JobState.FAILED, JobState.CANCELLED):
                raise JobFailed(f"{machine} ({job['kind']} job {job['id']}): {job['error']}")
        done = sum(1 for job in jobs.values() if job["finished_at"] is not None)
        ctx.progress(100 * done / len(jobs) if jobs else 100)
        return done == len(jobs)

    return run


def _has_test(ctx: JobContext, machine: str) -> bool:
    return bool((ctx.inventory.machine(machine).get("failover") or {}).get("test"))


def _earlier_child(ctx: JobContext, machine: str) -> str | None:
    """The job this plan job submitted for `machine` before a restart lost its id."""
    for job in ctx.inventory.jobs(True):
        if job["subject"] == machine and (job["params"] or {}).get("plan_job") == ctx.job_id:
            return str(job["id"])
    return None


def _submit(ctx: JobContext, submit: Submit, kind: JobKind, n: int, machine: str) -> str:
    try:
        return submit(CHILD_KIND[kind], machine, _child_params(ctx, kind, n))
    except ConfigServerError as exc:  # Conflict (a job running), NotFound (machine removed)
        raise JobFailed(f"{machine}: {exc.message}") from None


def _record_children(ctx: JobContext, n: int, children: dict[str, str]) -> None:
    everything = dict(job_result(ctx).get("children", {}))
    everything[str(n)] = children
    record_result(ctx, children=everything)


def _script(command: str, which: str, n: int, group: Group) -> StepFn:
    async def run(ctx: JobContext) -> bool:
        env = os.environ | {
            "SECONDSITE_PLAN": str(ctx.params.get("plan", "")),
            "SECONDSITE_JOB": ctx.job_id,
            "SECONDSITE_GROUP": str(n),
            "SECONDSITE_MACHINES": " ".join(group.machines),
        }
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # so a timeout kills what the command started too
        )  # fmt: skip
        try:
            async with asyncio.timeout(SCRIPT_TIMEOUT):
                _, stderr = await proc.communicate()
        except (TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise JobFailed(
                f"the {which} command of group {n} did not finish within {SCRIPT_TIMEOUT:.0f} s"
            ) from None
        if proc.returncode != 0:
            tail = stderr.decode(errors="replace").strip()[-STDERR_TAIL:]
            raise JobFailed(
                f"the {which} command of group {n} exited with {proc.returncode}"
                + (f": {tail}" if tail else "")
            )
        return True

    return run


def _await_point(lacking: Lacking, machines: list[str]) -> StepFn:
    async def run(ctx: JobContext) -> bool:
        tag = str(ctx.params["point"])
        until = job_result(ctx).get("point_until")
        if until is None:  # stored: a restart does not start the wait over
            until = ctx.clock() + GROUP_POINT_TIMEOUT
            record_result(ctx, point_until=until)
        missing = await lacking(machines, tag)
        if missing and ctx.clock() >= until:
            raise JobFailed(
                f"the group point {tag} did not reach {', '.join(missing)} within "
                f"{GROUP_POINT_TIMEOUT:.0f} s (a member down, or its freeze overran: see "
                "the events); fail over to the newest common point with --unplanned"
            )
        ctx.progress(100 * (1 - len(missing) / len(machines)) if machines else 100)
        return not missing

    return run


def _wait(n: int, seconds: float) -> StepFn:
    async def run(ctx: JobContext) -> bool:
        until = job_result(ctx).get("waits", {}).get(str(n))
        if until is None:
            # Stored, so a restart does not start the wait over.
            until = ctx.clock() + seconds
            record_result(ctx, waits={**job_result(ctx).get("waits", {}), str(n): until})
        left = until - ctx.clock()
        ctx.progress(100 * (1 - left / seconds) if seconds else 100)
        return left <= 0

    return run
