"""The configuration server's failover, plan, vCenter and push-install entry points.

A mixin of `ConfigService` (service.py), kept apart so that module stays about the
inventory, reports and health; these methods only validate and submit jobs (their
steps live in failover.py, drill.py, failback.py, plans.py and push.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.config import plans, protect_vm, push
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
    "key": (str, False), "password": (str, False),  # one of the two
    "disks": (list, True), "user": (str, False), "port": (int, False),
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
    plan_group_point: Callable[[list[str], str], Awaitable[str]]  # groups.GroupEntryPoints
    fresh_group_point: Callable[[str], Awaitable[Record]]

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

    async def set_vcenter_credentials(self, name: str, *, user: str, password: str) -> Record:
        """New credentials for a registered vCenter (its password was changed), checked
        by logging in with them before they replace the stored ones."""
        if self.vcenters is None:
            raise ConfigServerError("vCenter support is not configured on this server")
        _name(user, "user")
        store = self.vcenters
        await asyncio.to_thread(store.set_credentials, name, Credentials(user, password))
        self.inventory.add_event("info", name, "vcenter", f"vCenter {name}: credentials "
                                 f"changed (user {user})", self._clock())  # fmt: skip
        return next(v for v in self.inventory.vcenters() if v["name"] == name)

    async def vms(self, vcenter: str) -> list[Record]:
        store = self._vcenter_store()
        machines = self.inventory.machines()
        return await asyncio.to_thread(protect_vm.list_vms, store, machines, vcenter)

    async def protect_vm(
        self, vm: str, source: str, replica_vcenter: str, options: Record
    ) -> Record:
        store = self._vcenter_store()
        network_map = options.get("network_map") or {}
        if not isinstance(network_map, dict):
            raise InvalidArgument("network_map must map NICs or networks to port groups")
        placement = {k: v for k, v in options.items() if k != "network_map"}
        made: Record = await asyncio.to_thread(
            protect_vm.protect_vm, store, self.inventory.machines(), vm, source=source,
            replica_vcenter=replica_vcenter, placement=placement,
            network_map={str(k): str(v) for k, v in network_map.items()},
        )  # fmt: skip
        self.inventory.update_machine(made["machine"], replica=made["replica"])
        self.inventory.add_event("info", made["machine"], "replica", f"protected as VM "
                                 f"{made['vm']} of vCenter {source}", self._clock())  # fmt: skip
        return made

    def _vcenter_store(self) -> VCenterStore:
        if self.vcenters is None:
            raise ConfigServerError("vCenter support is not configured on this server")
        return self.vcenters

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

    async def _plan_point(self, name: str, point: str) -> str | float:
        """ "latest-group" (the default for a plan of one consistency group's machines)
        becomes the group's newest common point, checked now and fixed in the job."""
        spec = self.inventory.plan(_name(name, "plan"))["spec"]
        machines = [m for g in spec["groups"] for m in g["machines"]]
        return plans.plan_point(await self.plan_group_point(machines, point))

    async def plan_test_failover(self, name: str, point: str) -> str:
        point_ = await self._plan_point(name, point)
        return self._plan_job(JobKind.PLAN_TEST_FAILOVER, name, {"point": point_})

    async def plan_cleanup(self, name: str) -> str:
        return self._plan_job(JobKind.PLAN_CLEANUP, name, {})

    async def plan_failover(self, name: str, point: str, mode: str) -> str:
        if mode not in ("planned", "unplanned"):
            raise InvalidArgument("mode must be planned or unplanned")
        params: Record = {"point": await self._plan_point(name, point), "mode": mode}
        if mode == "planned" and point in ("", "latest-group"):
            # A planned failover of a group: a fresh group point, waited for by the job.
            params |= await self.fresh_group_point(str(params["point"]))
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
        return self._push_job(JobKind.PUSH_INSTALL, host, options)

    async def push_uninstall(self, host: str, options: Record) -> str:
        """A job in which a process server removes the agent from `host` over SSH, then
        the machine's certificates are revoked and the machine forgotten."""
        _name(host, "host")
        if self._push_call is None:
            raise ConfigServerError("push installation is not configured on this server")
        allowed = ("key", "password", "user", "port", "machine", "accept_fingerprint", "prefix")
        unknown = set(options) - set(allowed)
        if unknown:
            raise InvalidArgument(f"unknown options: {', '.join(sorted(unknown))}")
        for key in allowed:
            kind = PUSH_OPTIONS[key][0]
            if key in options and not isinstance(options[key], kind):
                raise InvalidArgument(f"option {key} must be {kind.__name__}")
        return self._push_job(JobKind.PUSH_UNINSTALL, host, options)

    def _push_job(self, kind: JobKind, host: str, options: Record) -> str:
        if bool(options.get("key")) == bool(options.get("password")):
            raise InvalidArgument("give either option key or option password")
        secret = ("key", "password")  # never stored: held in memory for the job
        params = {k: v for k, v in options.items() if k not in secret}
        params |= {"host": host, "machine": options.get("machine") or host}
        _name(params["machine"], "machine")
        job = self.engine.submit(kind, push.subject(host), params)
        self._push_keys[job] = push.credentials(options)  # before the job's task first runs
        return job
