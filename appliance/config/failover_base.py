"""What the failover jobs share: their state records, the two peers, the replica VM.

See `failover` for the records kept between steps. Everything here is for the step
functions of `failover` and `drill`; a helper that fails raises `JobFailed` with a
message for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from pyVmomi import vim

from appliance.config.errors import ConfigServerError, InvalidArgument
from appliance.config.jobs import JobContext, JobFailed, StepFn
from appliance.config.model import MachineState
from appliance.config.replica import ReplicaSettings, pick_point
from appliance.config.targets import PING
from appliance.vsphere import network, vms
from appliance.vsphere.customize import customize
from appliance.vsphere.errors import (
    BadCredentials,
    DatastoreFull,
    NameTaken,
    NotFound,
    NotOurs,
    Unreachable,
    VSphereError,
)
from appliance.vsphere.hardware import Firmware
from appliance.vsphere.session import Session

T = TypeVar("T")


class FailoverState(StrEnum):
    """The ``state`` of a machine's failover record (its ``failover`` column)."""

    FAILING_OVER = "failing-over"  # replication may be stopped, the VM may exist
    FAILED_OVER = "failed-over"  # the VM runs on the rolled-back replica
    COMMITTED = "committed"


# Control RPCs whose time grows with the disks: a copy of every disk (materialize),
# undoing the journal back to a point (rollback, bounded by the disks' size).
LONG_RPCS = frozenset({"materialize", "rollback"})
LONG_FLOOR = 600.0  # seconds any long RPC is allowed, however small the disks
SLOWEST_RATE = 4 << 20  # bytes/s: the slowest datastore such an RPC may crawl at
LIVENESS = 10.0  # seconds between pings of the target during a long RPC


def long_timeout(size: int) -> float:
    """How long a long RPC over disks of `size` bytes in all may take (2 TiB: ~6 days;
    the pings, not this, notice a target that is gone)."""
    return LONG_FLOOR + size / SLOWEST_RATE


class FailoverOps(Protocol):
    """What the failover jobs need from the configuration server."""

    liveness: float  # seconds between pings of the target during a long RPC

    async def target_call(
        self, address: str, method: str, params: dict[str, Any], *, timeout: float | None = None
    ) -> Any: ...

    def vsphere(self, vcenter: str) -> Session:
        """A logged-in session (blocking; the jobs call it in a worker thread)."""
        ...

    def agent_alive(self, machine: str) -> bool: ...


# -- state helpers -------------------------------------------------------------------


def job_result(ctx: JobContext) -> dict[str, Any]:
    return dict(ctx.inventory.job(ctx.job_id)["result"] or {})


def record_result(ctx: JobContext, **values: Any) -> dict[str, Any]:
    """Merge `values` into the job's result (None removes a key); durable on return."""
    result = job_result(ctx)
    for key, value in values.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    ctx.inventory.update_job(ctx.job_id, result=result)
    return result


def failover_record(ctx: JobContext) -> dict[str, Any]:
    return dict(ctx.inventory.machine(ctx.subject).get("failover") or {})


def set_failover(ctx: JobContext, key: str, value: dict[str, Any] | None) -> None:
    record = failover_record(ctx)
    if value is None:
        record.pop(key, None)
    else:
        record[key] = value
    ctx.inventory.update_machine(ctx.subject, failover=record or None)


def replica_settings(ctx: JobContext) -> ReplicaSettings:
    raw = ctx.inventory.machine(ctx.subject).get("replica")
    if not raw:
        raise JobFailed(
            f"{ctx.subject} has no replica settings (vCenter, datastore, folder, network "
            "map); set them first"
        )
    try:
        return ReplicaSettings.parse(raw)
    except InvalidArgument as exc:
        raise JobFailed(exc.message) from None


def undoing(step: StepFn, undo: Callable[[JobContext], Awaitable[bool]]) -> StepFn:
    """`step`, removing what the job created when it fails, before reporting the error."""

    async def run(ctx: JobContext) -> bool:
        try:
            return await step(ctx)
        except JobFailed as exc:
            try:
                await undo(ctx)
            except JobFailed as again:
                raise JobFailed(
                    f"{exc}; removing what it created failed too ({again}); "
                    f"run a cleanup of {ctx.subject}"
                ) from None
            raise

    return run


# -- the two peers ------------------------------------------------------------------


