"""The passphrase store and the enrolment exchange, over real TLS on loopback.

The server side is the real `WireServer` with `allow_anonymous` and the listening
context the configuration server uses (`enrolment_server_context`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import ssl
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.config.ca import CertificateAuthority, Issued
from appliance.config.enrolment import (
    Enroller,
    EnrolRequest,
    enrolment_server_context,
    serve_enrolment,
)
from appliance.config.errors import EnrolmentRefused, InvalidArgument
from appliance.config.model import ComponentKind
from appliance.config.passphrase import CorruptPassphraseFile, PassphraseStore
from appliance.wire import enrol as wire_enrol
from appliance.wire.connection import Connection, open_connection, start_server
from appliance.wire.enrol import (
    EnrolFailed,
    Enrolment,
    build_csr,
    client_proof,
    enrol,
    normalise_passphrase,
)
from appliance.wire.errors import ErrorCode, ErrorCounters, WireError
from appliance.wire.messages import Hello, Ping, Pong, Request, Response, Welcome
from appliance.wire.tls import client_context, server_context
from tests.conftest import free_port

T = TypeVar("T")
ConnHandler = Callable[[Connection, Hello], Awaitable[None]]
ASSIGNMENT = {"process_server": "ps1.example.test:7001"}
FACTS = {"os": "debian 12", "disks": [{"name": "sda", "size": 10737418240}]}


# -- passphrases ----------------------------------------------------------------------


def test_passphrase_is_created_once_and_kept_root_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "passphrase.json"
    store = PassphraseStore(path)
    first = store.current(now=1000.0)
    assert re.fullmatch(r"([0-9A-HJKMNP-TV-Z]{4}-){4}[0-9A-HJKMNP-TV-Z]{4}", first.value)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.record() == {"passphrase": first.value, "created_at": 1000.0}
    assert store.current(now=5000.0) == first
    assert PassphraseStore(path).current(now=5000.0) == first  # read back from the file


def test_passphrase_compares_as_typed(tmp_path: Path) -> None:
    phrase = PassphraseStore(tmp_path / "p.json").current(now=0.0)
    typed = phrase.value.lower().replace("-", " ")
    assert phrase.matches(typed)
    assert phrase.matches(" " + phrase.value.replace("-", "") + "\n")
    # What people read off a screen: O for 0, I and L for 1.
    assert normalise_passphrase("o1-il") == "0111"
    assert not phrase.matches(phrase.value[:-1])
    assert not phrase.matches("not-a-passphrase!")
    with pytest.raises(ValueError, match="cannot contain"):
        normalise_passphrase("ABCD-U")


def test_rotation_and_expiry(tmp_path: Path) -> None:
    store = PassphraseStore(tmp_path / "p.json")
    old = store.current(now=0.0)
    new = store.rotate(now=100.0, ttl=60.0)
    assert new.value != old.value and not new.matches(old.value)
    assert new.record()["expires_at"] == 160.0
    assert PassphraseStore(tmp_path / "p.json").current(now=0.0) == new
    new.require_valid(159.0)
    with pytest.raises(EnrolmentRefused, match="expired"):
        new.require_valid(160.0)
    with pytest.raises(InvalidArgument):
        store.rotate(now=0.0, ttl=0.0)


def test_damaged_passphrase_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"passphrase": "??", "created_at": 0, "expires_at": None}))
    with pytest.raises(CorruptPassphraseFile, match="remove it"):
        PassphraseStore(path).current(now=0.0)


# -- the exchange ---------------------------------------------------------------------


@dataclass
class Core:
    """What the configuration server's core does for the Enroller: remember and record."""

    seen: dict[str, str] = field(default_factory=dict)
    registered: list[tuple[EnrolRequest, Issued]] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def register(self, request: EnrolRequest, issued: Issued) -> dict[str, Any]:
        self.registered.append((request, issued))
        return ASSIGNMENT

    def remember_csr(self, fingerprint: str, name: str) -> bool:
        if fingerprint in self.seen:
            return False
        self.seen[fingerprint] = name
        return True

    def event(self, severity: str, subject: str, message: str) -> None:
        self.events.append((severity, subject, message))


