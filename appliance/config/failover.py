"""The failover jobs: test failover and its cleanup, failover, commit, cancel.

State kept between steps, so that a configuration-server restart re-runs a step without
doing anything twice:

- the job's ``result`` (JSON): the chosen point, the materialised copy, the isolated
  network, the VM's name and owner. Each is written *before* the action it names, so a
  re-run (and a cleanup) knows what may exist even if the server died mid-action;
- the machine's ``failover`` column: ``{"test": {"job": id}}`` while a test failover
  may have left something in vCenter or on the master target, and ``{"failover":
  {"state": FailoverState, "job", "vm", "owner", "tag"}}`` for a real failover.

Every vSphere action looks first: a VM is found by name and owner marker before one
is created; an isolated port group of ours is reused. Bad input (an unknown point,
wrong credentials, a VM name held by someone else) is caught by the ``check`` step
before anything is created; a test failover failing later removes what it created
before it reports the error.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

from appliance.config import drill
from appliance.config.errors import InvalidArgument
from appliance.config.failover_base import (
    LIVENESS,
    FailoverOps,
    FailoverState,
    create_vm,
    drop_vm,
    failover_record,
    in_vcenter,
    job_result,
    pick,
    power_on,
    preflight,
    record_result,
    replica_settings,
    reprotect,
    request_resync,
    set_failover,
    target_or_fail,
    unfence,
)
from appliance.config.jobs import Definitions, JobContext, JobFailed, Step
from appliance.config.model import JobKind, MachineState
from appliance.config.targets import TargetCall
from appliance.config.vcenters import VCenterStore
from appliance.vsphere.session import Session

__all__ = ["FailoverMode", "FailoverOps", "FailoverState", "ServiceOps", "definitions"]

AGENT_WAIT = 300.0  # an agent that never stops does not hold a failover forever


class FailoverMode(StrEnum):
    PLANNED = "planned"  # the agent stops cleanly (its last changes reach the target)
    UNPLANNED = "unplanned"  # the primary site is gone: use what the target has


class ServiceOps:
    """`FailoverOps` made of the service's parts."""

    def __init__(
        self,
        target_call: TargetCall,
        vcenters: VCenterStore,
        agent_alive: Callable[[str], bool],
        *,
        liveness: float = LIVENESS,
    ) -> None:
        self._target_call = target_call
        self._vcenters = vcenters
        self._agent_alive = agent_alive
        self.liveness = liveness

    async def target_call(
        self, address: str, method: str, params: dict[str, Any], *, timeout: float | None = None
    ) -> Any:
        if timeout is None:
            return await self._target_call(address, method, params)
        return await self._target_call(address, method, params, timeout=timeout)

    def vsphere(self, vcenter: str) -> Session:
        return self._vcenters.open_session(vcenter)

    def agent_alive(self, machine: str) -> bool:
        return self._agent_alive(machine)


def definitions(ops: FailoverOps) -> Definitions:
    """The failover family's steps, for the JobEngine (beside `protection.definitions`)."""

    def failover(params: dict[str, Any]) -> list[Step]:
        return [
            Step("check", lambda ctx: _failover_check(ctx, ops)),
            Step("stop", _stop_replication),
            Step("agent", lambda ctx: _agent_stopped(ctx, ops), timeout=AGENT_WAIT),
            Step("point", lambda ctx: _failover_point(ctx, ops)),
            Step("rollback", lambda ctx: _rollback(ctx, ops)),
            Step("vm", lambda ctx: create_vm(ctx, ops, test=False)),
            Step("power-on", lambda ctx: power_on(ctx, ops)),
            Step("done", _failed_over),
        ]

    def commit(params: dict[str, Any]) -> list[Step]:
        return [Step("commit", _commit), Step("points", lambda ctx: _drop_points(ctx, ops))]

    def cancel(params: dict[str, Any]) -> list[Step]:
        return [
            Step("check", _cancel_check),
            Step("vm", lambda ctx: drop_vm(ctx, ops, job_result(ctx))),
            Step("unfence", lambda ctx: unfence(ctx, ops)),
            Step("resync", request_resync("generation")),
            Step("protect", reprotect),
        ]

    return {
        JobKind.TEST_FAILOVER: lambda params: drill.test_failover_steps(ops),
        JobKind.CLEANUP: lambda params: drill.cleanup_steps(ops),
        JobKind.FAILOVER: failover,
        JobKind.COMMIT: commit,
        JobKind.CANCEL: cancel,
    }


# -- failover, commit, cancel ---------------------------------------------------------