async def target(ctx: JobContext, ops: FailoverOps, method: str, **params: Any) -> Any:
    """A control RPC of the machine's master target; ConfigServerError as the target said."""
    machine = ctx.inventory.machine(ctx.subject)
    if not machine["master_target"]:
        raise JobFailed(f"{ctx.subject} has no master target; protect it first")
    address = ctx.inventory.server(machine["master_target"])["address"]
    if method in LONG_RPCS:
        size = sum(int(d["size_bytes"]) for d in ctx.inventory.disks(ctx.subject))
        return await long_call(ops, address, method, params, size)
    return await ops.target_call(address, method, params)


async def long_call(
    ops: FailoverOps, address: str, method: str, params: dict[str, Any], size: int
) -> Any:
    """A control RPC that may take hours on multi-TB disks: allowed `long_timeout(size)`
    rather than the client's default, while the target is pinged every `ops.liveness`
    seconds on another connection (answered by its event loop, not a control thread
    that another long call may hold), so a target that stops answering (host gone,
    network cut) fails the call within seconds, not days."""
    call = asyncio.ensure_future(
        ops.target_call(address, method, params, timeout=long_timeout(size))
    )
    try:
        while True:
            await asyncio.wait({call}, timeout=ops.liveness)
            if call.done():
                return call.result()
            try:
                await ops.target_call(address, PING, {})
            except ConfigServerError as exc:
                raise ConfigServerError(
                    f"the master target stopped answering during {method} ({exc.message}); "
                    "check it is running and reachable, then run the job again"
                ) from None
    finally:
        if not call.done():
            call.cancel()  # the target may still finish; a re-run finds what it made


async def target_or_fail(ctx: JobContext, ops: FailoverOps, method: str, **params: Any) -> Any:
    try:
        return await target(ctx, ops, method, **params)
    except ConfigServerError as exc:
        raise JobFailed(exc.message) from None


def request_resync(key: str) -> Callable[[JobContext], Awaitable[bool]]:
    """A step asking the agent for a checksum resync (the replica went back to a point,
    or a VM wrote to it): the generation is chosen once and kept in the job result
    under `key`, so a re-run after a crash does not ask twice."""

    async def step(ctx: JobContext) -> bool:
        machine = ctx.inventory.machine(ctx.subject)
        wanted = job_result(ctx).get(key)
        if wanted is None:
            wanted = max(machine["resync_requested"], machine["resync_done"]) + 1
            record_result(ctx, **{key: wanted})
        if machine["resync_requested"] < wanted:
            ctx.inventory.update_machine(ctx.subject, resync_requested=wanted)
        return True

    return step


async def reprotect(ctx: JobContext) -> bool:
    """Protection back on, the failover record gone, the machine protected again."""
    ctx.inventory.update_machine(ctx.subject, protection_enabled=True)
    set_failover(ctx, "failover", None)
    ctx.inventory.set_machine_state(ctx.subject, MachineState.PROTECTED, ctx.clock())
    return True


async def unfence(ctx: JobContext, ops: FailoverOps) -> bool:
    """Let the master target apply the machine's stream again (it fenced the disks at
    the failover's rollback); idempotent. Always before protection is switched back on."""
    await target_or_fail(ctx, ops, "unfence", machine_id=ctx.subject)
    return True


async def in_vcenter(
    ops: FailoverOps, settings: ReplicaSettings, action: str, work: Callable[[Session], T]
) -> T:
    """Run `work` in a fresh session in a worker thread; vSphere errors fail the job."""

    def run() -> T:
        with ops.vsphere(settings.vcenter) as session:
            return work(session)

    try:
        return await asyncio.to_thread(run)
    except VSphereError as exc:
        raise JobFailed(vsphere_failure(settings.vcenter, action, exc)) from None
    except ConfigServerError as exc:  # unknown vCenter, missing or unreadable credentials
        raise JobFailed(exc.message) from None


