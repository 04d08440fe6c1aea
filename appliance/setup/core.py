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
from appliance.setup.errors import Failed
from appliance.setup.hostname import Hostname
from appliance.setup.network import InterfaceConfig, Network, Record
from appliance.setup.registration import Registration
from appliance.setup.roles import Roles, parse_roles
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
    ) -> None:
        self._network = network
        self._hostname = hostname
        self._ntp = ntp
        self._registration = registration
        self._roles = roles
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

    def _role_manager(self) -> Roles:
        if self._roles is None:
            raise Failed("roles are not managed here: setupd runs without systemd's bus")
        return self._roles

    # -- network -----------------------------------------------------------------------

    async def network(self) -> list[Record]:
        return await asyncio.to_thread(self._network.interfaces)

    async def set_interface(self, name: str, settings: dict[str, Any], confirm: bool) -> Record:
        config = InterfaceConfig.from_settings(validate.interface_name(name), settings)
        return await self._change("network", lambda: self._network.apply(config, confirm))

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

    async def register(self, address: str, passphrase: str) -> str:
        validate.server_address(address)
        return await self._change(
            "registration", lambda: self._registration.register(address, passphrase)
        )

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
