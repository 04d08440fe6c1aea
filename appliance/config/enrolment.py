"""Enrolment, the server side: check a component's passphrase proof and sign its CSR.

The exchange and its proofs are specified in `appliance.wire.enrol`. The order of
checks matters:

1. the shapes of the request (InvalidArgument; nothing is trusted yet),
2. the client's proof against the current passphrase, in constant time
   (EnrolmentRefused "wrong enrolment passphrase"); only then its expiry, so an
   expired message tells nothing to someone who never knew the passphrase,
3. the CSR's public key not seen before (a captured request cannot be replayed),
4. signing (the CA checks the CSR's name, key and SANs) and `register`, which
   records the component in the inventory and returns its assignment.

Every refusal is reported once through `event`. The configuration server's listener
accepts peers without a certificate (`enrolment_server_context`); such a peer may
only enrol (`serve_enrolment`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.config.ca import (
    NAME_RE,
    CertificateAuthority,
    Issued,
    check_name,
    load_csr,
    public_key_fingerprint,
    san_strings,
)
from appliance.config.errors import ConfigServerError, EnrolmentRefused, InvalidArgument
from appliance.config.model import ComponentKind, Severity
from appliance.config.passphrase import PassphraseStore
from appliance.wire.connection import Connection
from appliance.wire.enrol import METHOD, NONCE_SIZE, ROLE, client_proof, server_proof
from appliance.wire.errors import ProtocolViolation
from appliance.wire.framing import MAX_BODY
from appliance.wire.messages import Hello, Request, Welcome
from appliance.wire.rpc import answer
from appliance.wire.tls import server_context

MAX_CSR = 8 * 1024
MAX_FACTS = 64 * 1024  # as compact JSON
PROOF_SIZE = 32  # HMAC-SHA256
REQUEST_TIMEOUT = 30.0  # an enrolling peer that says nothing is cut off after this


#: What may enrol with the passphrase: the configuration server's own leaf and admin
#: tools' leaves are issued locally, never to whoever knows the passphrase.
ENROLLING_KINDS = frozenset({ComponentKind.AGENT, ComponentKind.PROCESS, ComponentKind.TARGET})


@dataclass(frozen=True)
class EnrolRequest:
    """A request whose proof and CSR passed; what `register` records."""

    name: str
    kind: ComponentKind
    sans: tuple[str, ...]
    facts: dict[str, Any]
    csr_fingerprint: str  # sha256 hex of the CSR's SubjectPublicKeyInfo
    peer: str  # where it came from, for the event log


Register = Callable[[EnrolRequest, Issued], dict[str, Any]]
RememberCsr = Callable[[str, str], bool]  # (fingerprint, name) -> False if seen before
Event = Callable[[str, str, str], None]  # (severity, subject, message)


@dataclass(frozen=True)
class _Parsed:
    name: str
    kind: ComponentKind
    csr_pem: bytes
    nonce: bytes
    proof: bytes
    facts: dict[str, Any]


class Enroller:
    """Answers "enrol" requests (see the module docstring for the order of checks)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        passphrases: PassphraseStore,
        server_cert_der: bytes,
        *,
        register: Register,
        remember_csr: RememberCsr,
        event: Event,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ca = ca
        self._passphrases = passphrases
        self._server_cert_der = server_cert_der  # the TLS leaf clients bind their proof to
        self._register = register
        self._remember_csr = remember_csr
        self._event = event
        self._clock = clock

    def handle(self, params: dict[str, Any], *, peer: str = "") -> dict[str, Any]:
        """The answer to one "enrol" request; ConfigServerError leaves for refusals."""
        raw_name = params.get("name")
        valid_name = isinstance(raw_name, str) and NAME_RE.match(raw_name) is not None
        try:
            return self._handle(params, peer)
        except ConfigServerError as exc:
            # Only a well-formed name is repeated: the log must not carry a peer's junk.
            who = f" of {raw_name}" if valid_name else ""
            where = f" from {peer}" if peer else ""
            subject = str(raw_name) if valid_name else "enrolment"
            self._event(Severity.WARNING, subject, f"enrolment{who}{where} refused: {exc.message}")
            raise

    def _handle(self, params: dict[str, Any], peer: str) -> dict[str, Any]:
        req = _parse(params)
        csr = load_csr(req.csr_pem)
        csr_der = csr.public_bytes(serialization.Encoding.DER)
        phrase = self._passphrases.current(self._clock())
        expected = client_proof(phrase.normalised, req.nonce, self._server_cert_der, csr_der)
        if not hmac.compare_digest(expected, req.proof):
            raise EnrolmentRefused("wrong enrolment passphrase")
        phrase.require_valid(self._clock())

        try:
            san_ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            sans = san_strings(list(san_ext.value))
        except x509.ExtensionNotFound:
            sans = []
        except ValueError as exc:  # duplicate or undecodable extensions
            raise InvalidArgument(f"the CSR's extensions are invalid: {exc}") from exc
        fingerprint = public_key_fingerprint(csr.public_key())
        if not self._remember_csr(fingerprint, req.name):
            raise EnrolmentRefused("this CSR was already used; generate a new key")
        issued = self._ca.sign_csr(req.csr_pem, name=req.name, kind=req.kind, sans=sans)
        request = EnrolRequest(req.name, req.kind, tuple(sans), req.facts, fingerprint, peer)
        assignment = self._register(request, issued)
        cert_der = x509.load_pem_x509_certificate(issued.cert_pem).public_bytes(
            serialization.Encoding.DER
        )
        proof = server_proof(phrase.normalised, req.nonce, cert_der, self._ca.ca_der)
        return {
            "cert": issued.cert_pem.decode(),
            "ca": self._ca.ca_pem.decode(),
            "serial": issued.serial,
            "not_after": issued.not_after,
            "assignment": assignment,
            "proof": proof.hex(),
        }


