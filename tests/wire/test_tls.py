"""TLS contexts: 1.3 only, mutual, hostname-checked; identities are certificate CNs."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from appliance.wire.connection import open_connection, start_server
from appliance.wire.errors import BadCertificate, ErrorCode, ErrorCounters
from appliance.wire.tls import client_context, common_name, peer_identity, server_context
from tests.conftest import TlsMaterial
from tests.wire.conftest import Runner
from tests.wire.probe import Probe, eventually
from tests.wire.rawpeer import tls_exchange


def test_contexts_are_tls13_only_and_mutual(tls: TlsMaterial) -> None:
    server = server_context(tls.server.cert, tls.server.key, tls.ca.cert)
    client = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    for ctx in (server, client):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert client.check_hostname


def test_common_name() -> None:
    cert = {"subject": ((("countryName", "XX"),), (("commonName", "process.test"),))}
    assert common_name(cert) == "process.test"
    with pytest.raises(BadCertificate):
        common_name(None)
    with pytest.raises(BadCertificate):
        common_name({"subject": ((("organizationName", "x"),),)})
    with pytest.raises(TypeError):
        peer_identity(object())  # type: ignore[arg-type]


@pytest.mark.integration
def test_a_tls12_client_is_refused_and_counted(
    run: Runner, tls: TlsMaterial, server_ctx: ssl.SSLContext
) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_cert_chain(tls.client.cert, tls.client.key)
    old.load_verify_locations(tls.ca.cert)

    async def scenario() -> None:
        counters = ErrorCounters()
        async with await start_server(
            Probe().handle, "127.0.0.1", 0, server_ctx, counters=counters
        ) as server:
            outcome = await asyncio.to_thread(tls_exchange, server.port, old, b"hello")
            assert outcome.tls_error is not None and outcome.data == b""
            await eventually(lambda: counters.get(ErrorCode.BAD_CERTIFICATE) == 1)

    run(scenario())


@pytest.mark.integration
def test_the_client_checks_the_servers_name_and_ca(
    run: Runner, tls: TlsMaterial, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    trusting_rogue = client_context(tls.client.cert, tls.client.key, tls.rogue_ca.cert)

    async def scenario() -> None:
        async with await start_server(
            Probe().handle, "127.0.0.1", 0, server_ctx, counters=ErrorCounters()
        ) as server:
            with pytest.raises(ssl.SSLCertVerificationError, match="match"):
                await open_connection(
                    "127.0.0.1", server.port, client_ctx, server_hostname="elsewhere.test"
                )
            with pytest.raises(ssl.SSLCertVerificationError):
                await open_connection(
                    "127.0.0.1", server.port, trusting_rogue, server_hostname="localhost"
                )
            conn = await open_connection("127.0.0.1", server.port, client_ctx)  # IP SAN
            assert peer_identity(conn) == "target.test"
            conn.close()

    run(scenario())
