"""Long master-target RPCs (materialise, roll back) outlast the control client's timeout
without failing the job, and a target that stops answering during one fails it soon.

The site is tests/config/test_failover.py's (vcsim, a real targetd on vcsim's LocalDS_0
fed by the test, jobs in a real JobEngine), with two changes: the target is
`tests.integration.slow_targetd`, whose materialize and rollback sleep DELAY seconds
before running (fault injection), and the client's default timeout is SHORT, below
DELAY: what a multi-TB copy is to the real 30 s default.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.config.errors import ConfigServerError
from appliance.config.inventory import Inventory
from appliance.config.model import JobKind, JobState
from appliance.config.targets import TargetClient
from appliance.config.vcenters import Credentials, VCenterStore
from appliance.vsphere.inventory import discover
from appliance.vsphere.session import connect
from tests.config.test_failover import DISK, Env, Ops, Site, feed, finished
from tests.conftest import TlsMaterial, free_port
from tests.integration.daemons import RoleDaemon
from tests.vcsim.fixture import Vcsim
from tests.vsphere.conftest import endpoint_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DELAY = 3.0  # seconds materialize and rollback sleep in the target
SHORT = 1.0  # the control client's default timeout in this test
LIVENESS = 0.5  # seconds between pings of the target during a long RPC


@pytest.fixture(scope="module")
def slow_site(
    vcsim: Vcsim, tls: TlsMaterial, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    with connect(endpoint_for(vcsim)) as session:
        inv = discover(session)
    datastore = Path(next(d.url for d in inv.datastores if d.name == "LocalDS_0"))
    base = tmp_path_factory.mktemp("slow")
    config = f'[storage]\ndatastore = "{datastore}"\n[stream]\ncheckpoint_seconds = 0.1\n'
    target = RoleDaemon(base / "target", free_port(), tls, config,
                        "tests.integration.slow_targetd")  # fmt: skip
    target.state_dir.mkdir()
    os.environ["SECONDSITE_TEST_SLOW"] = f"materialize={DELAY},rollback={DELAY}"
    try:
        target.start()
    finally:
        del os.environ["SECONDSITE_TEST_SLOW"]
    yield Site(vcsim, target, inv, datastore)
    if target.process is not None and target.process.poll() is None:
        target.process.send_signal(signal.SIGCONT)
        assert target.stop() == 0


@pytest.fixture
def env(slow_site: Site, tls: TlsMaterial, tmp_path: Path) -> Iterator[Env]:
    inv = Inventory.open(tmp_path / "inv.db")
    inv.add_site("dr", "secondary")
    inv.upsert_server("mt1", "target", f"127.0.0.1:{slow_site.target.port}")
    vcenters = VCenterStore(inv, tmp_path / "state" / "vcenters.json", timeout=10)
    sim = slow_site.vcsim
    vcenters.register("vc", "dr", f"{sim.host}:{sim.port}", Credentials(sim.user, sim.password),
                      sim.cert_sha256)  # fmt: skip
    client = TargetClient(tls.client.cert, tls.client.key, tls.ca.cert, name="configd-test",
                          timeout=SHORT)  # fmt: skip
    ops = Ops(slow_site, client.call, vcenters, lambda machine: False)
    ops.liveness = LIVENESS
    yield Env(slow_site, inv, vcenters, ops)
    inv.close()


def machine(env: Env, name: str) -> None:
    env.machine(name)
    disk = {"disk_id": f"{name}-d0", "path": "/dev/sdb", "size_bytes": DISK, "sector_size": 512}
    env.inv.set_disks(name, [disk])


def test_slow_materialize_and_rollback_do_not_fail_the_jobs(env: Env, tls: TlsMaterial) -> None:
    site = env.site
    feed(site, tls, "slow1")
    machine(env, "slow1")
    address = f"127.0.0.1:{site.target.port}"

    async def direct() -> None:  # the delay really is beyond the client's default
        await env.ops.target_call(address, "materialize", {"machine_id": "slow1",
                                  "tag_id": "slow1-p1", "name": "-direct"})  # fmt: skip

    with pytest.raises(ConfigServerError, match="unreachable"):
        asyncio.run(direct())
    # The target finishes it regardless; wait for that, and remove the copy.
    asyncio.run(wait_for((site.datastore / "slow1-d0-direct.vmdk").exists))
    asyncio.run(env.ops.target_call(address, "discard", {"machine_id": "slow1",
                                                         "name": "-direct"}))  # fmt: skip

    job = asyncio.run(env.run(JobKind.TEST_FAILOVER, "slow1", {"point": "slow1-p1"}))
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    copy = site.datastore / f"slow1-d0-{job['id']}.vmdk"
    assert copy.exists()
    done = asyncio.run(env.run(JobKind.CLEANUP, "slow1", {}))
    assert done["state"] == JobState.SUCCEEDED, done["error"]
    assert not copy.exists()

    job = asyncio.run(env.run(JobKind.FAILOVER, "slow1", {"point": "slow1-p1",
                                                            "mode": "unplanned"}))  # fmt: skip
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    assert job["result"]["rolled_back"] is True
    done = asyncio.run(env.run(JobKind.CANCEL, "slow1", {}))
    assert done["state"] == JobState.SUCCEEDED, done["error"]


def test_a_target_that_stops_answering_mid_copy_fails_the_job(env: Env, tls: TlsMaterial) -> None:
    site = env.site
    feed(site, tls, "slow2")
    machine(env, "slow2")
    process = site.target.process
    assert process is not None

    async def run() -> dict[str, object]:
        engine = env.engine()
        job_id = engine.submit(JobKind.TEST_FAILOVER, "slow2", {"point": "slow2-p1"})
        try:
            while env.inv.job(job_id)["step"] != "materialize":  # the target sleeps
                await asyncio.sleep(0.05)
            process.send_signal(signal.SIGSTOP)  # alive, silent: a host cut off
            try:
                return await finished(env.inv, job_id, timeout=60)
            finally:
                process.send_signal(signal.SIGCONT)
        finally:
            await engine.close()

    job = asyncio.run(run())
    assert job["state"] == JobState.FAILED
    error = str(job["error"])
    assert "the master target stopped answering during materialize" in error, error
    assert "run a cleanup of slow2" in error, error  # the discard could not reach it either
    # The target went on with the copy once it woke up; the cleanup the error names
    # removes it.
    copy = site.datastore / f"slow2-d0-{job['id']}.vmdk"
    asyncio.run(wait_for(copy.exists))
    done = asyncio.run(env.run(JobKind.CLEANUP, "slow2", {}))
    assert done["state"] == JobState.SUCCEEDED, done["error"]
    assert not copy.exists() and not copy.with_name(copy.stem + "-flat.vmdk").exists()


async def wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.1)
