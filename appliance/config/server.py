"""The configuration server's wire endpoint: enrolment and components' reports.

Peers without a certificate may only enrol (one `enrol` request, then the connection
closes). Peers with one are looked up by serial on every request: a certificate that
was not issued here or has been revoked gets NotAuthorised, and a revoked serial is
also refused at the handshake from then on. The CN of the certificate is who reports;
the kind recorded at issue decides what it may report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from appliance.config.enrolment import Enroller, serve_enrolment
from appliance.config.errors import ConfigServerError
from appliance.config.service import ConfigService
from appliance.wire.connection import Connection
from appliance.wire.errors import InvalidRequest, ProtocolViolation
from appliance.wire.messages import Hello, Request, Welcome
from appliance.wire.rpc import answer

log = logging.getLogger(__name__)
MAX_BODY = 256 * 1024  # reports and CSRs are small; nothing bigger is accepted


class ConfigEndpoint:
    def __init__(
        self,
        service: ConfigService,
        enroller: Enroller,
        name: str,
    ) -> None:
        self.service = service
        self._enroller = enroller
        self.name = name

    async def handle(self, conn: Connection) -> None:
        hello = await conn.recv()
        if not isinstance(hello, Hello):
            raise ProtocolViolation(f"expected HELLO, got {type(hello).__name__}")
        if conn.peer_serial is None:  # no certificate: enrolment is all it may do
            await serve_enrolment(conn, hello, self._enroller, server_name=self.name)
            return
        await conn.send(Welcome(self.name, 0, MAX_BODY))
        while True:
            msg = await conn.recv()
            if not isinstance(msg, Request):
                raise ProtocolViolation(f"expected REQUEST, got {type(msg).__name__}")
            await answer(conn, msg, self._call_for(conn), (ConfigServerError,))

    def _call_for(self, conn: Connection) -> Callable[[str, dict[str, Any]], Any]:
        async def call(method: str, params: dict[str, Any]) -> Any:
            assert conn.peer_serial is not None
            kind = self.service.check_certificate(conn.peer_serial)
            if method == "report":
                return self.service.report(conn.peer, kind, params)
            if method == "group_barrier":  # an agent, frozen, waits for its group
                return await self.service.group_barrier(conn.peer, kind, params)
            raise InvalidRequest(f"unknown method {method!r}")

        return call
