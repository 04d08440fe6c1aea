"""Issue 6: a configuration server killed in the middle of a failover-family job and
started again finishes the job exactly once.

Engine-level, in the style of test_failover's `test_a_restart_mid_job_creates_nothing_twice`
(which covers test failover): a real JobEngine runs the job against vcsim and a real
targetd until a chosen call is reached; that engine is closed (the "server" dies there),
the job's recorded progress is optionally rewound as if the server had died before
recording earlier steps, and a second engine resumes it. Two ways to die in a call:
before it reaches its peer (the vsphere hold of test_failover's Ops), or after the peer
did the work but before the step returned (`HoldingOps.hold_after`), so the step runs
again over work already done. Each test then checks the end state exactly.

Failback is not here: its check needs the agent to report and its transfer step waits
for the agent's own report of the copy (tests/integration/test_failback.py drives it
with a real agent); at engine level that would mean faking the agent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from appliance.config.model import JobKind, JobState, MachineState
from appliance.vsphere.inventory import PowerState, discover
from appliance.vsphere.network import PORTGROUP_PREFIX
from appliance.vsphere.vms import find_vms
from appliance.wire.messages import TagKind
from tests.config import test_failover
from tests.config.test_failover import (
    Disk,
    Env,
    Ops,
    feed,
    flat_of,
    resumed,
    session_for,
    sha256,
    snapshot,
)
from tests.conftest import TlsMaterial

site = test_failover.site  # the fixtures, shared
env = test_failover.env

pytestmark = pytest.mark.integration


class HoldingOps(Ops):
    """test_failover's Ops; besides, the first target call of `hold_method` does its
    work and then never returns: the server dies after the peer acted, before the step
    could record it."""

    hold_method: str | None = None

    async def target_call(
        self, address: str, method: str, params: dict[str, Any], *, timeout: float | None = None
    ) -> Any:
        result = await super().target_call(address, method, params, timeout=timeout)
        if method == self.hold_method:
            self.hold_method = None
            self.held.set()
            await asyncio.Event().wait()  # cancelled when the engine closes
        return result


@pytest.fixture
def renv(env: Env) -> Env:
    plain = env.ops
    env.ops = HoldingOps(env.site, plain._target_call, plain._vcenters, plain._agent_alive)
    return env


def after_target(env: Env, method: str) -> None:
    assert isinstance(env.ops, HoldingOps)
    env.ops.hold_method = method


def before_vsphere(env: Env, nth: int) -> None:
    """The job's `nth` vCenter session (counted from now) is the one the server dies in."""
    env.ops.hold_at = env.ops.calls + nth