@dataclass
class Site:
    """A configuration server's CA, TLS leaf, passphrase and enroller in tmp_path."""

    ca: CertificateAuthority
    cert: Path
    key: Path
    passphrases: PassphraseStore
    core: Core
    enroller: Enroller
    clock: list[float]

    @property
    def server_der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )

    @property
    def passphrase(self) -> str:
        return self.passphrases.current(self.clock[0]).value

    def context(self) -> ssl.SSLContext:
        return enrolment_server_context(self.cert, self.key, self.ca.ca_path)


def make_site(directory: Path, *, ca: CertificateAuthority | None = None) -> Site:
    """A site; with `ca`, the enroller signs with that CA instead of the one its TLS
    leaf comes from (a server whose answer does not match its own certificate)."""
    own_ca = CertificateAuthority.open_or_create(directory / "ca")
    cert, key = own_ca.issue_local(
        "configd", ComponentKind.PROCESS, ["localhost", "127.0.0.1"], directory / "tls"
    )
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    passphrases = PassphraseStore(directory / "passphrase.json")
    core = Core()
    clock = [1_000_000.0]
    enroller = Enroller(
        ca or own_ca,
        passphrases,
        der,
        register=core.register,
        remember_csr=core.remember_csr,
        event=core.event,
        clock=lambda: clock[0],
    )
    return Site(own_ca, cert, key, passphrases, core, enroller, clock)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site")


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine on a fresh loop; tests using it run on both event loops."""
    return uvloop.run if request.param == "uvloop" else asyncio.run


@contextlib.asynccontextmanager
async def enrolment_server(
    ctx: ssl.SSLContext, handler: ConnHandler, counters: ErrorCounters | None = None
) -> AsyncIterator[int]:
    """The real WireServer admitting peers without a certificate, as configd's listener."""

    async def serve(conn: Connection) -> None:
        hello = await conn.recv()
        assert isinstance(hello, Hello)
        assert conn.peer == "" and conn.peer_serial is None  # anonymous: enrol only
        await handler(conn, hello)

    server = await start_server(
        serve, "127.0.0.1", 0, ctx, counters=counters or ErrorCounters(), allow_anonymous=True
    )
    async with server:
        yield server.port


def real(site: Site) -> ConnHandler:
    async def handle(conn: Connection, hello: Hello) -> None:
        await serve_enrolment(conn, hello, site.enroller, server_name="configd")

    return handle