def _hex_field(params: dict[str, Any], field: str, size: int) -> bytes:
    value = params.get(field)
    if not isinstance(value, str) or len(value) != 2 * size:
        raise InvalidArgument(f"{field} must be {size} bytes in hex")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise InvalidArgument(f"{field} must be {size} bytes in hex") from exc


def _parse(params: dict[str, Any]) -> _Parsed:
    name = params.get("name")
    if not isinstance(name, str):
        raise InvalidArgument("name must be a string")
    check_name(name)
    kind = params.get("kind")
    if kind not in ENROLLING_KINDS:
        choices = ", ".join(sorted(ENROLLING_KINDS))
        raise InvalidArgument(f"kind must be one of {choices}, not {kind!r}")
    csr = params.get("csr")
    if not isinstance(csr, str):
        raise InvalidArgument("csr must be a PEM string")
    csr_pem = csr.encode()
    if len(csr_pem) > MAX_CSR:
        raise InvalidArgument(f"the CSR is larger than {MAX_CSR} bytes")
    facts = params.get("facts", {})
    if not isinstance(facts, dict):
        raise InvalidArgument("facts must be a JSON object")
    if len(json.dumps(facts, separators=(",", ":"))) > MAX_FACTS:
        raise InvalidArgument(f"facts are larger than {MAX_FACTS} bytes of JSON")
    return _Parsed(
        name=name,
        kind=ComponentKind(kind),
        csr_pem=csr_pem,
        nonce=_hex_field(params, "nonce", NONCE_SIZE),
        proof=_hex_field(params, "proof", PROOF_SIZE),
        facts=facts,
    )


def enrolment_server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The configuration server's listening context: TLS 1.3, no session tickets, and a
    client certificate optional, so that a component with none yet can enrol. A
    certificate that is presented must still chain to `ca`."""
    ctx = server_context(cert, key, ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


async def serve_enrolment(
    conn: Connection,
    hello: Hello,
    enroller: Enroller,
    *,
    server_name: str,
    timeout: float = REQUEST_TIMEOUT,
) -> None:
    """Serve one enrolment on `conn`, whose HELLO (role "enrol") was already read.

    WELCOME, then exactly one "enrol" REQUEST answered (ok=false with the refusal
    for a ConfigServerError); the caller closes the connection afterwards.
    """
    if hello.role != ROLE:
        raise ProtocolViolation(f"expected an enrolment HELLO, got role {hello.role!r}")
    await conn.send(Welcome(server_name, 0, MAX_BODY))
    try:
        async with asyncio.timeout(timeout):
            msg = await conn.recv()
    except TimeoutError as exc:
        raise ProtocolViolation("no enrolment request in time") from exc
    if not isinstance(msg, Request) or msg.method != METHOD:
        raise ProtocolViolation(f"expected the {METHOD!r} request, got {type(msg).__name__}")
    peername = conn.get_extra_info("peername")
    peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else ""

    async def call(method: str, params: dict[str, Any]) -> Any:
        return enroller.handle(params, peer=peer)

    await answer(conn, msg, call, (ConfigServerError,))
