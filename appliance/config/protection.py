"""The protection jobs: enable, disable, resync — their steps, each idempotent.

The agent learns what to do from the answers to its reports (protect or not, which
process server, the resync generation), so most steps set a field in the inventory
and then wait for the agent's reports to show the effect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from appliance.config.jobs import Definitions, JobContext, JobFailed, Step
from appliance.config.model import JobKind

UNPROTECT_WAIT = 300.0  # an agent that never answers does not hold the job forever


class Placement(Protocol):
    def place(self, machine: dict[str, Any]) -> tuple[str, str]:
        """(process server, master target) for a machine; JobFailed if there is none."""
        ...

    def agent_alive(self, machine: str) -> bool: ...


def definitions(ops: Placement) -> Definitions:
    def protect(params: dict[str, Any]) -> list[Step]:
        return [
            Step("place", lambda ctx: _place(ctx, ops)),
            Step("enable", _enable),
            Step("agent", _agent_replicating),
            Step("initial-sync", _initial_sync),
            Step("first-point", _first_point),
        ]

    def unprotect(params: dict[str, Any]) -> list[Step]:
        return [
            Step("disable", _disable),
            Step("agent", lambda ctx: _agent_stopped(ctx, ops.agent_alive), timeout=UNPROTECT_WAIT),
        ]

    def resync(params: dict[str, Any]) -> list[Step]:
        return [Step("request", _request_resync), Step("compare", _resync_done)]

    return {JobKind.PROTECT: protect, JobKind.UNPROTECT: unprotect, JobKind.RESYNC: resync}


async def _place(ctx: JobContext, ops: Placement) -> bool:
    machine = ctx.inventory.machine(ctx.subject)
    if machine["process_server"] and machine["master_target"]:
        return True
    process, target = ops.place(machine)
    ctx.inventory.update_machine(ctx.subject, process_server=process, master_target=target)
    return True


async def _enable(ctx: JobContext) -> bool:
    fields: dict[str, Any] = {"protection_enabled": True}
    if ctx.params.get("policy"):
        fields["policy"] = ctx.params["policy"]
    ctx.inventory.update_machine(ctx.subject, **fields)
    return True


async def _agent_replicating(ctx: JobContext) -> bool:
    return bool(ctx.inventory.machine(ctx.subject)["replicating"])


async def _initial_sync(ctx: JobContext) -> bool:
    disks = ctx.inventory.disks(ctx.subject)
    if not disks:
        return False
    ctx.progress(sum(float(d["initial_percent"]) for d in disks) / len(disks))
    return all(d["initial_done"] for d in disks)


async def _first_point(ctx: JobContext) -> bool:
    # A point older than this job proves nothing about the replication it enabled.
    newest = ctx.inventory.machine(ctx.subject)["newest_point_time"]
    created = ctx.inventory.job(ctx.job_id)["created_at"]
    return newest is not None and newest >= created - 1.0


async def _disable(ctx: JobContext) -> bool:
    ctx.inventory.update_machine(ctx.subject, protection_enabled=False)
    return True


async def _agent_stopped(ctx: JobContext, alive: Callable[[str], bool]) -> bool:
    machine = ctx.inventory.machine(ctx.subject)
    return not machine["replicating"] or not alive(ctx.subject)


async def _request_resync(ctx: JobContext) -> bool:
    machine = ctx.inventory.machine(ctx.subject)
    if not machine["protection_enabled"]:
        raise JobFailed(f"{ctx.subject} is not protected; protect it first")
    wanted = ctx.params.get("generation")
    if wanted is None or machine["resync_requested"] < wanted:
        # The generation is fixed at the first run of this step and kept in the job's
        # own progress row, so a re-run after a crash does not ask twice.
        generation = max(machine["resync_requested"], machine["resync_done"]) + 1
        ctx.params["generation"] = generation
        ctx.inventory.update_job(ctx.job_id, params=ctx.params)
        ctx.inventory.update_machine(ctx.subject, resync_requested=generation)
    return True


async def _resync_done(ctx: JobContext) -> bool:
    machine = ctx.inventory.machine(ctx.subject)
    return int(machine["resync_done"]) >= int(ctx.params["generation"])
