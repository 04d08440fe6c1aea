"""A small synchronous client for the role daemons' control RPCs (TLS, Hello, Request)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from appliance.daemon.cli import Unavailable
from appliance.wire.connection import open_connection
from appliance.wire.errors import WireError
from appliance.wire.messages import Hello, Request, Response
from appliance.wire.tls import client_context


class RpcFailed(Unavailable):
    pass


Creds = tuple[Path, Path, Path]  # cert, key, CA


async def _call(port: int, creds: Creds, method: str, params: dict[str, Any]) -> Any:
    ctx = client_context(*creds)
    # The lab's daemons enrolled advertising 127.0.0.1: their certificates carry it.
    conn = await open_connection("127.0.0.1", port, ctx, server_hostname="127.0.0.1")
    try:
        await conn.send(Hello("admin", "secondsite-lab"))
        await conn.recv()
        await conn.send(Request.make(1, method, **params))
        while not isinstance(reply := await conn.recv(), Response):
            pass
        result = json.loads(reply.result or b"null")
        if not reply.ok:
            message = result.get("message", result) if isinstance(result, dict) else result
            raise RpcFailed(f"{method} failed: {message}")
        return result
    finally:
        conn.close()


def call(port: int, creds: Creds, method: str, timeout: float = 600, **params: Any) -> Any:
    """One control call to the daemon on 127.0.0.1:`port`; its JSON result."""
    try:
        return asyncio.run(asyncio.wait_for(_call(port, creds, method, params), timeout))
    except (OSError, WireError, TimeoutError) as exc:
        raise RpcFailed(
            f"cannot reach the daemon on 127.0.0.1:{port} ({method}): {exc}",
            "is the lab up? see 'secondsite-lab status' and the logs in the state directory",
        ) from None
