"""Test failover (a drill) and its cleanup: a VM on a copy of a point, off the network.

Test failover materialises the point into a copy on the master target, creates an
isolated port group (a vSwitch without uplinks) unless the job gives a network map,
creates the VM on the copy and powers it on; replication keeps running. Cleanup
removes the VM, the port group and the copy. A test failover that fails after the
check removes what it made before it reports the error.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from appliance.config.errors import ConfigServerError, InvalidArgument
from appliance.config.failover_base import (
    FailoverOps,
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
    set_failover,
    target,
    target_or_fail,
    undoing,
)
from appliance.config.jobs import JobContext, JobFailed, Step
from appliance.config.targets import RemoteRefused
from appliance.vsphere import network


def test_failover_steps(ops: FailoverOps) -> list[Step]:
    def undo(ctx: JobContext) -> Awaitable[bool]:
        return _undo_test(ctx, ops)

    return [
        Step("check", lambda ctx: _test_check(ctx, ops)),
        Step("materialize", undoing(lambda ctx: _materialize(ctx, ops), undo)),
        Step("network", undoing(lambda ctx: _isolate(ctx, ops), undo)),
        Step("vm", undoing(lambda ctx: create_vm(ctx, ops, test=True), undo)),
        Step("power-on", undoing(lambda ctx: power_on(ctx, ops), undo)),
    ]


def cleanup_steps(ops: FailoverOps) -> list[Step]:
    return [
        Step("find", _cleanup_find),
        Step("vm", lambda ctx: drop_vm(ctx, ops, _test_result(ctx))),
        Step("network", lambda ctx: _drop_network(ctx, ops, _test_result(ctx))),
        Step("copy", lambda ctx: _drop_copy(ctx, ops, _test_result(ctx))),
        Step("forget", _forget_test),
    ]


async def _test_check(ctx: JobContext, ops: FailoverOps) -> bool:
    settings = replica_settings(ctx)
    test = failover_record(ctx).get("test")
    if test and test.get("job") != ctx.job_id:
        raise JobFailed(
            f"{ctx.subject} has a test failover up (job {test['job']}); clean it up first"
        )
    isolate = not ctx.params.get("network_map")
    if isolate and settings.compute is None:
        raise JobFailed(
            "the replica settings name no host or cluster for the isolated test network; "
            "add one, or give the test failover a network_map"
        )
    result = job_result(ctx)
    point = result.get("point") or await pick(ctx, ops)
    name = f"{settings.vm_name_for(ctx.subject)}-test"
    await in_vcenter(
        ops, settings, "check", lambda s: preflight(s, settings, name, ctx.job_id, isolate)
    )
    record_result(ctx, point=point, vm=name, owner=ctx.job_id)
    set_failover(ctx, "test", {"job": ctx.job_id})
    return True


async def _materialize(ctx: JobContext, ops: FailoverOps) -> bool:
    result = job_result(ctx)
    if "vmdks" in result:
        return True
    settings = replica_settings(ctx)
    suffix = f"-{ctx.job_id}"  # the copies are <disk_id><suffix>.vmdk on the target
    point = result["point"]
    record_result(ctx, copy=suffix)
    try:
        answer = await target(
            ctx, ops, "materialize", machine_id=ctx.subject, tag_id=point["tag"], name=suffix
        )
        vmdks = [str(p) for p in answer["vmdks"]]
    except ConfigServerError as exc:
        if " already exists" not in exc.message:
            if isinstance(exc, RemoteRefused):  # it answered: it removed the partial copy
                record_result(ctx, copy=None)
            # Otherwise (no answer) the target may still make the copy: it stays
            # recorded, for the undo and a later cleanup to discard.
            raise JobFailed(_materialize_failure(exc)) from None
        # An earlier run of this step got as far as the target's answer; the names are
        # this job's own, and the target never leaves a partial copy behind an error.
        vmdks = [f"{settings.target_dir}/{d}{suffix}.vmdk" for d in point["disks"]]
    try:
        disks = [settings.datastore_path(v) for v in vmdks]
    except InvalidArgument as exc:
        raise JobFailed(exc.message) from None
    record_result(ctx, vmdks=vmdks, disks=disks)
    return True


def _materialize_failure(exc: ConfigServerError) -> str:
    if isinstance(exc, RemoteRefused) and exc.detail.get("error") == "StorageFull":
        return (
            f"{exc.message}; free space in the master target's datastore directory (a "
            "drill's copy needs room for the data of every disk), then run the test "
            "failover again"
        )
    return exc.message


async def _isolate(ctx: JobContext, ops: FailoverOps) -> bool:
    result = job_result(ctx)
    if ctx.params.get("network_map") or "portgroup" in result:
        return True
    settings = replica_settings(ctx)
    compute = settings.compute
    assert compute is not None  # checked in the check step
    record_result(ctx, network_id=ctx.job_id)
    made = await in_vcenter(
        ops,
        settings,
        "isolated network",
        lambda s: network.ensure_isolated_portgroup(s, compute, ctx.job_id),
    )
    record_result(ctx, portgroup=made.portgroup)
    return True


async def _undo_test(ctx: JobContext, ops: FailoverOps) -> bool:
    result = job_result(ctx)
    await drop_vm(ctx, ops, result)
    await _drop_network(ctx, ops, result)
    await _drop_copy(ctx, ops, result)
    set_failover(ctx, "test", None)
    return True


async def _cleanup_find(ctx: JobContext) -> bool:
    if "test_job" in job_result(ctx):
        return True
    test = failover_record(ctx).get("test")
    if not test:
        raise JobFailed(f"{ctx.subject} has no test failover to clean up")
    record_result(ctx, test_job=test["job"])
    return True


def _test_result(ctx: JobContext) -> dict[str, Any]:
    return dict(ctx.inventory.job(job_result(ctx)["test_job"])["result"] or {})


async def _drop_network(ctx: JobContext, ops: FailoverOps, made: dict[str, Any]) -> bool:
    network_id = made.get("network_id")
    settings = replica_settings(ctx)
    if network_id and settings.compute:
        compute = settings.compute
        await in_vcenter(
            ops,
            settings,
            "remove isolated network",
            lambda s: network.remove_isolated_portgroup(s, compute, network_id),
        )
    return True


async def _drop_copy(ctx: JobContext, ops: FailoverOps, made: dict[str, Any]) -> bool:
    # `discard` removes <disk_id><name>.vmdk pairs of the machine; a no-op when gone.
    if made.get("copy"):
        await target_or_fail(ctx, ops, "discard", machine_id=ctx.subject, name=made["copy"])
    return True


async def _forget_test(ctx: JobContext) -> bool:
    test = failover_record(ctx).get("test")
    if test and test.get("job") == job_result(ctx)["test_job"]:
        set_failover(ctx, "test", None)
    return True
