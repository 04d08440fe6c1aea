"""Enrolment, the client side: get a certificate from the configuration server with a passphrase.

An enrolling component has no certificate and does not know the CA yet, so it
connects with TLS 1.3 without checking the server or presenting a certificate, and
both sides prove that they know the one-time passphrase instead. Each proof is an
HMAC-SHA256 keyed with the normalised passphrase:

    client  HMAC(p, "secondsite-enrol-v1" || nonce || sha256(server leaf DER) || sha256(CSR DER))
    server  HMAC(p, "secondsite-enrol-v1-server" || nonce || sha256(cert DER) || sha256(CA DER))

The client's proof covers the TLS certificate it was shown, so a man in the middle
(who must present his own) cannot relay it to the real server; the server's proof
covers the client's fresh nonce and what it returns. The client then checks that
the returned CA issued both its new certificate and the TLS leaf it talked to.

The exchange on the wire: HELLO(role="enrol", name) -> WELCOME, then one REQUEST
"enrol" {name, kind, csr (PEM), nonce (hex), proof (hex), facts} -> RESPONSE
{cert, ca, serial, assignment, proof (hex)}, or ok=false {error, message}.

Only the stdlib, `cryptography` and `appliance.wire` (plus the stdlib-only
`appliance.storage.atomic`, already in the agent's import closure) are used here:
the agent imports this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.storage.atomic import atomic_write
from appliance.wire.connection import Connection, _Protocol
from appliance.wire.errors import WireError
from appliance.wire.messages import Hello, Message, Request, Response, Welcome

ROLE = "enrol"  # the HELLO role of an enrolling client
METHOD = "enrol"
CLIENT_LABEL = b"secondsite-enrol-v1"
SERVER_LABEL = b"secondsite-enrol-v1-server"
NONCE_SIZE = 32
# Crockford's base32: no I, L, O or U; what an operator types as O, I or L is read as
# 0, 1 and 1, so a passphrase copied off a console screen still works.
PASSPHRASE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CONFUSABLE = str.maketrans({"O": "0", "I": "1", "L": "1"})
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class EnrolFailed(Exception):
    """Enrolment did not succeed; the message is one line for the operator."""


# -- shared by both sides -------------------------------------------------------------


def normalise_passphrase(text: str) -> str:
    """Upper case, without dashes and spaces, confusable letters mapped (ValueError if
    a character is not in the alphabet)."""
    cleaned = "".join(text.split()).replace("-", "").upper().translate(_CONFUSABLE)
    if not cleaned:
        raise ValueError("the enrolment passphrase is empty")
    bad = sorted({c for c in cleaned if c not in PASSPHRASE_ALPHABET})
    if bad:
        raise ValueError(f"the enrolment passphrase cannot contain {''.join(bad)!r}")
    return cleaned


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def client_proof(passphrase: str, nonce: bytes, server_leaf_der: bytes, csr_der: bytes) -> bytes:
    """The client's proof; `passphrase` is normalised (see `normalise_passphrase`)."""
    msg = CLIENT_LABEL + nonce + _sha256(server_leaf_der) + _sha256(csr_der)
    return hmac.new(passphrase.encode(), msg, hashlib.sha256).digest()


def server_proof(passphrase: str, nonce: bytes, cert_der: bytes, ca_der: bytes) -> bytes:
    """The server's proof; `passphrase` is normalised (see `normalise_passphrase`)."""
    msg = SERVER_LABEL + nonce + _sha256(cert_der) + _sha256(ca_der)
    return hmac.new(passphrase.encode(), msg, hashlib.sha256).digest()


