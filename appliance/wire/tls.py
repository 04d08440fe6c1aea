"""TLS for the wire protocol: TLS 1.3 only, mutual certificates from one CA.

Both sides present a leaf issued by the configuration server's CA at enrolment and
require the other's (CERT_REQUIRED both ways). The client also checks the server's
name against its certificate. A peer is identified by its certificate's common name.

With TLS 1.3 the client finishes its handshake before the server has judged the
client's certificate, so a refused client learns it from a TLS alert on its first
read, not from the connect call.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Protocol

from appliance.wire.errors import BadCertificate


class _HasExtraInfo(Protocol):
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class _HasPeerCert(Protocol):
    def getpeercert(self, binary_form: bool = False) -> Any: ...


def _harden(ctx: ssl.SSLContext, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Our clients never resume sessions, and a resumed session would not re-verify
    # the client's chain (say, after it expired): issue no tickets.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A server context that requires a client certificate signed by `ca`."""
    return _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key, ca)


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A client context that presents `cert` and checks the server's name and chain."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key, ca)
    ctx.check_hostname = True
    return ctx


def common_name(peercert: dict[str, Any] | None) -> str:
    """The CN of a certificate as returned by `getpeercert()` (BadCertificate if none)."""
    if not peercert:
        raise BadCertificate("the peer presented no certificate")
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                return str(value)
    raise BadCertificate("the peer certificate has no common name")


def organizational_unit(peercert: dict[str, Any] | None) -> str | None:
    """The OU of a certificate from `getpeercert()`: the component kind our CA puts there."""
    for rdn in (peercert or {}).get("subject", ()):
        for attr, value in rdn:
            if attr == "organizationalUnitName":
                return str(value)
    return None


def peer_identity(source: _HasExtraInfo | _HasPeerCert) -> str:
    """The peer certificate's CN, from an asyncio transport or an SSLObject/SSLSocket."""
    if hasattr(source, "get_extra_info"):
        return common_name(source.get_extra_info("peercert"))
    if hasattr(source, "getpeercert"):
        return common_name(source.getpeercert())
    raise TypeError(f"cannot read a peer certificate from {type(source).__name__}")


def serial_hex(serial: str | int) -> str:
    """A certificate serial in one spelling (lower-case hex, no leading zeros), whether
    it came from `getpeercert()` (upper-case hex) or from `cryptography` (an int)."""
    return format(serial if isinstance(serial, int) else int(serial, 16), "x")
