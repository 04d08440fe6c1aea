"""The configuration server's wire endpoint in one process: enrol, report, revoke.

Real TLS over loopback, the real CA, passphrase store, inventory, service and
Reporter; only the daemons around them are absent.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.config.ca import CertificateAuthority, Issued
from appliance.config.enrolment import Enroller, EnrolRequest, enrolment_server_context
from appliance.config.inventory import Inventory
from appliance.config.model import ComponentKind
from appliance.config.passphrase import PassphraseStore
from appliance.config.server import MAX_BODY, ConfigEndpoint
from appliance.config.service import ConfigService, ServiceSettings
from appliance.wire.connection import open_connection, start_server
from appliance.wire.enrol import EnrolFailed, Enrolment, enrol
from appliance.wire.errors import ErrorCounters, WireError
from appliance.wire.heartbeat import Reporter
from appliance.wire.server import WireServer
from appliance.wire.tls import client_context


@dataclass
class Configd:
    service: ConfigService
    inventory: Inventory
    server: WireServer
    passphrase: str
    port: int


@asynccontextmanager
async def configd(tmp_path: Path) -> AsyncIterator[Configd]:
    ca = CertificateAuthority.open_or_create(tmp_path / "ca")
    cert, key = ca.issue_local("localhost", ComponentKind.CONFIG, ["localhost"], tmp_path / "tls")
    inventory = Inventory.open(tmp_path / "inv.db")
    passphrases = PassphraseStore(tmp_path / "pp.json")
    service = ConfigService(inventory, passphrases, ServiceSettings(report_interval=0.05))

    def register(request: EnrolRequest, issued: Issued) -> dict[str, Any]:
        inventory.add_certificate(issued.serial, request.name, request.kind, 0, issued.not_after)
        return service.register(request.name, request.kind, request.facts)

    enroller = Enroller(
        ca, passphrases, ssl.PEM_cert_to_DER_cert(cert.read_text()), register=register,
        remember_csr=lambda fp, name: inventory.remember_csr(fp, name, 0.0),
        event=lambda sev, subject, msg: inventory.add_event(sev, subject, "enrolment", msg, 0.0),
    )  # fmt: skip
    endpoint = ConfigEndpoint(service, enroller, "localhost")
    server = await start_server(
        endpoint.handle, "127.0.0.1", 0, enrolment_server_context(cert, key, ca.ca_path),
        counters=ErrorCounters(), max_body=MAX_BODY, allow_anonymous=True,
    )  # fmt: skip
    service.on_revoke = server.revoke
    try:
        yield Configd(service, inventory, server, passphrases.current(0).value, server.port)
    finally:
        server.close()
        await server.wait_closed()
        await service.engine.close()
        inventory.close()


def tls_of(enrolment: Enrolment, directory: Path, stem: str) -> ssl.SSLContext:
    cert, key, ca = enrolment.save(directory, stem)
    return client_context(cert, key, ca)


def test_enrol_report_revoke(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with configd(tmp_path) as cd:
            server = await enrol(
                "127.0.0.1", cd.port, cd.passphrase, name="ps1", kind="process",
                sans=["localhost"], facts={"address": "localhost:9441"},
            )  # fmt: skip
            assert server.assignment["role"] == "process"
            assert cd.inventory.server("ps1")["address"] == "localhost:9441"
            answers: list[dict[str, Any]] = []
            reporter = Reporter(
                "127.0.0.1", cd.port, tls_of(server, tmp_path / "ps1", "process"), name="ps1",
                role="process", build=lambda: {"disks": []}, on_answer=answers.append,
                interval=0.05, server_hostname="localhost",
            )  # fmt: skip
            task = asyncio.create_task(reporter.run())
            async with asyncio.timeout(5):
                while len(answers) < 2:
                    await asyncio.sleep(0.02)
            assert answers[-1]["revoked"] == []
            assert cd.inventory.server("ps1")["last_seen"] is not None
            await cd.service.revoke("ps1")
            # the live connection is cut and the next handshake refused: no more answers
            async with asyncio.timeout(5):
                while reporter.connected and reporter.last_error is None:
                    await asyncio.sleep(0.02)
            count = len(answers)
            await asyncio.sleep(0.5)
            assert len(answers) == count
            assert reporter.last_error is not None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            events = [e["kind"] for e in cd.inventory.events(20)]
            assert "revoked" in events and "enrolled" in events

    asyncio.run(scenario())


def test_refusals_are_clear_and_logged(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with configd(tmp_path) as cd:
            with pytest.raises(EnrolFailed, match="wrong enrolment passphrase"):
                await enrol("127.0.0.1", cd.port, "AAAA-BBBB-CCCC-DDDD-EEEE", name="web1",
                            kind="agent", sans=[], facts={})  # fmt: skip
            assert any("refused" in e["message"] for e in cd.inventory.events(10))
            with pytest.raises(EnrolFailed, match="kind must be one of"):
                await enrol("127.0.0.1", cd.port, cd.passphrase, name="evil", kind="admin",
                            sans=[], facts={})  # fmt: skip
            agent = await enrol("127.0.0.1", cd.port, cd.passphrase, name="web1", kind="agent",
                                sans=[], facts={"disks": []})  # fmt: skip
            ctx = tls_of(agent, tmp_path / "web1", "agent")
            # an agent certificate cannot report as a process server (its kind is recorded)
            conn = await open_connection("127.0.0.1", cd.port, ctx, server_hostname="localhost")
            from appliance.wire.messages import Hello, Request, Response

            await conn.send(Hello("process", "web1"))
            await conn.recv()
            await conn.send(Request.make(1, "report", disks="not a list"))
            reply = await conn.recv()
            assert isinstance(reply, Response) and not reply.ok
            assert "disks must be a list" in reply.json()["message"]
            await conn.send(Request.make(2, "materialize"))
            reply = await conn.recv()
            assert isinstance(reply, Response) and not reply.ok
            conn.close()
            # a certificate from another CA never gets past the handshake
            rogue = CertificateAuthority.open_or_create(tmp_path / "rogue")
            cert, key = rogue.issue_local("web2", ComponentKind.AGENT, [], tmp_path / "rogue-tls")
            bad = client_context(cert, key, tmp_path / "web1" / "ca.crt")
            with pytest.raises((WireError, OSError, ssl.SSLError)):
                conn = await open_connection("127.0.0.1", cd.port, bad, server_hostname="localhost")
                await conn.send(Hello("agent", "web2"))
                await conn.recv()

    asyncio.run(scenario())
