"""A recovery plan of one consistency group fails over to the group's common point.

Reuses test_failover's site (a real secondsite-targetd on vcsim's datastore): two
machines' replicas are streamed with group tags — slot 100 on both, slot 200 on one
only (as when a member's freeze overran) — and the plan runs through a real
ConfigService: every child picks group:erp:100, the newest point BOTH members have.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from appliance.config.errors import InvalidArgument
from appliance.config.model import JobKind, JobState
from appliance.config.passphrase import PassphraseStore
from appliance.config.service import ConfigService, ServiceSettings
from appliance.wire.messages import TagKind
from tests.config import test_failover
from tests.config.test_failover import Disk, Env, finished
from tests.conftest import TlsMaterial

site = test_failover.site  # the fixtures, shared
env = test_failover.env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def children(env: Env, plan_job: str) -> list[dict[str, Any]]:
    return [j for j in env.inv.jobs(True) if (j["params"] or {}).get("plan_job") == plan_job]


def test_a_plan_of_one_group_fails_over_to_the_common_point(
    env: Env, tls: TlsMaterial, tmp_path: Path
) -> None:
    db, app = Disk("gdb-d0", "gdb"), Disk("gapp-d0", "gapp")

    async def stream() -> None:
        for disk in (db, app):
            await disk.send(env.site, tls, 8, "group:erp:100", TagKind.CRASH)
        await db.send(env.site, tls, 8, "group:erp:200", TagKind.CRASH)  # gapp lacks it
        for disk in (db, app):
            await disk.send(env.site, tls, 4, f"{disk.machine}-own", TagKind.CRASH)

    asyncio.run(stream())
    for name in ("gdb", "gapp"):
        env.machine(name)

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        env.ops.loop = asyncio.get_running_loop()
        service = ConfigService(env.inv, PassphraseStore(tmp_path / "pp.json"),
                                ServiceSettings(), target_call=env.ops.target_call,
                                vcenters=env.vcenters)  # fmt: skip
        try:
            await service.set_plan("gplan", {"groups": [{"machines": ["gdb"]},
                                                        {"machines": ["gapp"]}]})  # fmt: skip
            # Not one group yet: "latest-group" is refused, the default is "latest".
            with pytest.raises(InvalidArgument, match="in one consistency group"):
                await service.plan_test_failover("gplan", "latest-group")
            await service.set_group("erp", {"add": ["gdb", "gapp"]})
            assert (await service.groups())[0]["point"]["tag"] == "group:erp:100"
            drill = await finished(env.inv, await service.plan_test_failover("gplan", ""))
            cleanup = await finished(env.inv, await service.plan_cleanup("gplan"))
            assert cleanup["state"] == JobState.SUCCEEDED, cleanup["error"]
            return drill, cleanup
        finally:
            await service.engine.close()

    drill, _ = asyncio.run(run())
    assert drill["state"] == JobState.SUCCEEDED, drill["error"]
    assert drill["params"]["point"] == "group:erp:100"  # fixed when it was submitted
    kids = children(env, drill["id"])
    assert {k["subject"] for k in kids} == {"gdb", "gapp"}
    for kid in kids:
        assert kid["kind"] == JobKind.TEST_FAILOVER
        assert kid["result"]["point"]["tag"] == "group:erp:100"
