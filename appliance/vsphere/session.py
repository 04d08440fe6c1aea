"""A logged-in vCenter session with certificate checks that cannot be switched off.

Trust is per vCenter, one of two ways:

- `thumbprint` set: the server certificate's SHA-256 must equal it, on every TLS
  connection the session opens (the version probe and each pooled SOAP connection).
  Chain and host name are not checked then: the pin is the identity, as in vCenter's
  own first-connect prompt. `probe_thumbprint` shows the value at registration.
- `thumbprint` unset: ordinary verification against the system CAs (or `cafile`),
  host name included.

Either way a refusal is `UntrustedCertificate` carrying the thumbprint actually seen.
Everything here blocks; callers on an event loop use `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from xml.etree import ElementTree

from pyVmomi import SoapStubAdapter, vim, vmodl
from pyVmomi.VmomiSupport import GetServiceVersions, versionIdMap

from appliance.vsphere.errors import (
    BadCredentials,
    NotFound,
    Unreachable,
    UntrustedCertificate,
    VSphereError,
)
from appliance.vsphere.tasks import translate, translated

log = logging.getLogger(__name__)

DEFAULT_PORT = 443
DEFAULT_TIMEOUT = 30.0
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_VERSIONS_PATH = "/sdk/vimServiceVersions.xml"
_MAX_VERSIONS_XML = 1 << 20


def normalize_thumbprint(value: str) -> str:
    """ "AA:BB:.." (upper case, colons) from any spelling of a SHA-256 thumbprint.

    ValueError for anything else, SHA-1 included: SHA-1 pins are not accepted.
    """
    hexdigits = value.strip().replace(":", "").lower()
    if not _SHA256_HEX.fullmatch(hexdigits):
        raise ValueError(f"not a SHA-256 thumbprint (64 hex digits): {value!r}")
    return ":".join(hexdigits[i : i + 2] for i in range(0, 64, 2)).upper()


def thumbprint_of(der: bytes) -> str:
    """The SHA-256 thumbprint of a DER certificate, "AA:BB:.." as vSphere shows it."""
    return normalize_thumbprint(hashlib.sha256(der).hexdigest())


def probe_thumbprint(host: str, port: int = DEFAULT_PORT, timeout: float = 10.0) -> str:
    """The SHA-256 thumbprint of the certificate `host:port` presents, for registration.

    This reads the certificate without trusting it (that is the point: the operator
    compares it with the one vCenter shows and decides). Unreachable if no TLS answer.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # read-only look; nothing is sent over it
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise Unreachable(f"{host}:{port}: no TLS answer: {exc}") from exc
    if not der:
        raise Unreachable(f"{host}:{port}: presented no certificate")
    return thumbprint_of(der)


class _PinMismatch(ssl.SSLCertVerificationError):
    """Raised inside the handshake; an OSError, so the socket layer closes the socket."""

    def __init__(self, seen: str) -> None:
        super().__init__(f"certificate thumbprint {seen} is not the trusted one")
        self.seen = seen


class _PinnedSocket(ssl.SSLSocket):
    """Checks the peer certificate against the context's pin right after the handshake."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        context = self.context
        assert isinstance(context, _PinnedContext)
        der = self.getpeercert(binary_form=True)
        seen = thumbprint_of(der) if der else ""
        if seen != context.pin:
            raise _PinMismatch(seen)


class _PinnedContext(ssl.SSLContext):
    """A client context that trusts exactly one certificate, by SHA-256 thumbprint."""

    sslsocket_class = _PinnedSocket
    pin: str = ""


def _pinned_context(thumbprint: str) -> ssl.SSLContext:
    context = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
    context.pin = normalize_thumbprint(thumbprint)
    # The pin replaces chain and name checks; _PinnedSocket enforces it on every socket.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class Endpoint:
    """Where a vCenter is and how to trust and log in to it (one per registered vCenter)."""

    host: str
    user: str
    password: str = field(repr=False)
    port: int = DEFAULT_PORT
    thumbprint: str | None = None  # SHA-256 pin; None: verify against CAs
    cafile: Path | None = None  # extra CAs when not pinned
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.thumbprint is not None:
            object.__setattr__(self, "thumbprint", normalize_thumbprint(self.thumbprint))

    def ssl_context(self) -> ssl.SSLContext:
        if self.thumbprint:
            return _pinned_context(self.thumbprint)
        cafile = str(self.cafile) if self.cafile else None
        return ssl.create_default_context(cafile=cafile)

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


class Session:
    """A logged-in ServiceInstance. Use as a context manager; leaving it logs out."""

    def __init__(self, endpoint: Endpoint, si: Any, content: Any) -> None:
        self.endpoint = endpoint
        self.si = si
        self.content = content

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Log out (best effort: a vCenter gone away has dropped the session anyway)."""
        stub = self.si._stub
        try:
            self.content.sessionManager.Logout()
        except (vmodl.MethodFault, OSError, http.client.HTTPException) as exc:
            log.debug("logout from %s failed: %s", self.endpoint.label, exc)
        finally:
            stub.DropConnections()

    @property
    def api_version(self) -> str:
        return str(self.content.about.apiVersion)

    def ref(self, kind: type, moid: str) -> Any:
        """The managed object `moid` of `kind`, checked to exist (NotFound otherwise)."""
        obj = kind(moid, self.si._stub)
        try:
            obj.name  # noqa: B018 - a round trip that fails for a stale or wrong id
        except vmodl.fault.ManagedObjectNotFound as exc:
            raise NotFound(f"no {kind.__name__} {moid!r} on {self.endpoint.label}") from exc
        except (vmodl.MethodFault, OSError, http.client.HTTPException) as exc:
            raise translate(exc, f"look up {moid}") from exc
        return obj

    def objects(self, kind: type, root: Any = None) -> list[Any]:
        """All managed objects of `kind` under `root` (default: the whole inventory)."""
        with translated(f"list {kind.__name__}"):
            view = self.content.viewManager.CreateContainerView(
                root or self.content.rootFolder, [kind], True
            )
            try:
                return list(view.view)
            finally:
                view.Destroy()

    def collect(
        self, paths: dict[type, list[str]], root: Any = None
    ) -> list[tuple[Any, dict[str, Any]]]:
        """Properties of every object of the given types under `root`, in few round trips.

        `paths` maps a type to property paths (subtypes included, as vSphere does); the
        result pairs each object with {path: value}, unset properties left out.
        """
        pc = vmodl.query.PropertyCollector
        with translated("read inventory"):
            view = self.content.viewManager.CreateContainerView(
                root or self.content.rootFolder, list(paths), True
            )
            try:
                traverse = pc.TraversalSpec(
                    name="view", path="view", skip=False, type=vim.view.ContainerView
                )
                spec = pc.FilterSpec(
                    objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[traverse])],
                    propSet=[pc.PropertySpec(type=k, pathSet=v) for k, v in paths.items()],
                )
                collector = self.content.propertyCollector
                out: list[tuple[Any, dict[str, Any]]] = []
                result = collector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
                while result is not None:
                    for item in result.objects:
                        out.append((item.obj, {p.name: p.val for p in item.propSet or []}))
                    if not result.token:
                        break
                    result = collector.ContinueRetrievePropertiesEx(result.token)
                return out
            finally:
                view.Destroy()