async def _failover_check(ctx: JobContext, ops: FailoverOps) -> bool:
    settings = replica_settings(ctx)
    try:
        FailoverMode(ctx.params.get("mode", FailoverMode.PLANNED))
    except ValueError:
        raise JobFailed(f"mode must be one of {', '.join(FailoverMode)}") from None
    current = failover_record(ctx).get("failover") or {}
    state = current.get("state")
    if state in (FailoverState.FAILED_OVER, FailoverState.COMMITTED):
        raise JobFailed(f"{ctx.subject} is {state} already (job {current['job']})")
    if not ctx.inventory.machine(ctx.subject)["master_target"]:
        raise JobFailed(f"{ctx.subject} has no master target; protect it first")
    # A failover that failed part-way is retried with the same VM name and owner, so
    # a VM it created is found and used rather than colliding with the new attempt.
    owner = current.get("owner") or ctx.job_id
    name = current.get("vm") or settings.vm_name_for(ctx.subject)
    await in_vcenter(ops, settings, "check", lambda s: preflight(s, settings, name, owner, False))
    record_result(ctx, vm=name, owner=owner)
    record = {"state": FailoverState.FAILING_OVER.value, "job": ctx.job_id, "vm": name}
    set_failover(ctx, "failover", {**record, "owner": owner})
    return True


async def _stop_replication(ctx: JobContext) -> bool:
    ctx.inventory.update_machine(ctx.subject, protection_enabled=False)
    return True


async def _agent_stopped(ctx: JobContext, ops: FailoverOps) -> bool:
    if not ctx.inventory.machine(ctx.subject)["replicating"]:
        return True
    # Unplanned: the primary site is gone, there is no agent to wait for.
    unplanned = ctx.params.get("mode") == FailoverMode.UNPLANNED
    return unplanned and not ops.agent_alive(ctx.subject)


async def _failover_point(ctx: JobContext, ops: FailoverOps) -> bool:
    # Chosen only now: with replication stopped, "latest" includes the final changes.
    if "point" in job_result(ctx):
        return True
    settings = replica_settings(ctx)
    point = await pick(ctx, ops)
    # The replica disks themselves, where the master target keeps them (store.py).
    try:
        disks = [
            settings.datastore_path(f"{settings.target_dir}/{d}/{d}.vmdk") for d in point["disks"]
        ]
    except InvalidArgument as exc:
        raise JobFailed(exc.message) from None
    record_result(ctx, point=point, disks=disks)
    return True


async def _rollback(ctx: JobContext, ops: FailoverOps) -> bool:
    result = job_result(ctx)
    if result.get("rolled_back"):
        return True
    # The target fences the disks first: a process server still attached is no obstacle.
    await target_or_fail(ctx, ops, "rollback", machine_id=ctx.subject,
                         tag_id=result["point"]["tag"])  # fmt: skip
    record_result(ctx, rolled_back=True)
    return True


async def _failed_over(ctx: JobContext) -> bool:
    result = job_result(ctx)
    current = failover_record(ctx).get("failover") or {}
    record = {**current, "state": FailoverState.FAILED_OVER.value, "tag": result["point"]["tag"]}
    set_failover(ctx, "failover", record)
    ctx.inventory.set_machine_state(ctx.subject, MachineState.FAILED_OVER, ctx.clock())
    return True


async def _commit(ctx: JobContext) -> bool:
    current = failover_record(ctx).get("failover") or {}
    state = current.get("state")
    if state == FailoverState.COMMITTED:
        return True
    if state != FailoverState.FAILED_OVER:
        raise JobFailed(f"{ctx.subject} is not failed over; there is nothing to commit")
    set_failover(ctx, "failover", {**current, "state": FailoverState.COMMITTED.value})
    ctx.inventory.set_machine_state(ctx.subject, MachineState.FAILOVER_COMMITTED, ctx.clock())
    return True


async def _drop_points(ctx: JobContext, ops: FailoverOps) -> bool:
    # The VM writes to the replica with no journal: no older point describes it now.
    await target_or_fail(ctx, ops, "drop_points", machine_id=ctx.subject)
    return True


async def _cancel_check(ctx: JobContext) -> bool:
    current = failover_record(ctx).get("failover") or {}
    state = current.get("state")
    if state == FailoverState.COMMITTED:
        raise JobFailed(f"the failover of {ctx.subject} is committed; fail back instead")
    if state not in (FailoverState.FAILING_OVER, FailoverState.FAILED_OVER):
        raise JobFailed(f"{ctx.subject} is not failed over; there is nothing to cancel")
    record_result(ctx, vm=current.get("vm"), owner=current.get("owner"))
    return True