def vsphere_failure(vcenter: str, action: str, exc: VSphereError) -> str:
    """The job error for `exc`: what happened, and what the operator can do about it."""
    if isinstance(exc, Unreachable):
        return (
            f"vCenter {vcenter} does not answer ({exc}); check that it is up and "
            "reachable from this server, then run the job again"
        )
    if isinstance(exc, BadCredentials):
        return (
            f"vCenter {vcenter} refused the user name or password ({exc}); if they were "
            f"changed, store the new ones with 'secondsitectl vcenter-credentials {vcenter}'"
        )
    if isinstance(exc, DatastoreFull):
        return (
            f"vCenter {vcenter}: {action}: {exc}; free space on the datastore or name "
            "another one in the replica settings, then run the job again"
        )
    return f"vCenter {vcenter}: {action}: {exc}"


async def pick(ctx: JobContext, ops: FailoverOps) -> dict[str, Any]:
    points = await target_or_fail(ctx, ops, "points", machine_id=ctx.subject)
    try:
        p = pick_point(points, ctx.params.get("point", "latest"), ctx.subject)
    except InvalidArgument as exc:
        raise JobFailed(exc.message) from None
    return {"tag": p["tag_id"], "time": p["time_ns"] / 1e9, "kind": p["kind"], "disks": p["disks"]}


def preflight(
    session: Session, settings: ReplicaSettings, name: str, owner: str, isolate: bool
) -> None:
    """Everything that can be checked before creating anything (raises VSphereError)."""
    session.ref(vim.Folder, settings.folder)
    if settings.resource_pool:
        session.ref(vim.ResourcePool, settings.resource_pool)
    if settings.host:
        session.ref(vim.HostSystem, settings.host)
    if isolate:
        assert settings.compute is not None  # checked by the caller
        network.target_hosts(session, settings.compute)
    try:
        vms.find_vm(session, name, owner)
    except NameTaken as exc:
        raise NameTaken(
            f"{exc}; rename or remove it, or set vm_name in the replica settings"
        ) from None


async def drop_vm(ctx: JobContext, ops: FailoverOps, made: dict[str, Any]) -> bool:
    name, owner = made.get("vm"), made.get("owner")
    if not name or not owner:
        return True

    def drop(session: Session) -> None:
        # Only somebody else's VM having the name means nothing of ours to remove.
        with contextlib.suppress(NotOurs):
            vms.destroy_vm(session, name, owner)

    await in_vcenter(ops, replica_settings(ctx), f"remove VM {name}", drop)
    return True


# -- shared by test failover and failover ------------------------------------------


async def create_vm(ctx: JobContext, ops: FailoverOps, *, test: bool) -> bool:
    settings = replica_settings(ctx)
    result = job_result(ctx)
    overrides = ctx.params.get("network_map") or None
    nics = []
    for index, label in enumerate(settings.nics):
        if test and overrides is None:
            group: str | None = result["portgroup"]
        else:
            group = settings.port_group(index, label, overrides)
        if group is None:
            raise JobFailed(f"NIC {label} of {ctx.subject} has no port group in the network map")
        nics.append(group)
    try:
        spec = vms.VmSpec(
            name=result["vm"],
            owner=result["owner"],
            datastore=settings.datastore,
            folder=settings.folder,
            resource_pool=settings.resource_pool,
            host=settings.host,
            cpus=settings.cpus,
            memory_mib=settings.memory_mib,
            firmware=Firmware(settings.firmware.value),
            guest_id=settings.guest_id,
            disks=tuple(result["disks"]),
            nics=tuple(nics),
        )
    except ValueError as exc:
        raise JobFailed(f"cannot create the VM for {ctx.subject}: {exc}") from None
    # Re-IP (failover only; a drill is isolated): queued on the VM while it is off.
    hostname = str(ctx.inventory.machine(ctx.subject)["hostname"])
    custom = None if test else settings.customization(hostname)

    def create(session: Session) -> str:
        vm = vms.ensure_vm(session, spec)
        if custom is not None:
            customize(vm, custom)  # nothing when already pending or on (a re-run)
        return str(vm._moId)

    moid = await in_vcenter(ops, settings, f"create VM {spec.name}", create)
    record_result(ctx, vm_moid=moid)
    return True


async def power_on(ctx: JobContext, ops: FailoverOps) -> bool:
    result = job_result(ctx)
    name, owner = result["vm"], result["owner"]

    def run(session: Session) -> None:
        vm = vms.find_vm(session, name, owner)
        if vm is None:
            raise NotFound(f"VM {name} disappeared before it was powered on")
        vms.power_on(vm)

    await in_vcenter(ops, replica_settings(ctx), f"power on {name}", run)
    return True
