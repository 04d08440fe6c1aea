"""Calling the master targets' control RPC (points, materialise) from the configuration server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from appliance.config.errors import ConfigServerError
from appliance.settings import parse_host_port
from appliance.wire.connection import open_connection
from appliance.wire.errors import WireError
from appliance.wire.messages import Hello, Request, Response
from appliance.wire.tls import client_context


class TargetClient:
    """One short connection per call: these calls are rare (an operator asked)."""

    def __init__(self, cert: Path, key: Path, ca: Path, *, name: str, timeout: float = 30.0):
        self._ssl = client_context(cert, key, ca)
        self._name = name
        self._timeout = timeout

    async def call(self, address: str, method: str, params: dict[str, Any]) -> Any:
        host, port = parse_host_port(address)
        try:
            async with asyncio.timeout(self._timeout):
                conn = await open_connection(host, port, self._ssl, server_hostname=host)
                try:
                    await conn.send(Hello("admin", self._name))
                    await conn.recv()
                    await conn.send(Request.make(1, method, **params))
                    while not isinstance(reply := await conn.recv(), Response):
                        pass
                finally:
                    conn.close()
        except (OSError, TimeoutError, WireError) as exc:
            raise ConfigServerError(f"master target {address} unreachable: {exc}") from None
        result = reply.json()
        if not reply.ok:
            message = result.get("message") if isinstance(result, dict) else result
            raise ConfigServerError(f"master target {address}: {method} failed: {message}")
        return result