def restarted(
    env: Env,
    kind: JobKind,
    machine: str,
    params: dict[str, Any],
    *,
    dies_in: str,
    rewind_to: int | None = None,
    keep: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Run a job until the hold set up beforehand, close its engine there, rewind the
    job to step `rewind_to` keeping only the result keys `keep` (None: all), and
    resume it in a second engine; the finished job."""

    async def run() -> dict[str, Any]:
        first = env.engine()
        job_id = first.submit(kind, machine, params)
        await asyncio.wait_for(env.ops.held.wait(), 60)
        await first.close()
        env.ops.held.clear()
        job = env.inv.job(job_id)
        assert job["state"] == JobState.RUNNING and job["step"] == dies_in
        if rewind_to is not None:
            env.inv.update_job(job_id, step_index=rewind_to)
        if keep is not None:
            result = {k: v for k, v in (job["result"] or {}).items() if k in keep}
            env.inv.update_job(job_id, result=result)
        count, job = await resumed(env.engine(), env.inv, job_id)
        assert count == 1
        return job

    job = asyncio.run(run())
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    return job


def replica_flat(env: Env, machine: str) -> Path:
    return env.site.datastore / f"{machine}-d0" / f"{machine}-d0-flat.vmdk"


def digest(path: Path) -> str:
    return sha256(path.read_bytes())


def applies(env: Env, tls: TlsMaterial, disk: Disk) -> bool:
    """Whether a write streamed now reaches the replica (once it is acknowledged)."""
    flat = replica_flat(env, disk.machine)
    before = digest(flat)
    asyncio.run(disk.send(env.site, tls, 1, None, TagKind.CRASH))
    return digest(flat) != before


def target(env: Env, method: str, machine: str) -> Any:
    address = f"127.0.0.1:{env.site.target.port}"
    return asyncio.run(env.ops.target_call(address, method, {"machine_id": machine}))


def was_fenced(env: Env, machine: str) -> bool:
    """Whether the machine's disk was fenced; it is not afterwards (so: last in a test)."""
    unfenced: list[str] = target(env, "unfence", machine)["unfenced"]
    return unfenced == [f"{machine}-d0"]


def vms_named(env: Env, name: str) -> int:
    with session_for(env.site) as session:
        return len(find_vms(session, name))


def points(env: Env, machine: str) -> list[dict[str, Any]]:
    answer: list[dict[str, Any]] = target(env, "points", machine)
    return answer


def failed_over(env: Env, tls: TlsMaterial, name: str) -> Disk:
    """A machine fed, then failed over (planned, latest: p2) without interruption."""
    disk = feed(env.site, tls, name)
    env.machine(name, vm_name=f"{name}-dr")
    job = asyncio.run(env.run(JobKind.FAILOVER, name, {"point": "latest"}))
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    return disk


def assert_failed_over(env: Env, disk: Disk, job_id: str) -> None:
    name = disk.machine
    machine = env.inv.machine(name)
    assert machine["state"] == MachineState.FAILED_OVER and not machine["protection_enabled"]
    record = machine["failover"]["failover"]
    assert (record["state"], record["job"], record["tag"]) == ("failed-over", job_id, f"{name}-p2")
    assert record["vm"] == f"{name}-dr"
    with session_for(env.site) as session:
        assert len(find_vms(session, f"{name}-dr")) == 1
        vm = discover(session).vm(f"{name}-dr")
    assert vm.power_state is PowerState.ON
    assert [d.file_name for d in vm.disks] == [f"[LocalDS_0] {name}-d0/{name}-d0.vmdk"]
    assert [n.network for n in vm.nics] == ["VM Network"]
    assert digest(replica_flat(env, name)) == disk.at_tag[f"{name}-p2"]  # rolled back once
    assert was_fenced(env, name)


# -- the jobs --------------------------------------------------------------------------


def test_cleanup_killed_after_the_discard_leaves_nothing(renv: Env, tls: TlsMaterial) -> None:
    env = renv
    feed(env.site, tls, "cl01")
    env.machine("cl01")
    before = snapshot(env.site)
    test = asyncio.run(env.run(JobKind.TEST_FAILOVER, "cl01", {}))
    assert test["state"] == JobState.SUCCEEDED, test["error"]
    with session_for(env.site) as session:
        vm = discover(session).vm("cl01-test")
    flat = flat_of(env.site, vm.disks[0].file_name)

    # The copy is gone at the target; the server dies before the step returns. Resumed
    # from the VM step: the VM and the port group are gone already, the discard again.
    after_target(env, "discard")
    restarted(env, JobKind.CLEANUP, "cl01", {}, dies_in="copy", rewind_to=1)

    assert sorted(env.ops.discarded) == sorted([flat.name, flat.name.replace("-flat", "")])
    assert vms_named(env, "cl01-test") == 0
    assert snapshot(env.site) == before  # no VM, no port group, no copy
    assert env.inv.machine("cl01")["failover"] is None
    assert env.inv.machine("cl01")["protection_enabled"]


def test_planned_failover_killed_after_the_rollback_rolls_back_once(
    renv: Env, tls: TlsMaterial
) -> None:
    env = renv
    disk = feed(env.site, tls, "fo01")
    env.machine("fo01", vm_name="fo01-dr")
    # The target rolled back (and fenced) the replica; the job never recorded it.
    after_target(env, "rollback")
    job = restarted(
        env, JobKind.FAILOVER, "fo01", {"point": "latest", "mode": "planned"}, dies_in="rollback"
    )
    assert job["result"]["point"]["tag"] == "fo01-p2"
    assert_failed_over(env, disk, job["id"])


def test_unplanned_failover_killed_at_power_on_reruns_from_the_check(
    renv: Env, tls: TlsMaterial
) -> None:
    env = renv
    disk = feed(env.site, tls, "fo02")
    env.machine("fo02", vm_name="fo02-dr")
    # The 3rd vCenter session is power-on's (check, vm, power-on). Rewound to the very
    # start with an empty result: the check must take the VM's name and owner from the
    # machine's failing-over record, and the rolled-back replica's latest point is p2.
    before_vsphere(env, 3)
    job = restarted(
        env,
        JobKind.FAILOVER,
        "fo02",
        {"point": "latest", "mode": "unplanned"},
        dies_in="power-on",
        rewind_to=0,
        keep=(),
    )
    assert_failed_over(env, disk, job["id"])
    with session_for(env.site) as session:
        networks = discover(session).networks
    assert not [n for n in networks if n.name.startswith(PORTGROUP_PREFIX)]  # none made


def test_commit_killed_after_dropping_the_points_commits_once(renv: Env, tls: TlsMaterial) -> None:
    env = renv
    disk = failed_over(env, tls, "fo03")
    assert points(env, "fo03") != []
    failover_job = env.inv.machine("fo03")["failover"]["failover"]["job"]

    after_target(env, "drop_points")
    restarted(env, JobKind.COMMIT, "fo03", {}, dies_in="points", rewind_to=0)

    machine = env.inv.machine("fo03")
    assert machine["state"] == MachineState.FAILOVER_COMMITTED
    assert not machine["protection_enabled"]
    record = machine["failover"]["failover"]
    assert (record["state"], record["job"]) == ("committed", failover_job)
    assert points(env, "fo03") == []
    assert vms_named(env, "fo03-dr") == 1
    assert digest(replica_flat(env, "fo03")) == disk.at_tag["fo03-p2"]
    assert was_fenced(env, "fo03")  # the VM owns the replica until a failback


def test_cancel_killed_after_the_unfence_undoes_the_failover_once(
    renv: Env, tls: TlsMaterial
) -> None:
    env = renv
    disk = feed(env.site, tls, "fo04")
    env.machine("fo04", vm_name="fo04-dr")
    before = snapshot(env.site)
    job = asyncio.run(env.run(JobKind.FAILOVER, "fo04", {"point": "latest"}))
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    rolled_back = digest(replica_flat(env, "fo04"))
    assert rolled_back == disk.at_tag["fo04-p2"]

    # The target unfenced the disks; the server dies before the step returns. Resumed
    # from the check: the VM is gone already, the unfence and the resync run again.
    after_target(env, "unfence")
    restarted(env, JobKind.CANCEL, "fo04", {}, dies_in="unfence", rewind_to=0)

    machine = env.inv.machine("fo04")
    assert machine["state"] == MachineState.PROTECTED and machine["protection_enabled"]
    assert machine["failover"] is None
    assert machine["resync_requested"] == 1  # one resync asked
    assert vms_named(env, "fo04-dr") == 0
    assert snapshot(env.site) == before  # vCenter and the datastore as before the failover
    assert digest(replica_flat(env, "fo04")) == rolled_back  # the disks survive
    assert not was_fenced(env, "fo04")
    assert applies(env, tls, disk)  # the stream applies again
