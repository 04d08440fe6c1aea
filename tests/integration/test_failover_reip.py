"""Re-IP at failover, proven on vcsim: the replica settings' per-NIC address is queued
as a guest customization on the new VM and applied when the job powers it on.

The site and jobs are tests/config/test_failover.py's (vcsim, a real targetd fed by the
test, a real JobEngine); vcsim's simulator applies a customization at power-on the way
VMware Tools would (guest.net, guest.ipAddress, guest.hostName).
"""

from __future__ import annotations

import asyncio

import pytest

from appliance.config.model import JobKind, JobState
from appliance.vsphere.session import Session, connect
from appliance.vsphere.vms import find_vm
from tests.config.test_failover import Env, feed, settings_for
from tests.config.test_failover import env as env  # noqa: PLC0414 - the fixtures, re-exported
from tests.config.test_failover import site as site  # noqa: PLC0414
from tests.conftest import TlsMaterial
from tests.vsphere.conftest import endpoint_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REIP = {"reip": {"eth0": {"address": "10.9.0.5/24", "gateway": "10.9.0.1"}},
        "dns_servers": ["10.9.0.53"], "dns_domain": "dr.example"}  # fmt: skip


def session(env: Env) -> Session:
    return connect(endpoint_for(env.site.vcsim))


def test_failover_applies_the_replica_address(env: Env, tls: TlsMaterial) -> None:
    feed(env.site, tls, "reip1")
    env.inv.add_machine("reip1", "reip1.prod.example", now=0.0)
    settings = settings_for(env.site.inventory, env.site.datastore, **REIP)
    env.inv.update_machine("reip1", master_target="mt1", replica=settings,
                           protection_enabled=True)  # fmt: skip

    job = asyncio.run(env.run(JobKind.FAILOVER, "reip1", {"point": "reip1-p1"}))
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    with session(env) as s:
        vm = find_vm(s, "reip1", job["result"]["owner"])
        assert vm is not None
        assert vm.guest.ipAddress == "10.9.0.5"
        assert [list(n.ipAddress) for n in vm.guest.net] == [["10.9.0.5"]]
        assert vm.guest.hostName == "reip1"  # the machine's short host name
        assert not vm.config.tools.pendingCustomization

    done = asyncio.run(env.run(JobKind.CANCEL, "reip1", {}))
    assert done["state"] == JobState.SUCCEEDED, done["error"]


def test_a_drill_does_not_re_ip(env: Env, tls: TlsMaterial) -> None:
    feed(env.site, tls, "reip2")
    env.inv.add_machine("reip2", "reip2", now=0.0)
    settings = settings_for(env.site.inventory, env.site.datastore, **REIP)
    env.inv.update_machine("reip2", master_target="mt1", replica=settings,
                           protection_enabled=True)  # fmt: skip
    job = asyncio.run(env.run(JobKind.TEST_FAILOVER, "reip2", {"point": "reip2-p1"}))
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    with session(env) as s:
        vm = find_vm(s, "reip2-test", job["id"])
        assert vm is not None
        assert vm.guest.ipAddress != "10.9.0.5"
    done = asyncio.run(env.run(JobKind.CLEANUP, "reip2", {}))
    assert done["state"] == JobState.SUCCEEDED, done["error"]