def _negotiate_version(endpoint: Endpoint, context: ssl.SSLContext) -> str:
    """The newest vim25 API version both pyVmomi and the server speak.

    Also the first TLS contact, so certificate and reachability problems surface here
    with the session's own timeout.
    """
    conn = http.client.HTTPSConnection(
        endpoint.host, endpoint.port, timeout=endpoint.timeout, context=context
    )
    try:
        conn.request("GET", _VERSIONS_PATH)
        response = conn.getresponse()
        body = response.read(_MAX_VERSIONS_XML)
        status = response.status
    finally:
        conn.close()
    if status != 200:
        raise VSphereError(f"{endpoint.label} is not a vCenter/ESXi SDK (HTTP {status})")
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise VSphereError(f"{endpoint.label}: unreadable {_VERSIONS_PATH}") from exc
    offered: set[str] = set()
    for namespace in root.iter("namespace"):
        if namespace.findtext("name") == "urn:vim25":
            offered.update(v.text or "" for v in namespace.iter("version"))
    for version in GetServiceVersions("vim25"):
        if versionIdMap.get(version) in offered:
            return str(version)
    raise VSphereError(f"{endpoint.label} offers no API version pyVmomi speaks: {offered}")


def connect(endpoint: Endpoint) -> Session:
    """Open a verified connection and log in. Use the result as a context manager.

    Raises Unreachable, UntrustedCertificate (with the thumbprint seen), BadCredentials,
    or VSphereError for a server that is not a vCenter.
    """
    context = endpoint.ssl_context()
    try:
        version = _negotiate_version(endpoint, context)
        stub = SoapStubAdapter(
            host=endpoint.host,
            port=endpoint.port,
            version=version,
            sslContext=context,
            httpConnectionTimeout=endpoint.timeout,
        )
        si = vim.ServiceInstance("ServiceInstance", stub)
        content: Any = si.RetrieveContent()
        content.sessionManager.Login(endpoint.user, endpoint.password, None)
    except _PinMismatch as exc:
        raise UntrustedCertificate(
            f"{endpoint.label}: certificate {exc.seen} is not the trusted one",
            exc.seen,
        ) from exc
    except ssl.SSLCertVerificationError as exc:
        seen = _seen_thumbprint(endpoint)
        raise UntrustedCertificate(
            f"{endpoint.label}: certificate not trusted ({exc.verify_message}); "
            f"its thumbprint is {seen or 'unknown'}",
            seen,
        ) from exc
    except vim.fault.InvalidLogin as exc:
        raise BadCredentials(f"{endpoint.label}: user name or password refused") from exc
    except (vmodl.MethodFault, OSError, http.client.HTTPException) as exc:
        raise translate(exc, f"connect to {endpoint.label}") from exc
    log.info("logged in to %s as %s (API %s)", endpoint.label, endpoint.user, version)
    return Session(endpoint, si, content)


def _seen_thumbprint(endpoint: Endpoint) -> str:
    try:
        return probe_thumbprint(endpoint.host, endpoint.port, endpoint.timeout)
    except Unreachable:
        return ""
