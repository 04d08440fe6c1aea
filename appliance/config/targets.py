"""Calling the role daemons' control RPC (master targets: points, materialise; process
servers: push_install) from the configuration server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Protocol

from appliance.config.errors import ConfigServerError
from appliance.settings import parse_host_port
from appliance.wire.connection import open_connection
from appliance.wire.errors import WireError
from appliance.wire.messages import Hello, Request, Response
from appliance.wire.tls import client_context


class TargetCall(Protocol):
    """`TargetClient.call`: a control RPC; `timeout` None is the client's default."""

    def __call__(
        self, address: str, method: str, params: dict[str, Any], *, timeout: float | None = None
    ) -> Awaitable[Any]: ...


class RemoteRefused(ConfigServerError):
    """The daemon answered ok=false; `detail` is its error record ({"error", "message",
    maybe "hint", "fingerprint"})."""

    def __init__(self, message: str, detail: dict[str, Any]) -> None:
        super().__init__(message)
        self.detail = detail


#: A pseudo-method of `TargetClient.call`: only the Hellos are exchanged, no request.
#: It proves the daemon's event loop answers even while every control thread is busy
#: with a long copy, so it is how a long call's waiter knows the target is still there.
PING = "ping"


class TargetClient:
    """One short connection per call: these calls are rare (an operator asked)."""

    def __init__(self, cert: Path, key: Path, ca: Path, *, name: str, timeout: float = 30.0):
        self._ssl = client_context(cert, key, ca)
        self._name = name
        self._timeout = timeout

    async def call(
        self, address: str, method: str, params: dict[str, Any], *, timeout: float | None = None
    ) -> Any:
        host, port = parse_host_port(address)
        limit = timeout or self._timeout
        try:
            async with asyncio.timeout(limit):
                conn = await open_connection(host, port, self._ssl, server_hostname=host)
                try:
                    await conn.send(Hello("admin", self._name))
                    await conn.recv()
                    if method == PING:
                        return {}
                    await conn.send(Request.make(1, method, **params))
                    while not isinstance(reply := await conn.recv(), Response):
                        pass
                finally:
                    conn.close()
        except TimeoutError:
            raise ConfigServerError(f"{address} unreachable: no answer in {limit:g} s") from None
        except (OSError, WireError) as exc:
            raise ConfigServerError(f"{address} unreachable: {exc}") from None
        result = reply.json()
        if not reply.ok:
            detail = result if isinstance(result, dict) else {"message": str(result)}
            message = detail.get("message")
            raise RemoteRefused(f"{address}: {method} failed: {message}", detail)
        return result
