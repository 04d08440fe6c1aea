"""The configuration server's failover, plan, vCenter and push-install entry points.

A mixin of `ConfigService` (service.py), kept apart so that module stays about the
inventory, reports and health; these methods only validate and submit jobs (their
steps live in failover.py, drill.py, failback.py, plans.py and push.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.config import plans, push
from appliance.config.api import Record
from appliance.config.errors import ConfigServerError, InvalidArgument
from appliance.config.inventory import Inventory
from appliance.config.jobs import JobEngine
from appliance.config.model import JobKind
from appliance.config.replica import ReplicaSettings
from appliance.config.validation import name as _name
from appliance.config.vcenters import Credentials, VCenterStore

#: push_install's options: name -> (type, required).
PUSH_OPTIONS: dict[str, tuple[type, bool]] = {
    "key": (str, True), "disks": (list, True), "user": (str, False), "port": (int, False),
    "machine": (str, False), "accept_fingerprint": (str, False), "server": (str, False),
    "prefix": (str, False), "start_without_systemd": (bool, False),  # these two: tests only
}  # fmt: skip


class FailoverEntryPoints:
    """Needs from its host class: the inventory, the engine, the vCenter store, the
    target and push calls, the clock, and the in-memory push keys."""

    inventory: Inventory
    engine: JobEngine
    vcenters: VCenterStore | None
    _target_call: Callable[[str, str, dict[str, Any]], Awaitable[Any]] | None
    _push_call: Callable[[str, str, dict[str, Any], float], Awaitable[Any]] | None
    _push_keys: dict[str, str]
    _clock: Callable[[], float]

    # -- failover family (appliance.config.failover, drill) ---------------------------

    def _failover_job(
        self, kind: JobKind, machine: str, params: Record, *, is_machine: bool = True
    ) -> str:
        if is_machine:
            self.inventory.machine(_name(machine, "machine"))
        if self.vcenters is None or self._target_call is None:
            raise ConfigServerError("failover is not configured on this server")
        return self.engine.submit(kind, machine, params)

    async def test_failover(self, machine: str, point: str, network_map: Record | None) -> str:
        params: Record = {"point": point or "latest"}
        if network_map:
            params["network_map"] = network_map
        return self._failover_job(JobKind.TEST_FAILOVER, machine, params)

    async def set_replica(self, machine: str, settings: Record) -> Record:
        self.inventory.machine(_name(machine, "machine"))
        ReplicaSettings.parse(settings)
        replica: Record = self.inventory.update_machine(machine, replica=settings)["replica"]
        return replica

    async def vcenter_list(self) -> list[Record]:
        return self.inventory.vcenters()

    async def register_vcenter(
        self, name: str, *, site: str, address: str, user: str, password: str, thumbprint: str
    ) -> Record:
        if self.vcenters is None:
            raise ConfigServerError("vCenter support is not configured on this server")
        store = self.vcenters
        for value, what in ((name, "name"), (address, "address"), (user, "user")):
            _name(value, what)
        if not thumbprint:
            seen = await asyncio.to_thread(store.probe, address)
            raise InvalidArgument(
                f"vCenter {address} presents the certificate with SHA-256 thumbprint {seen}; "
                "check it against the vCenter's own and register again with that thumbprint"
            )
        site = site or "secondary"
        if not any(s["name"] == site for s in self.inventory.sites()):
            self.inventory.add_site(site, "secondary")
        record: Record = await asyncio.to_thread(
            store.register, name, site, address, Credentials(user, password), thumbprint
        )
        self.inventory.add_event("info", name, "vcenter", f"vCenter {name} ({address}) "
                                 "registered", self._clock())  # fmt: skip
        return record

    async def cleanup(self, machine: str) -> str:
        return self._failover_job(JobKind.CLEANUP, machine, {})

    async def failover(self, machine: str, point: str, mode: str) -> str:
        if mode not in ("planned", "unplanned"):
            raise InvalidArgument("mode must be planned or unplanned")
        return self._failover_job(
            JobKind.FAILOVER, machine, {"point": point or "latest", "mode": mode}
        )

    async def commit(self, machine: str) -> str:
        return self._failover_job(JobKind.COMMIT, machine, {})

    async def cancel(self, machine: str) -> str:
        return self._failover_job(JobKind.CANCEL, machine, {})

    async def failback(self, machine: str) -> str:
        return self._failover_job(JobKind.FAILBACK, machine, {})

    # -- recovery plans (appliance.config.plans) -----------------------------------------

    async def set_plan(self, name: str, spec: Record) -> Record:
        known = {m["name"] for m in self.inventory.machines()}
        parsed = plans.PlanSpec.parse(spec, known)
        return self.inventory.set_plan(_name(name, "plan"), parsed.record())

    async def plans(self) -> list[Record]:
        return self.inventory.plans()

    def _submit_child(self, kind: JobKind, machine: str, params: Record) -> str:
        # A method, not `self.engine.submit`: the engine is made after the definitions.
        return self.engine.submit(kind, machine, params)

    def _plan_job(self, kind: JobKind, name: str, params: Record) -> str:
        # The spec is copied into the job: a restart resumes the plan that was started.
        spec = self.inventory.plan(_name(name, "plan"))["spec"]
        params = {"plan": name, "spec": spec, **params}
        return self._failover_job(kind, plans.subject(name), params, is_machine=False)

    async def plan_test_failover(self, name: str, point: str) -> str:
        point_ = plans.plan_point(point)
        return self._plan_job(JobKind.PLAN_TEST_FAILOVER, name, {"point": point_})

    async def plan_cleanup(self, name: str) -> str:
        return self._plan_job(JobKind.PLAN_CLEANUP, name, {})

    async def plan_failover(self, name: str, point: str, mode: str) -> str:
        if mode not in ("planned", "unplanned"):
            raise InvalidArgument("mode must be planned or unplanned")
        params = {"point": plans.plan_point(point), "mode": mode}
        return self._plan_job(JobKind.PLAN_FAILOVER, name, params)

    async def push_install(self, host: str, options: Record) -> str:
        """A job in which a process server installs the agent on `host` over SSH."""
        _name(host, "host")
        if self._push_call is None:
            raise ConfigServerError("push installation is not configured on this server")
        unknown = set(options) - set(PUSH_OPTIONS)
        if unknown:
            raise InvalidArgument(f"unknown options: {', '.join(sorted(unknown))}")
        for key, (kind, required) in PUSH_OPTIONS.items():
            if required and not options.get(key):
                raise InvalidArgument(f"option {key} is required")
            if key in options and not isinstance(options[key], kind):
                raise InvalidArgument(f"option {key} must be {kind.__name__}")
        if not all(isinstance(d, str) and d.startswith("/") for d in options["disks"]):
            raise InvalidArgument("disks must be device paths, e.g. /dev/sdb")
        params = {k: v for k, v in options.items() if k != "key"}  # the key: never stored
        params |= {"host": host, "machine": options.get("machine") or host}
        _name(params["machine"], "machine")
        job = self.engine.submit(JobKind.PUSH_INSTALL, push.subject(host), params)
        self._push_keys[job] = options["key"]  # before the job's task first runs
        return job
