"""The failback job: after a committed failover, bring the original machine level with
the VM that ran at the secondary site, then protect it again in the normal direction.

Steps, each idempotent (a configuration-server restart re-runs at most one):

- check: the failover is committed, and the agent on the original machine reports
  (it does the transfer; the source machine is up with its protected disks unused);
- power-off: the failover VM stops writing the replica (nothing to do if it is off);
- request: a new failback generation on the machine (``failback_requested``, fixed in
  the job's result at the first run). The agent's answers carry it with the master
  target's address while this job runs; the agent compares every chunk's digest with
  the replica's and fetches only the chunks that differ (`agent.failback`);
- transfer: wait for the agent's report ``failback_done >= generation`` (its figures
  go into the job's result), or fail with the error it reports;
- vm: remove the failover VM, its disks detached first so the replica files stay.
  Only now: if the transfer failed, the VM is still there to be powered on again;
- resync, protect: a checksum-resync generation and protection back on, the failover
  record cleared, the machine protected: the agent streams via its process server
  again and its resync finds both sides equal, so it sends next to nothing;
- resumed: wait until the agent has done that resync.
"""

from __future__ import annotations

from typing import Any

from appliance.config.failover_base import (
    FailoverOps,
    FailoverState,
    drop_vm,
    failover_record,
    in_vcenter,
    job_result,
    record_result,
    replica_settings,
    reprotect,
    request_resync,
    unfence,
)
from appliance.config.jobs import Definitions, JobContext, JobFailed, Step
from appliance.config.model import JobKind
from appliance.vsphere import vms
from appliance.vsphere.session import Session

__all__ = ["definitions"]

# The agent reads every chunk of its disks once and fetches what differs: minutes for
# large disks, but a stuck agent must not hold the machine forever.
TRANSFER_WAIT = 6 * 3600.0
RESUME_WAIT = 3600.0  # the resync after the failback compares the disks once more


def definitions(ops: FailoverOps) -> Definitions:
    """The failback job's steps, for the JobEngine (beside `failover.definitions`)."""

    def failback(params: dict[str, Any]) -> list[Step]:
        return [
            Step("check", lambda ctx: _check(ctx, ops)),
            Step("power-off", lambda ctx: _power_off(ctx, ops)),
            Step("request", _request),
            Step("transfer", _transferred, timeout=TRANSFER_WAIT),
            Step("vm", lambda ctx: drop_vm(ctx, ops, job_result(ctx))),
            Step("unfence", lambda ctx: unfence(ctx, ops)),
            Step("resync", request_resync("resync")),
            Step("protect", reprotect),
            Step("resumed", _resumed, timeout=RESUME_WAIT),
        ]

    return {JobKind.FAILBACK: failback}


async def _check(ctx: JobContext, ops: FailoverOps) -> bool:
    result = job_result(ctx)
    if "vm" in result:  # checked before; a re-run after reprotect must not fail here
        return True
    current = failover_record(ctx).get("failover") or {}
    state = current.get("state")
    if state == FailoverState.FAILED_OVER:
        raise JobFailed(
            f"the failover of {ctx.subject} is not committed; commit it first "
            "(or cancel it to drop what the VM changed)"
        )
    if state != FailoverState.COMMITTED:
        raise JobFailed(f"{ctx.subject} is not failed over; there is nothing to fail back")
    machine = ctx.inventory.machine(ctx.subject)
    if not machine["master_target"]:
        raise JobFailed(f"{ctx.subject} has no master target")
    if not ops.agent_alive(ctx.subject):
        raise JobFailed(
            f"the agent of {ctx.subject} does not report; start the original machine "
            "(its protected disks unmounted) with its agent running, then fail back"
        )
    record_result(ctx, vm=current.get("vm"), owner=current.get("owner"))
    return True


async def _power_off(ctx: JobContext, ops: FailoverOps) -> bool:
    made = job_result(ctx)
    name, owner = made.get("vm"), made.get("owner")
    if not name or not owner:
        return True

    def off(session: Session) -> None:
        vm = vms.find_vm(session, name, owner)
        if vm is not None:
            vms.power_off(vm)

    await in_vcenter(ops, replica_settings(ctx), f"power off {name}", off)
    return True


async def _request(ctx: JobContext) -> bool:
    machine = ctx.inventory.machine(ctx.subject)
    wanted = job_result(ctx).get("generation")
    if wanted is None:
        wanted = max(machine["failback_requested"], machine["failback_done"]) + 1
        record_result(ctx, generation=wanted)
    if machine["failback_requested"] < wanted:
        ctx.inventory.update_machine(ctx.subject, failback_requested=wanted)
    return True


async def _transferred(ctx: JobContext) -> bool:
    wanted = int(job_result(ctx)["generation"])
    machine = ctx.inventory.machine(ctx.subject)
    report = machine.get("failback_result") or {}
    if int(machine["failback_done"]) >= wanted:
        record_result(ctx, transfer=report)
        return True
    if report.get("generation") == wanted and report.get("error"):
        raise JobFailed(f"the agent of {ctx.subject} could not fail back: {report['error']}")
    return False


async def _resumed(ctx: JobContext) -> bool:
    machine = ctx.inventory.machine(ctx.subject)
    wanted = int(job_result(ctx)["resync"])
    return bool(machine["replicating"]) and int(machine["resync_done"]) >= wanted
