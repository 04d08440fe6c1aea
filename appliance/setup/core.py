"""SetupCore: the setup service's methods, with no D-Bus in sight.

Every method is a coroutine; the blocking work (netlink, fsync'd files, systemd's
API) runs in a worker thread. Changes are serialised by one lock, so two consoles
cannot interleave halves of their changes. After each change the listeners get a
`Changed(what)` — the D-Bus layer turns it into a signal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from appliance.setup import validate
from appliance.setup.enrolment import Enroller
from appliance.setup.errors import Failed
from appliance.setup.hostname import Hostname
from appliance.setup.network import InterfaceConfig, Network, Record
from appliance.setup.networkd import Networkd
from appliance.setup.registration import Registration
from appliance.setup.roles import Role, Roles, parse_roles
from appliance.setup.services import Services, check_unit
from appliance.setup.setupstate import SetupState
from appliance.setup.time import Ntp

_log = logging.getLogger(__name__)

T = TypeVar("T")
VERSION = "1"


@dataclass(frozen=True)
class Changed:
    """Something setup manages changed: network, hostname, ntp, roles, registration."""

    what: str


@dataclass(frozen=True)
class Summary:
    version: str
    hostname: str
    management_interface: str
    config_server: str


Listener = Callable[[Changed], None]


class SetupCore:
    def __init__(
        self,
        network: Network,
        hostname: Hostname,
        ntp: Ntp,
        registration: Registration,
        roles: Roles | None,
        *,
        services: Services | None = None,
        networkd: Networkd | None = None,
        enroller: Enroller | None = None,
        setup_state: SetupState | None = None,
    ) -> None:
        self._network = network
        self._hostname = hostname
        self._ntp = ntp
        self._registration = registration
        self._roles = roles
        self._services = services
        self._networkd = networkd or Networkd("none")
        self._enroller = enroller
        self._setup_state = setup_state
        self._lock = asyncio.Lock()
        self._listeners: list[Listener] = []

    # -- plumbing ----------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _changed(self, what: str) -> None:
        for listener in list(self._listeners):
            listener(Changed(what))

    async def _change(self, what: str, fn: Callable[[], T]) -> T:
        async with self._lock:
            result = await asyncio.to_thread(fn)
        self._changed(what)
        return result

    def _service_manager(self) -> Services:
        if self._services is None:
            raise Failed("units are not managed here: setupd runs without systemd's bus")
        return self._services

    def _role_manager(self) -> Roles:
        if self._roles is None:
            raise Failed("roles are not managed here: setupd runs without systemd's bus")
        return self._roles

    # -- network -----------------------------------------------------------------------

    async def network(self) -> list[Record]:
        return await asyncio.to_thread(self._network.interfaces)

    async def set_interface(self, name: str, settings: dict[str, Any], confirm: bool) -> Record:
        config = InterfaceConfig.from_settings(validate.interface_name(name), settings)

        def apply() -> Record:
            record = self._network.apply(config, confirm)
            # The file is written: networkd takes it now rather than at the next boot.
            return {**record, "networkd": self._networkd.reload()}

        return await self._change("network", apply)

    # -- hostname, time ----------------------------------------------------------------

    async def hostname(self) -> str:
        return await asyncio.to_thread(self._hostname.get)

    async def set_hostname(self, name: str) -> str:
        clean = validate.hostname(name)  # before the lock: refusals are immediate
        return await self._change("hostname", lambda: self._hostname.set(clean))

    async def ntp(self) -> list[str]:
        return await asyncio.to_thread(self._ntp.get)

    async def set_ntp(self, servers: list[str]) -> list[str]:
        for server in servers:
            validate.ntp_server(server)
        return await self._change("ntp", lambda: self._ntp.set(list(servers)))

    # -- roles, registration -----------------------------------------------------------

    async def roles(self) -> dict[str, dict[str, Any]]:
        return await asyncio.to_thread(self._role_manager().get)

    async def set_roles(self, roles: list[str]) -> dict[str, dict[str, Any]]:
        manager = self._role_manager()
        parse_roles(roles)
        return await self._change("roles", lambda: manager.set(list(roles)))

    async def register(self, address: str, passphrase: str) -> dict[str, Any]:
        """Store the registration, then `enrol`."""
        validate.server_address(address)
        where = await self._change(
            "registration", lambda: self._registration.register(address, passphrase)
        )
        return {"config_server": where, "roles": await self.enrol()}

    async def enrol(self) -> dict[str, Any]:
        """Enrol the daemons of the process and target roles enabled now with the
        registered configuration server and start their units; role -> outcome."""
        enroller = self._enroller
        if enroller is None or self._roles is None:
            return {}
        roles = self._roles

        def enrol() -> dict[str, Any]:
            state = roles.get()
            enabled = [r for r in (Role.PROCESS, Role.TARGET) if state[r.value]["enabled"]]
            return enroller.enrol(enabled)

        return await self._change("units", enrol)

    # -- the appliance's units -----------------------------------------------------------

    async def units(self) -> list[dict[str, Any]]:
        """The appliance's units: {unit, active_state, sub_state, result} each."""
        return await asyncio.to_thread(self._service_manager().statuses)

    async def control_unit(self, action: str, unit: str) -> dict[str, Any]:
        """start, stop or restart one of the appliance's units; its state afterwards."""
        services = self._service_manager()
        check_unit(unit, services.allowed)  # refused before the lock: immediately
        return await self._change("units", lambda: services.control(action, unit))

    async def unit_journal(self, unit: str, count: int) -> dict[str, Any]:
        services = self._service_manager()
        result = await asyncio.to_thread(services.journal, unit, count)
        return result.as_record()

    # -- first boot -----------------------------------------------------------------------

    def _state(self) -> SetupState:
        if self._setup_state is None:
            raise Failed("the setup state is not kept here")
        return self._setup_state

    async def first_boot(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._state().read)

    async def finish_setup(self) -> None:
        state = self._state()
        await self._change("setup", state.finish)

    # -- properties --------------------------------------------------------------------

    async def summary(self) -> Summary:
        def read() -> Summary:
            return Summary(
                VERSION,
                self._hostname.get(),
                self._network.management_interface(),
                self._registration.address(),
            )

        return await asyncio.to_thread(read)
