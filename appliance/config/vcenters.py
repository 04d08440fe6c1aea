"""Registered vCenters: the inventory row (address, pinned thumbprint) and the credentials.

The inventory holds what may be shown (name, site, address, SHA-256 thumbprint); the
user name and password live only in one root-only file beside it, never in the
database, the job records or the logs. Registration follows vCenter's own first
connect: `probe` shows the certificate's thumbprint, the operator compares it with the
one vCenter displays, and `register` pins it. Every later session checks the pin.

Credentials file (JSON object, mode 0600, replaced atomically on every change)::

    {"version": 1, "vcenters": {"<name>": {"user": "...", "password": "..."}}}
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config.api import Record
from appliance.config.errors import ConfigServerError, Conflict, InvalidArgument, NotFound
from appliance.config.inventory import Inventory
from appliance.storage.atomic import atomic_write
from appliance.vsphere.errors import VSphereError
from appliance.vsphere.session import (
    DEFAULT_PORT,
    Endpoint,
    Session,
    connect,
    normalize_thumbprint,
    probe_thumbprint,
)

log = logging.getLogger(__name__)

SECRETS_FILE = "vcenters.json"  # in the configuration server's state directory
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of "host", "host:port" or "[v6]:port"; 443 when no port is given."""
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise InvalidArgument(f"vCenter address {address!r}: expected host or host:port")
    return host, int(port) if port else DEFAULT_PORT


class VCenterStore:
    """Registration and sessions for the vCenters of the inventory."""

    def __init__(self, inventory: Inventory, secrets: Path, *, timeout: float = 30.0) -> None:
        self._inventory = inventory
        self.secrets = secrets
        self._timeout = timeout

    # -- registration ----------------------------------------------------------------

    def probe(self, address: str) -> str:
        """The SHA-256 thumbprint `address` presents, to show before trusting it."""
        host, port = split_address(address)
        try:
            return probe_thumbprint(host, port, self._timeout)
        except VSphereError as exc:
            raise ConfigServerError(str(exc)) from None

    def register(
        self,
        name: str,
        site: str,
        address: str,
        credentials: Credentials,
        thumbprint: str | None,
        *,
        verify: bool = True,
    ) -> Record:
        """Record a vCenter and its credentials; with `verify`, log in once first.

        `thumbprint` (SHA-256) pins the certificate; None trusts the system CAs. The
        login check turns a typo into an error now rather than at failover time.
        """
        host, port = split_address(address)
        pin = _pin(thumbprint)
        if any(v["name"] == name for v in self._inventory.vcenters()):
            raise Conflict(f"vCenter {name!r} already exists")
        if verify:
            self._check(self._endpoint(host, port, credentials, pin))
        # Credentials first: a crash before the row leaves an unused secret, never a
        # vCenter that cannot log in.
        self._write_credentials(name, credentials)
        return self._inventory.add_vcenter(name, site, f"{host}:{port}", pin)

    def set_credentials(self, name: str, credentials: Credentials, *, verify: bool = True) -> None:
        record = self._record(name)
        if verify:
            host, port = split_address(record["address"])
            self._check(self._endpoint(host, port, credentials, record["thumbprint"]))
        self._write_credentials(name, credentials)

    def set_thumbprint(self, name: str, thumbprint: str | None) -> Record:
        """Trust another certificate (vCenter's was renewed); None: the system CAs."""
        return self._inventory.set_vcenter_thumbprint(name, _pin(thumbprint))

    # -- sessions --------------------------------------------------------------------

    def endpoint(self, name: str) -> Endpoint:
        record = self._record(name)
        creds = self._read().get(name)
        if creds is None:
            raise NotFound(
                f"no credentials for vCenter {name!r}; set them with "
                f"'secondsitectl vcenter credentials {name}'"
            )
        host, port = split_address(record["address"])
        return self._endpoint(host, port, creds, record["thumbprint"])

    def open_session(self, name: str) -> Session:
        """A logged-in session (blocking; use it as a context manager).

        Raises the vSphere layer's errors (BadCredentials, Unreachable, ...)."""
        return connect(self.endpoint(name))

    # -- internals -------------------------------------------------------------------

    def _record(self, name: str) -> Record:
        for record in self._inventory.vcenters():
            if record["name"] == name:
                return record
        raise NotFound(f"no vCenter named {name!r}")

    def _endpoint(
        self, host: str, port: int, creds: Credentials, thumbprint: str | None
    ) -> Endpoint:
        return Endpoint(
            host=host,
            port=port,
            user=creds.user,
            password=creds.password,
            thumbprint=thumbprint,
            timeout=self._timeout,
        )

    def _check(self, endpoint: Endpoint) -> None:
        try:
            with connect(endpoint):
                pass
        except VSphereError as exc:
            text = str(exc)  # most name the endpoint already
            where = "" if text.startswith(endpoint.label) else f"{endpoint.label}: "
            raise InvalidArgument(f"vCenter {where}{text}") from None

    def _read(self) -> dict[str, Credentials]:
        try:
            fd = os.open(self.secrets, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        with os.fdopen(fd, "rb") as fh:
            if stat.S_IMODE(os.fstat(fh.fileno()).st_mode) & 0o077:
                raise ConfigServerError(
                    f"{self.secrets} is readable by others; chmod 600 it and change the "
                    "vCenter passwords it holds"
                )
            raw = fh.read()
        try:
            body = json.loads(raw)
            entries = body["vcenters"]
            return {n: Credentials(str(e["user"]), str(e["password"])) for n, e in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # The message names the file and the flaw, never the contents.
            raise ConfigServerError(f"{self.secrets} is damaged ({type(exc).__name__})") from None

    def _write_credentials(self, name: str, creds: Credentials) -> None:
        entries: dict[str, Any] = {
            n: {"user": c.user, "password": c.password} for n, c in self._read().items()
        }
        entries[name] = {"user": creds.user, "password": creds.password}
        body = {"version": FORMAT_VERSION, "vcenters": entries}
        self.secrets.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.secrets, json.dumps(body, sort_keys=True).encode(), 0o600)
        log.info("credentials of vCenter %s stored (user %s)", name, creds.user)


def _pin(thumbprint: str | None) -> str | None:
    if thumbprint is None:
        return None
    try:
        return normalize_thumbprint(thumbprint)
    except ValueError as exc:
        raise InvalidArgument(f"thumbprint: {exc}") from None