def rewriting(site: Site, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> ConnHandler:
    """The real enroller, with its answer passed through `rewrite` (a tampering server)."""

    async def handle(conn: Connection, hello: Hello) -> None:
        await conn.send(Welcome("configd", 0, 1 << 20))
        req = await conn.recv()
        assert isinstance(req, Request)
        result = rewrite(site.enroller.handle(req.json()))
        await conn.send(Response.make(req.request_id, result))

    return handle


async def enrol_with(port: int, passphrase: str, name: str = "web01", **kw: Any) -> Enrolment:
    kw.setdefault("kind", "agent")
    kw.setdefault("sans", [])
    return await enrol("127.0.0.1", port, passphrase, name=name, facts=FACTS, timeout=10.0, **kw)


def test_round_trip(site: Site, tmp_path: Path, run: Callable[[Any], Any]) -> None:
    async def main() -> Enrolment:
        async with enrolment_server(site.context(), real(site)) as port:
            # As typed by a person: lower case, spaces instead of dashes.
            typed = site.passphrase.lower().replace("-", " ")
            return await enrol_with(port, typed, "web01.example.test")

    got = run(main())
    assert got.assignment == ASSIGNMENT
    assert got.ca_pem == site.ca.ca_pem
    cert = x509.load_pem_x509_certificate(got.cert_pem)
    cert.verify_directly_issued_by(site.ca.certificate)
    key = serialization.load_pem_private_key(got.key_pem, password=None)
    assert cert.public_key() == key.public_key()
    assert got.serial == format(cert.serial_number, "x")

    [(request, issued)] = site.core.registered
    assert (request.name, request.kind, request.facts) == ("web01.example.test", "agent", FACTS)
    assert request.peer.startswith("127.0.0.1:")
    assert issued.serial == got.serial
    assert site.core.events == []

    paths = got.save(tmp_path / "tls", "agent")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert modes == {"agent.crt": 0o644, "agent.key": 0o600, "ca.crt": 0o644}
    assert (tmp_path / "tls" / "agent.key").read_bytes() == got.key_pem


def test_server_kind_gets_its_sans(site: Site) -> None:
    async def main() -> Enrolment:
        async with enrolment_server(site.context(), real(site)) as port:
            return await enrol_with(
                port, site.passphrase, "ts1", kind="target", sans=["ts1.lan", "10.0.0.9"]
            )

    cert = x509.load_pem_x509_certificate(asyncio.run(main()).cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ts1.lan"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.9"]


def test_wrong_passphrase_is_refused_and_logged(site: Site) -> None:
    async def main() -> None:
        async with enrolment_server(site.context(), real(site)) as port:
            other = "-".join(secrets.token_hex(2).upper() for _ in range(5))
            await enrol_with(port, other, "web02")

    with pytest.raises(EnrolFailed, match=r"^wrong enrolment passphrase$"):
        asyncio.run(main())
    assert site.core.registered == [] and site.core.seen == {}
    [(severity, subject, message)] = site.core.events
    assert (severity, subject) == ("warning", "web02")
    assert "wrong enrolment passphrase" in message and "127.0.0.1" in message


def test_expired_passphrase_is_refused(site: Site) -> None:
    site.passphrases.rotate(site.clock[0], ttl=60.0)
    site.clock[0] += 61

    async def main() -> None:
        async with enrolment_server(site.context(), real(site)) as port:
            await enrol_with(port, site.passphrase)

    with pytest.raises(EnrolFailed, match="passphrase expired"):
        asyncio.run(main())
    assert site.core.registered == []


def test_replayed_request_is_refused(site: Site) -> None:
    """The same request (same CSR, nonce and proof) sent on a second connection."""

    async def send(port: int, attempt: Any) -> Any:
        conn = await wire_enrol._connect_unverified("127.0.0.1", port, 10.0)
        try:
            leaf = wire_enrol._server_leaf_der(conn)
            response = await attempt.exchange(conn, leaf, FACTS)
        finally:
            conn.close()
        return attempt.accept(response, leaf)

    async def main() -> tuple[Enrolment, BaseException]:
        attempt = wire_enrol._Attempt.start("test", site.passphrase, "web03", "agent", [])
        async with enrolment_server(site.context(), real(site)) as port:
            first = await send(port, attempt)
            try:
                await send(port, attempt)
            except EnrolFailed as exc:
                return first, exc
        raise AssertionError("the replay was accepted")

    first, refused = asyncio.run(main())
    assert first.assignment == ASSIGNMENT
    assert str(refused) == "this CSR was already used; generate a new key"
    assert len(site.core.registered) == 1
    assert "already used" in site.core.events[-1][2]


def test_server_without_the_passphrase_is_detected(site: Site, tmp_path: Path) -> None:
    """An impostor with its own CA that accepts anyone cannot prove the passphrase."""
    impostor = make_site(tmp_path / "impostor")

    def forge(result: dict[str, Any]) -> dict[str, Any]:
        return {**result, "proof": secrets.token_hex(32)}

    async def handle(conn: Connection, hello: Hello) -> None:
        await conn.send(Welcome("configd", 0, 1 << 20))
        req = await conn.recv()
        assert isinstance(req, Request)
        params = req.json()
        issued = impostor.ca.sign_csr(
            params["csr"].encode(), name=params["name"], kind=ComponentKind.AGENT, sans=[]
        )
        result = {
            "cert": issued.cert_pem.decode(),
            "ca": impostor.ca.ca_pem.decode(),
            "serial": issued.serial,
            "assignment": {},
        }
        await conn.send(Response.make(req.request_id, forge(result)))

    async def main() -> None:
        async with enrolment_server(impostor.context(), handle) as port:
            await enrol_with(port, site.passphrase)

    with pytest.raises(EnrolFailed, match="does not know the passphrase"):
        asyncio.run(main())


def test_tampered_ca_is_detected(site: Site, tmp_path: Path) -> None:
    other = CertificateAuthority.open_or_create(tmp_path / "other-ca")

    def swap_ca(result: dict[str, Any]) -> dict[str, Any]:
        return {**result, "ca": other.ca_pem.decode()}

    async def main() -> None:
        async with enrolment_server(site.context(), rewriting(site, swap_ca)) as port:
            await enrol_with(port, site.passphrase)

    with pytest.raises(EnrolFailed, match="does not know the passphrase"):
        asyncio.run(main())


def test_ca_that_did_not_issue_the_tls_leaf_is_detected(tmp_path: Path) -> None:
    """A server that knows the passphrase but answers with another CA than the one its
    TLS certificate chains to: the client would trust a CA it never talked to."""
    other = CertificateAuthority.open_or_create(tmp_path / "other-ca")
    site = make_site(tmp_path / "site", ca=other)

    async def main() -> None:
        async with enrolment_server(site.context(), real(site)) as port:
            await enrol_with(port, site.passphrase)

    with pytest.raises(EnrolFailed, match="TLS certificate was not issued by the CA"):
        asyncio.run(main())


def test_malformed_requests_are_refused(site: Site) -> None:
    base = {"name": "web04", "kind": "agent", "nonce": "00" * 32, "proof": "00" * 32}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**base, "csr": "x", "kind": "root"}, "kind must be"),
        ({**base, "csr": "x", "name": "Bad Name"}, "invalid component name"),
        ({**base, "csr": "x" * 9000}, "larger than 8192"),
        ({**base, "csr": "x", "nonce": "zz"}, "nonce must be"),
        ({**base, "csr": "x", "facts": {"a": "b" * 70000}}, "facts are larger"),
        ({**base, "csr": "-----BEGIN CERTIFICATE REQUEST-----\n"}, "not a valid PEM"),
    ]
    for params, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            site.enroller.handle(params)
    assert len(site.core.events) == len(cases)
    assert site.core.seen == {}
    assert [subject for _, subject, _ in site.core.events][:2] == ["web04", "enrolment"]


