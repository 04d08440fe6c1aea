"""Reporting to the configuration server: one connection, a report every few seconds.

Every enrolled component (agent, process server, master target) runs a `Reporter`.
It keeps one TLS connection to the configuration server, sends a `report` request
built by its owner every `interval` seconds, and hands each answer back (what to
protect, which certificates are revoked, the next interval). A lost server is retried
with the capped backoff; the owner keeps working meanwhile — replication never waits
for the configuration server.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.wire.connection import Connection, open_connection
from appliance.wire.errors import WireError
from appliance.wire.messages import Error, Hello, Request, Response
from appliance.wire.reconnect import Backoff

log = logging.getLogger(__name__)

Build = Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]]
OnAnswer = Callable[[dict[str, Any]], Awaitable[None] | None]


class ReportRefused(Exception):
    """The configuration server answered ok=false (revoked, unknown, malformed)."""


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Reporter:
    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        name: str,
        role: str,
        build: Build,
        on_answer: OnAnswer,
        interval: float = 10.0,
        server_hostname: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.host, self.port = host, port
        self.name, self.role = name, role
        self.interval = interval
        self.connected = False
        self.reports = 0
        self.last_error: str | None = None
        self._ssl = ssl_context
        self._build = build
        self._on_answer = on_answer
        self._server_hostname = server_hostname or host
        self._timeout = timeout
        self._backoff = Backoff()
        self._wake = asyncio.Event()
        self._request_id = 0

    def report_now(self) -> None:
        """Send the next report without waiting for the interval (something changed)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, WireError, ReportRefused) as exc:
                self.connected = False
                if self.last_error != str(exc):
                    log.warning("configuration server %s:%d: %s", self.host, self.port, exc)
                self.last_error = str(exc)
            await asyncio.sleep(self._backoff.next_delay())

    async def _session(self) -> None:
        conn = await open_connection(
            self.host,
            self.port,
            self._ssl,
            server_hostname=self._server_hostname,
            timeout=self._timeout,
        )
        try:
            await conn.send(Hello(self.role, self.name))
            await self._expect(conn, None)
            while True:
                answer = await self._report(conn)
                self.connected = True
                self.reports += 1
                self.last_error = None
                self._backoff.reset()
                interval = answer.get("report_interval")
                if isinstance(interval, int | float) and 0.1 <= interval <= 3600:
                    self.interval = float(interval)
                await _maybe_await(self._on_answer(answer))
                self._wake.clear()
                try:
                    async with asyncio.timeout(self.interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            conn.close()

    async def _report(self, conn: Connection) -> dict[str, Any]:
        body = await _maybe_await(self._build())
        self._request_id += 1
        await conn.send(Request(self._request_id, "report", json.dumps(body).encode()))
        reply = await self._expect(conn, self._request_id)
        assert isinstance(reply, Response)
        result = reply.json()
        if not reply.ok:
            message = result.get("message") if isinstance(result, dict) else result
            raise ReportRefused(f"report refused: {message}")
        if not isinstance(result, dict):
            raise ReportRefused(f"the answer is not an object: {result!r}")
        return result

    async def _expect(self, conn: Connection, request_id: int | None) -> Any:
        async with asyncio.timeout(self._timeout):
            while True:
                msg = await conn.recv()
                if isinstance(msg, Error):
                    raise ReportRefused(f"{getattr(msg.code, 'name', msg.code)}: {msg.message}")
                if request_id is None or (
                    isinstance(msg, Response) and msg.request_id == request_id
                ):
                    return msg