def general_name(text: str) -> x509.GeneralName:
    """A SAN string as an IP address or a lowercase DNS name (ValueError otherwise)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if len(text) > 253 or not all(_LABEL_RE.match(label) for label in text.split(".")):
        raise ValueError(
            f"invalid server name {text!r}: expected a lowercase DNS name or an IP address"
        )
    return x509.DNSName(text)


def build_csr(key: ec.EllipticCurvePrivateKey, name: str, sans: list[str]) -> bytes:
    """A PEM CSR with CN=`name` and `sans` as its subject alternative names."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([general_name(san) for san in sans]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def client_context_no_verify() -> ssl.SSLContext:
    """TLS 1.3 that neither checks the server nor presents a certificate.

    Only for enrolment, where the passphrase proofs authenticate both ends instead.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- the result -----------------------------------------------------------------------


@dataclass(frozen=True)
class Enrolment:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    serial: str
    assignment: dict[str, Any]

    def save(self, directory: Path, stem: str) -> tuple[Path, Path, Path]:
        """Write <stem>.crt, <stem>.key (0600) and ca.crt atomically; returns their paths.

        The key goes first: a crash part-way leaves at worst a key without its
        certificate (enrol again), never a certificate whose key is missing.
        """
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert, key, ca = directory / f"{stem}.crt", directory / f"{stem}.key", directory / "ca.crt"
        atomic_write(key, self.key_pem, 0o600)
        atomic_write(ca, self.ca_pem, 0o644)
        atomic_write(cert, self.cert_pem, 0o644)
        return cert, key, ca


# -- the exchange ---------------------------------------------------------------------


async def _connect_unverified(host: str, port: int, timeout: float) -> Connection:
    # `open_connection` insists on naming the peer from a verified certificate, which
    # an unverified handshake does not give; the framing is the same.
    loop = asyncio.get_running_loop()
    conn = Connection()
    await loop.create_connection(
        lambda: _Protocol(conn),
        host,
        port,
        ssl=client_context_no_verify(),
        ssl_handshake_timeout=timeout,
    )
    conn.peer = f"{host}:{port}"
    return conn


def _server_leaf_der(conn: Connection) -> bytes:
    ssl_object = conn.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise EnrolFailed("the configuration server presented no TLS certificate")
    return cast(bytes, der)


async def enrol(
    host: str,
    port: int,
    passphrase: str,
    *,
    name: str,
    kind: str,
    sans: list[str],
    facts: dict[str, Any],
    timeout: float = 30.0,
) -> Enrolment:
    """Enrol with the configuration server at host:port; EnrolFailed with one line if not."""
    attempt = _Attempt.start(f"{host}:{port}", passphrase, name, kind, sans)
    try:
        async with asyncio.timeout(timeout):
            conn = await _connect_unverified(host, port, timeout)
            try:
                leaf_der = _server_leaf_der(conn)
                response = await attempt.exchange(conn, leaf_der, facts)
            except BaseException:
                conn.abort()
                raise
            conn.close()
            await conn.wait_closed()
    except TimeoutError as exc:
        raise EnrolFailed(
            f"the configuration server at {attempt.where} did not answer in time"
        ) from exc
    except (OSError, ssl.SSLError) as exc:
        raise EnrolFailed(
            f"cannot reach the configuration server at {attempt.where}: {exc}"
        ) from exc
    except WireError as exc:
        raise EnrolFailed(f"enrolment with {attempt.where} failed: {exc}") from exc
    return attempt.accept(response, leaf_der)


@dataclass(frozen=True)
class _Attempt:
    """What one enrolment attempt made before connecting, and what it checks after."""

    where: str
    secret: str  # the normalised passphrase
    name: str
    kind: str
    key: ec.EllipticCurvePrivateKey
    csr_pem: bytes
    nonce: bytes

    @classmethod
    def start(cls, where: str, passphrase: str, name: str, kind: str, sans: list[str]) -> _Attempt:
        try:
            secret = normalise_passphrase(passphrase)
            key = ec.generate_private_key(ec.SECP256R1())
            csr_pem = build_csr(key, name, sans)
        except ValueError as exc:
            raise EnrolFailed(str(exc)) from exc
        # A fresh key and nonce every time: the server refuses a CSR it has seen.
        return cls(where, secret, name, kind, key, csr_pem, secrets.token_bytes(NONCE_SIZE))

    async def exchange(self, conn: Connection, leaf_der: bytes, facts: dict[str, Any]) -> Message:
        csr_der = x509.load_pem_x509_csr(self.csr_pem).public_bytes(serialization.Encoding.DER)
        proof = client_proof(self.secret, self.nonce, leaf_der, csr_der)
        await conn.send(Hello(role=ROLE, name=self.name))
        welcome = await conn.recv()
        if not isinstance(welcome, Welcome):
            raise EnrolFailed(f"{self.where} answered {type(welcome).__name__}, not WELCOME")
        request = Request.make(
            1,
            METHOD,
            name=self.name,
            kind=self.kind,
            csr=self.csr_pem.decode(),
            nonce=self.nonce.hex(),
            proof=proof.hex(),
            facts=facts,
        )
        await conn.send(request)
        return await conn.recv()

    def accept(self, response: Message, leaf_der: bytes) -> Enrolment:
        """Check the server's answer and turn it into an Enrolment."""
        where = self.where
        if not isinstance(response, Response) or response.request_id != 1:
            raise EnrolFailed(f"{where} answered {type(response).__name__}, not the enrolment")
        try:
            result = response.json()
        except WireError as exc:
            raise EnrolFailed(f"{where} sent an unreadable answer: {exc}") from exc
        if not isinstance(result, dict):
            raise EnrolFailed(f"{where} sent an unreadable answer")
        if not response.ok:
            raise EnrolFailed(str(result.get("message") or result.get("error") or "refused"))
        fields = ("cert", "ca", "serial", "proof")
        if not all(isinstance(result.get(f), str) for f in fields) or not isinstance(
            result.get("assignment"), dict
        ):
            raise EnrolFailed(f"{where} sent an incomplete enrolment answer")
        try:
            cert = x509.load_pem_x509_certificate(result["cert"].encode())
            ca = x509.load_pem_x509_certificate(result["ca"].encode())
            server_leaf = x509.load_der_x509_certificate(leaf_der)
            their_proof = bytes.fromhex(result["proof"])
        except ValueError as exc:
            raise EnrolFailed(f"{where} sent an unreadable certificate: {exc}") from exc
        der = serialization.Encoding.DER
        ours = server_proof(self.secret, self.nonce, cert.public_bytes(der), ca.public_bytes(der))
        if not hmac.compare_digest(ours, their_proof):
            raise EnrolFailed(
                "the server does not know the passphrase: not the configuration server you meant?"
            )
        _check_issued(cert, ca, server_leaf, self.key, self.name)
        return Enrolment(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=private_key_pem(self.key),
            ca_pem=ca.public_bytes(serialization.Encoding.PEM),
            serial=result["serial"],
            assignment=result["assignment"],
        )


def _check_issued(
    cert: x509.Certificate,
    ca: x509.Certificate,
    server_leaf: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    name: str,
) -> None:
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise EnrolFailed("the configuration server sent a CA certificate that is not a CA")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrolFailed("the certificate sent was not issued by the CA sent with it") from exc
    try:
        server_leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrolFailed(
            "the configuration server's TLS certificate was not issued by the CA it sent"
        ) from exc
    if cert.public_key() != key.public_key():
        raise EnrolFailed("the certificate sent is not for the key this enrolment made")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in cns] != [name]:
        raise EnrolFailed(f"the certificate sent is not for {name!r}")


def enrol_sync(
    host: str,
    port: int,
    passphrase: str,
    *,
    name: str,
    kind: str,
    sans: list[str],
    facts: dict[str, Any],
    timeout: float = 30.0,
) -> Enrolment:
    """`enrol` on a fresh event loop, for command-line callers."""
    return asyncio.run(
        enrol(host, port, passphrase, name=name, kind=kind, sans=sans, facts=facts, timeout=timeout)
    )
