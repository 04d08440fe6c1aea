"""org.secondsite.Config1 on the system bus: a thin translation to `ConfigApi`.

The contract is `org.secondsite.Config1.xml` beside this file; a test compares the
live introspection with it. Every method runs its core coroutine on the asyncio loop
through `CallBridge`; signals are emitted on the GLib thread. Errors: a
`ConfigServerError` leaf becomes `org.secondsite.Config1.Error.<dbus_name>`; anything
else is a bug, logged once with its traceback and answered with the generic `Failed`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import dbus
import dbus.bus
import dbus.service

from appliance.config.api import (
    AlertChanged,
    ConfigApi,
    JobProgress,
    MachineStateChanged,
    Record,
    Signal,
    Summary,
)
from appliance.config.errors import ConfigServerError, InvalidArgument
from appliance.config.groups import GroupApi
from appliance.dbus.bridge import (
    CallBridge,
    ErrorReply,
    Reply,
    from_dbus,
    to_dbus_record,
    to_dbus_records,
)
from appliance.dbus.glib import GLibThread
from appliance.dbus.service import (
    ASYNC,
    Contract,
    ContractObject,
    ServedObject,
    ServeError,
    error_mapper,
    serve,
)

__all__ = ["Config1", "Config1Server", "ServeError", "contract_xml", "map_error", "serve_config1"]

_log = logging.getLogger(__name__)

BUS_NAME = "org.secondsite.Config1"
OBJECT_PATH = "/org/secondsite/Config1"
INTERFACE = "org.secondsite.Config1"
ERROR_PREFIX = "org.secondsite.Config1.Error."
CONTRACT = "org.secondsite.Config1.xml"
MAX_NAME_CHARS = 4096
GENERIC_FAILURE = "internal error; see the configuration server's journal"

_ASYNC = ASYNC
CONTRACT_OF = Contract("appliance.config", CONTRACT, INTERFACE)
#: The D-Bus error for an exception raised while serving a call (see module doc).
map_error = error_mapper(
    ERROR_PREFIX, ConfigServerError, "the configuration server is shutting down",
    GENERIC_FAILURE, _log,
)  # fmt: skip


def contract_xml() -> str:
    """The interface contract shipped beside this module."""
    return CONTRACT_OF.xml()


def _name(value: str, what: str) -> str:
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME_CHARS} characters")
    return str(value)


def _settings(settings: dict[Any, Any]) -> Record:
    for key in settings:
        _name(key, "a setting name")
    record: Record = from_dbus(settings)
    return record


def _one(value: Any) -> tuple[Any, ...]:
    return (value,)


def _none(_value: None) -> tuple[Any, ...]:
    return ()


def _job(job: str) -> tuple[Any, ...]:
    return (dbus.String(job),)


def _record(record: Record) -> tuple[Any, ...]:
    return (to_dbus_record(record),)


def _records(records: list[Record]) -> tuple[Any, ...]:
    return (to_dbus_records(records),)


def _summary_properties(summary: Summary) -> dict[str, Any]:
    return {
        "Version": dbus.String(summary.version),
        "Machines": dbus.UInt32(summary.machines),
        "ProtectedMachines": dbus.UInt32(summary.protected_machines),
        "OpenAlerts": dbus.UInt32(summary.open_alerts),
        "RunningJobs": dbus.UInt32(summary.running_jobs),
        "WorstRpoSeconds": dbus.Double(summary.worst_rpo_seconds),
    }


class Config1(ContractObject):
    """The org.secondsite.Config1 object; methods delegate to a `ConfigApi`."""

    contract = CONTRACT_OF

    def __init__(self, api: ConfigApi, bridge: CallBridge, glib: GLibThread) -> None:
        super().__init__(bridge, glib)
        self._api = api

    # -- reads ---------------------------------------------------------------------

    @dbus.service.method(INTERFACE, in_signature="", out_signature="a{sv}", **_ASYNC)
    def Status(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._api.status, _record)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="aa{sv}", **_ASYNC)
    def ListMachines(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._api.machines, _records)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="a{sv}", **_ASYNC)
    def GetMachine(self, machine: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.machine(_name(machine, "machine"))  # noqa: E731
        self._submit(reply, error, work, _record)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="aa{sv}", **_ASYNC)
    def ListDisks(self, machine: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.disks(_name(machine, "machine"))  # noqa: E731
        self._submit(reply, error, work, _records)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="aa{sv}", **_ASYNC)
    def ListPoints(self, machine: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.points(_name(machine, "machine"))  # noqa: E731
        self._submit(reply, error, work, _records)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="aa{sv}", **_ASYNC)
    def ListServers(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._api.servers, _records)

    @dbus.service.method(INTERFACE, in_signature="b", out_signature="aa{sv}", **_ASYNC)
    def ListJobs(self, include_finished: bool, reply: Reply, error: ErrorReply) -> None:
        work = partial(self._api.jobs, bool(include_finished))
        self._submit(reply, error, work, _records)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="a{sv}", **_ASYNC)
    def GetJob(self, job: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.job(_name(job, "job"))  # noqa: E731
        self._submit(reply, error, work, _record)

    @dbus.service.method(INTERFACE, in_signature="b", out_signature="aa{sv}", **_ASYNC)
    def ListAlerts(self, include_cleared: bool, reply: Reply, error: ErrorReply) -> None:
        work = partial(self._api.alerts, bool(include_cleared))
        self._submit(reply, error, work, _records)

    @dbus.service.method(INTERFACE, in_signature="u", out_signature="aa{sv}", **_ASYNC)
    def ListEvents(self, limit: int, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, partial(self._api.events, int(limit)), _records)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="aa{sv}", **_ASYNC)
    def ListPolicies(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._api.policies, _records)

    # -- changes -------------------------------------------------------------------

    @dbus.service.method(INTERFACE, in_signature="sa{sv}", out_signature="a{sv}", **_ASYNC)
    def SetPolicy(
        self, name: str, settings: dict[str, Any], reply: Reply, error: ErrorReply
    ) -> None:
        work = lambda: self._api.set_policy(_name(name, "policy"), _settings(settings))  # noqa: E731
        self._submit(reply, error, work, _record)

    @dbus.service.method(INTERFACE, in_signature="ss", out_signature="", **_ASYNC)
    def AssignPolicy(self, machine: str, policy: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.assign_policy(  # noqa: E731
            _name(machine, "machine"), _name(policy, "policy")
        )
        self._submit(reply, error, work, _none)

    @dbus.service.method(INTERFACE, in_signature="ss", out_signature="s", **_ASYNC)
    def Protect(self, machine: str, policy: str, reply: Reply, error: ErrorReply) -> None:
        # "" keeps the machine's current policy (D-Bus has no null).
        work = lambda: self._api.protect(  # noqa: E731
            _name(machine, "machine"), _name(policy, "policy") or None
        )
        self._submit(reply, error, work, _job)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="s", **_ASYNC)
    def Unprotect(self, machine: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.unprotect(_name(machine, "machine"))  # noqa: E731
        self._submit(reply, error, work, _job)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="s", **_ASYNC)
    def Resync(self, machine: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.resync(_name(machine, "machine"))  # noqa: E731
        self._submit(reply, error, work, _job)

    # -- failover family -----------------------------------------------------------

    @dbus.service.method(INTERFACE, in_signature="sa{sv}", out_signature="a{sv}", **_ASYNC)
    def SetReplica(
        self, machine: str, settings: dict[Any, Any], reply: Reply, error: ErrorReply
    ) -> None:
        work = lambda: self._api.set_replica(_name(machine, "machine"), _settings(settings))  # noqa: E731
        self._submit(reply, error, work, _record)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="aa{sv}", **_ASYNC)
    def ListVCenters(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._api.vcenter_list, _records)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="aa{sv}", **_ASYNC)
    def ListVMs(self, vcenter: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.vms(_name(vcenter, "vCenter"))  # noqa: E731
        self._submit(reply, error, work, _records)

    @dbus.service.method(INTERFACE, in_signature="sssa{sv}", out_signature="a{sv}", **_ASYNC)
    def ProtectVM(  # noqa: PLR0917 - D-Bus arguments are positional
        self, vm: str, source: str, replica_vcenter: str, options: dict[Any, Any],
        reply: Reply, error: ErrorReply,
    ) -> None:  # fmt: skip
        work = lambda: self._api.protect_vm(  # noqa: E731
            _name(vm, "VM"), _name(source, "vCenter"), _name(replica_vcenter, "vCenter"),
            _settings(options),
        )  # fmt: skip
        self._submit(reply, error, work, _record)

    @dbus.service.method(INTERFACE, in_signature="ssa{sv}", out_signature="s", **_ASYNC)
    def TestFailover(
        self, machine: str, point: str, network_map: dict[Any, Any], reply: Reply,
        error: ErrorReply,
    ) -> None:  # fmt: skip
        work = lambda: self._api.test_failover(  # noqa: E731
            _name(machine, "machine"), _name(point, "point") if point else "",
            _settings(network_map) or None,
        )  # fmt: skip
        self._submit(reply, error, work, _job)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="s", **_ASYNC)
    def Cleanup(self, machine: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.cleanup(_name(machine, "machine"))  # noqa: E731
        self._submit(reply, error, work, _job)

    @dbus.service.method(INTERFACE, in_signature="sss", out_signature="s", **_ASYNC)
    def Failover(
        self, machine: str, point: str, mode: str, reply: Reply, error: ErrorReply
    ) -> None:
        work = lambda: self._api.failover(  # noqa: E731
            _name(machine, "machine"), _name(point, "point") if point else "", _name(mode, "mode")
        )
        self._submit(reply, error, work, _job)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="s", **_ASYNC)
    def Commit(self, machine: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.commit(_name(machine, "machine"))  # noqa: E731
        self._submit(reply, error, work, _job)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="s", **_ASYNC)
    def Cancel(self, machine: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.cancel(_name(machine, "machine"))  # noqa: E731
        self._submit(reply, error, work, _job)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="s", **_ASYNC)
    def Failback(self, machine: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.failback(_name(machine, "machine"))  # noqa: E731
        self._submit(reply, error, work, _job)

    # -- recovery plans ------------------------------------------------------------

    @dbus.service.method(INTERFACE, in_signature="sa{sv}", out_signature="a{sv}", **_ASYNC)
    def SetPlan(self, name: str, spec: dict[Any, Any], reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.set_plan(_name(name, "plan"), _settings(spec))  # noqa: E731
        self._submit(reply, error, work, _record)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="aa{sv}", **_ASYNC)
    def ListPlans(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._api.plans, _records)

    @dbus.service.method(INTERFACE, in_signature="ss", out_signature="s", **_ASYNC)
    def PlanTestFailover(self, name: str, point: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.plan_test_failover(  # noqa: E731
            _name(name, "plan"), _name(point, "point")
        )
        self._submit(reply, error, work, _job)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="s", **_ASYNC)
    def PlanCleanup(self, name: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.plan_cleanup(_name(name, "plan"))  # noqa: E731
        self._submit(reply, error, work, _job)

    @dbus.service.method(INTERFACE, in_signature="sss", out_signature="s", **_ASYNC)
    def PlanFailover(
        self, name: str, point: str, mode: str, reply: Reply, error: ErrorReply
    ) -> None:
        work = lambda: self._api.plan_failover(  # noqa: E731
            _name(name, "plan"), _name(point, "point"), _name(mode, "mode")
        )
        self._submit(reply, error, work, _job)

    # -- consistency groups (appliance.config.groups) -----------------------------------

    @property
    def _groups(self) -> GroupApi:
        return cast(GroupApi, self._api)  # ConfigService implements both

    @dbus.service.method(INTERFACE, in_signature="", out_signature="aa{sv}", **_ASYNC)
    def ListGroups(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, self._groups.groups, _records)

    @dbus.service.method(INTERFACE, in_signature="sa{sv}", out_signature="a{sv}", **_ASYNC)
    def SetGroup(self, name: str, options: dict[Any, Any], reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._groups.set_group(_name(name, "group"), _settings(options))  # noqa: E731
        self._submit(reply, error, work, _record)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="", **_ASYNC)
    def DeleteGroup(self, name: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._groups.delete_group(_name(name, "group"))  # noqa: E731
        self._submit(reply, error, work, _none)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="a{sv}", **_ASYNC)
    def GroupTag(self, name: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._groups.group_tag(_name(name, "group"))  # noqa: E731
        self._submit(reply, error, work, _record)

    # -- root only (units/dbus-1/system.d/org.secondsite.Config1.conf) --------------

    @dbus.service.method(INTERFACE, in_signature="ssssss", out_signature="a{sv}", **_ASYNC)
    def RegisterVCenter(  # noqa: PLR0917 - D-Bus arguments are positional
        self, name: str, site: str, address: str, user: str, password: str, thumbprint: str,
        reply: Reply, error: ErrorReply,
    ) -> None:  # fmt: skip
        work = lambda: self._api.register_vcenter(  # noqa: E731
            _name(name, "name"), site=site, address=_name(address, "address"),
            user=_name(user, "user"), password=password, thumbprint=thumbprint,
        )  # fmt: skip
        self._submit(reply, error, work, _record)

    @dbus.service.method(INTERFACE, in_signature="sss", out_signature="a{sv}", **_ASYNC)
    def SetVCenterCredentials(
        self, name: str, user: str, password: str, reply: Reply, error: ErrorReply
    ) -> None:
        work = lambda: self._api.set_vcenter_credentials(  # noqa: E731
            _name(name, "name"), user=_name(user, "user"), password=password
        )
        self._submit(reply, error, work, _record)

    # PushInstall and PushUninstall: root and the secondsite group (the console).

    @dbus.service.method(INTERFACE, in_signature="sa{sv}", out_signature="s", **_ASYNC)
    def PushInstall(
        self, host: str, options: dict[Any, Any], reply: Reply, error: ErrorReply
    ) -> None:
        work = lambda: self._api.push_install(_name(host, "host"), _settings(options))  # noqa: E731
        self._submit(reply, error, work, _job)

    @dbus.service.method(INTERFACE, in_signature="sa{sv}", out_signature="s", **_ASYNC)
    def PushUninstall(
        self, host: str, options: dict[Any, Any], reply: Reply, error: ErrorReply
    ) -> None:
        work = lambda: self._api.push_uninstall(_name(host, "host"), _settings(options))  # noqa: E731
        self._submit(reply, error, work, _job)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="a{sv}", **_ASYNC)
    def GetPassphrase(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, partial(self._api.passphrase, False), _record)

    @dbus.service.method(INTERFACE, in_signature="", out_signature="a{sv}", **_ASYNC)
    def RotatePassphrase(self, reply: Reply, error: ErrorReply) -> None:
        self._submit(reply, error, partial(self._api.passphrase, True), _record)

    @dbus.service.method(INTERFACE, in_signature="s", out_signature="", **_ASYNC)
    def Revoke(self, name: str, reply: Reply, error: ErrorReply) -> None:
        work = lambda: self._api.revoke(_name(name, "name"))  # noqa: E731
        self._submit(reply, error, work, _none)

    # -- properties (read-only, from ConfigApi.summary on the loop) -----------------

    async def _properties(self) -> dict[str, Any]:
        return _summary_properties(self._api.summary())

    # -- signals (emitted on the GLib thread) -----------------------------------------

    @dbus.service.signal(INTERFACE, signature="sssd")
    def JobProgress(self, job: str, state: str, step: str, percent: float) -> None:
        """A job moved on."""

    @dbus.service.signal(INTERFACE, signature="sssbs")
    def AlertChanged(self, alert: str, subject: str, kind: str, active: bool, message: str) -> None:
        """An alert was raised or cleared."""

    @dbus.service.signal(INTERFACE, signature="ss")
    def MachineStateChanged(self, machine: str, state: str) -> None:
        """A machine's replication state changed."""

    def notify(self, signal: Signal) -> None:
        """The `ConfigApi.subscribe` listener: called on the loop, emits on GLib."""
        self._glib.call_soon(partial(self._emit, signal))

    def _emit(self, signal: Signal) -> None:
        if isinstance(signal, JobProgress):
            self.JobProgress(
                dbus.String(signal.job),
                dbus.String(signal.state),
                dbus.String(signal.step),
                dbus.Double(signal.percent),
            )
        elif isinstance(signal, AlertChanged):
            self.AlertChanged(
                dbus.String(signal.alert),
                dbus.String(signal.subject),
                dbus.String(signal.kind),
                dbus.Boolean(signal.active),
                dbus.String(signal.message),
            )
        elif isinstance(signal, MachineStateChanged):
            self.MachineStateChanged(dbus.String(signal.machine), dbus.String(signal.state))
        else:
            raise TypeError(f"unknown signal {signal!r}")


#: The handle `serve_config1` returns.
Config1Server = ServedObject


def serve_config1(
    api: ConfigApi, loop: asyncio.AbstractEventLoop, bus_address: str | None = None
) -> Config1Server:
    """Put `api` on the bus as org.secondsite.Config1 and return the handle to close.

    `bus_address` None means the system bus. Blocks briefly for the bus handshake;
    call it on `loop`'s thread (or before the loop runs) since it subscribes to
    `api`. Raises ServeError when the bus is unreachable or the name cannot be owned.
    """

    def subscribe(obj: ContractObject) -> Callable[[], None]:
        assert isinstance(obj, Config1)
        return api.subscribe(obj.notify)

    return ServedObject(*serve(
        bus_name=BUS_NAME, object_path=OBJECT_PATH, thread_name="configd-dbus",
        make=lambda bridge, glib: Config1(api, bridge, glib), subscribe=subscribe,
        map_error=map_error, loop=loop, bus_address=bus_address,
        policy_hint="is org.secondsite.Config1.conf (units/dbus-1/system.d/) installed in "
        "/usr/share/dbus-1/system.d, and is the server running as root or secondsite?",
    ))  # fmt: skip