def test_proof_is_bound_to_the_server_certificate(site: Site, tmp_path: Path) -> None:
    """A proof made for another TLS certificate (a man in the middle relaying the
    client's request) is refused although the passphrase is right."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = build_csr(key, "web06", [])
    csr_der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
    mitm_cert, _ = CertificateAuthority.open_or_create(tmp_path / "mitm").issue_local(
        "configd", ComponentKind.PROCESS, ["localhost"], tmp_path / "mitm-tls"
    )
    mitm_der = x509.load_pem_x509_certificate(mitm_cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    secret = normalise_passphrase(site.passphrase)
    nonce = secrets.token_bytes(32)
    params = {"name": "web06", "kind": "agent", "csr": csr.decode(), "nonce": nonce.hex()}
    relayed = client_proof(secret, nonce, mitm_der, csr_der)
    with pytest.raises(EnrolmentRefused, match="wrong enrolment passphrase"):
        site.enroller.handle({**params, "proof": relayed.hex()})
    direct = client_proof(secret, nonce, site.server_der, csr_der)
    result = site.enroller.handle({**params, "proof": direct.hex()})
    cert = x509.load_pem_x509_certificate(result["cert"].encode())
    assert cert.public_key() == key.public_key()


def test_bad_passphrase_is_caught_before_connecting() -> None:
    with pytest.raises(EnrolFailed, match="cannot contain"):
        asyncio.run(enrol_with(1, "correct horse!"))


def test_unreachable_server_is_one_line(site: Site) -> None:
    with pytest.raises(EnrolFailed, match="cannot reach the configuration server") as info:
        asyncio.run(enrol_with(free_port(), site.passphrase))
    assert "\n" not in str(info.value)


def test_enrolled_certificate_works_for_mutual_tls(site: Site, tmp_path: Path) -> None:
    """An enrolled agent talks to a CA-issued server over the normal wire protocol."""

    async def main() -> tuple[str, str]:
        async with enrolment_server(site.context(), real(site)) as port:
            got = await enrol_with(port, site.passphrase, "web05")
        cert, key, ca = got.save(tmp_path / "agent", "agent")
        ps_cert, ps_key = site.ca.issue_local(
            "ps1", ComponentKind.PROCESS, ["localhost", "127.0.0.1"], tmp_path / "ps1"
        )
        seen: list[str] = []

        async def pong(conn: Connection) -> None:
            seen.append(conn.peer)
            msg = await conn.recv()
            assert isinstance(msg, Ping)
            await conn.send(Pong(msg.nonce))

        server = await start_server(
            pong,
            "127.0.0.1",
            0,
            server_context(ps_cert, ps_key, site.ca.ca_path),
            counters=ErrorCounters(),
        )
        async with server:
            conn = await open_connection(
                "127.0.0.1",
                server.port,
                client_context(cert, key, ca),
                server_hostname="localhost",
            )
            await conn.send(Ping(7))
            assert await conn.recv() == Pong(7)
            conn.close()
            return conn.peer, seen[0]

    client_saw, server_saw = asyncio.run(main())
    assert (client_saw, server_saw) == ("ps1", "web05")


def test_agent_certificate_cannot_serve(site: Site, tmp_path: Path) -> None:
    """clientAuth only: a client refuses an agent's certificate presented as a server's."""

    async def main() -> None:
        async with enrolment_server(site.context(), real(site)) as port:
            got = await enrol_with(port, site.passphrase, "localhost")
        cert, key, ca = got.save(tmp_path / "agent", "agent")

        async def idle(conn: Connection) -> None:
            await conn.recv()

        server = await start_server(
            idle,
            "127.0.0.1",
            0,
            server_context(cert, key, ca),
            counters=ErrorCounters(),
        )
        ps_cert, ps_key = site.ca.issue_local(
            "ps1", ComponentKind.PROCESS, ["localhost"], tmp_path / "ps1"
        )
        async with server:
            await open_connection(
                "127.0.0.1", server.port, client_context(ps_cert, ps_key, ca), timeout=5
            )

    with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
        asyncio.run(main())


def test_certificate_from_another_ca_is_refused_at_enrolment(site: Site, tmp_path: Path) -> None:
    """CERT_OPTIONAL still checks a certificate that is presented."""
    rogue = CertificateAuthority.open_or_create(tmp_path / "rogue")
    cert, key = rogue.issue_local("intruder", ComponentKind.ADMIN, [], tmp_path / "intruder")
    counters = ErrorCounters()

    async def main() -> None:
        async with enrolment_server(site.context(), real(site), counters) as port:
            ctx = client_context(cert, key, site.ca.ca_path)
            conn = await open_connection("127.0.0.1", port, ctx, server_hostname="localhost")
            await conn.send(Hello(role="enrol", name="intruder"))
            # TLS 1.3: the refusal arrives as an alert on the first read.
            with pytest.raises((ConnectionError, ssl.SSLError, WireError)):
                await conn.recv()
            conn.abort()

    asyncio.run(main())
    assert counters.get(ErrorCode.BAD_CERTIFICATE) == 1
