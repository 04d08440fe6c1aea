"""The console's push install and uninstall: what the form's values must be, the
options Config1 PushInstall / PushUninstall take, and what a finished job says
about the host key.

The form is checked here before anything is sent, with the same rules the server
applies (disks are device paths, one of key or password) and a few it leaves to SSH
(a host name or address, a user name, a port), so a typo is caught in the form and
not after a process server has tried. The key file is read by the console (the path
is on the appliance) only when the call is made; the password is never kept here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config.model import JobKind, JobState

DEFAULT_USER = "root"
DEFAULT_PORT = 22
_HOST = re.compile(r"[A-Za-z0-9_.:%-]{1,253}")  # a DNS name, IPv4 or IPv6 address
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
# How the job's error names the key of a first contact (appliance.config.push._refusal).
_FIRST_CONTACT = re.compile(r"presents the host key (\S+), not trusted yet")
_PUSH_KINDS = frozenset({JobKind.PUSH_INSTALL, JobKind.PUSH_UNINSTALL})


class FormError(ValueError):
    """A value the form cannot send; the message says which and why."""


@dataclass(frozen=True)
class Target:
    """Where to install (or uninstall) and as whom: everything but the secret."""

    host: str
    user: str
    port: int
    key_file: str  # "" when a password is used
    machine: str  # the machine's name, default the host
    disks: tuple[str, ...] = ()  # install only

    @property
    def uses_password(self) -> bool:
        return not self.key_file


def split_list(text: str) -> list[str]:
    """Comma- or space-separated values as typed."""
    return text.replace(",", " ").split()


def parse_target(
    *,
    host: str,
    user: str,
    port: str,
    key_file: str,
    password: str,
    machine: str,
    disks: str | None,
) -> Target:
    """The form's values checked; `disks` None for an uninstall (it takes none)."""
    host = host.strip()
    if not host:
        raise FormError("the host is empty: a name or address the process server can reach")
    if not _HOST.fullmatch(host) or host.startswith("-"):
        raise FormError(f"host {host!r} is not a host name or an IP address")
    user = user.strip() or DEFAULT_USER
    if not _USER.fullmatch(user):
        raise FormError(f"user {user!r} is not a user name")
    key_file = key_file.strip()
    if bool(key_file) == bool(password):
        raise FormError("fill in one of key file or password (not both)")
    if key_file and not key_file.startswith("/"):
        raise FormError(f"key file {key_file!r}: give the absolute path on this appliance")
    machine = machine.strip() or host
    if len(machine) > 253 or any(c.isspace() for c in machine):
        raise FormError(f"machine name {machine!r}: no spaces, at most 253 characters")
    found = tuple(split_list(disks)) if disks is not None else ()
    if disks is not None:
        if not found:
            raise FormError("name at least one disk to protect, e.g. /dev/sdb")
        bad = [d for d in found if not d.startswith("/dev/")]
        if bad:
            raise FormError(f"disks are device paths on the host, e.g. /dev/sdb: not {bad[0]}")
    return Target(host, user, _port(port), key_file, machine, found)


def _port(text: str) -> int:
    text = text.strip()
    if not text:
        return DEFAULT_PORT
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise FormError(f"port {text!r} is not a TCP port (1-65535)")
    return int(text)


def read_key(path: str) -> str:
    """The private key's text, read when the call is made (not kept afterwards)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise FormError(
            f"cannot read the key file {path}: {reason} (the console reads it as its own "
            "user, secondsite-console)"
        ) from None
    if "PRIVATE KEY" not in text:
        raise FormError(f"{path} is not a private key (no BEGIN ... PRIVATE KEY line)")
    return text


def options(
    target: Target, password: str, accept_fingerprint: str | None, *, install: bool
) -> dict[str, Any]:
    """PushInstall's (install) or PushUninstall's options, secret included: build it
    right before the call and drop it after."""
    out: dict[str, Any] = {"user": target.user, "machine": target.machine}
    if target.port != DEFAULT_PORT:
        out["port"] = target.port
    if target.uses_password:
        out["password"] = password
    else:
        out["key"] = read_key(target.key_file)
    if install:
        out["disks"] = list(target.disks)
    if accept_fingerprint:
        out["accept_fingerprint"] = accept_fingerprint
    return out


def review_lines(target: Target, *, install: bool) -> tuple[str, ...]:
    login = "a password (typed, not shown, not stored)" if target.uses_password else (
        f"the key in {target.key_file} (read now, not stored)"
    )  # fmt: skip
    lines = [f"Host       {target.host} port {target.port}", f"SSH user   {target.user}",
             f"Login      {login}", f"Machine    {target.machine}"]  # fmt: skip
    if install:
        lines += [
            f"Disks      {', '.join(target.disks)}",
            "",  # paragraphs: one line each, the screen wraps them
            "The least-loaded process server connects over SSH, checks the host, copies the "
            "agent, installs it under /opt with a systemd unit, enrols and starts it. A first "
            "contact stops before anything is copied and shows the host key.",
        ]
    else:
        lines += [
            "",
            "The process server serving the machine stops the agent and removes it from the "
            "host; then the machine's certificates are revoked and it is removed from the "
            "inventory: its replication stops.",
        ]
    return tuple(lines)


def first_contact(job: dict[str, Any]) -> str | None:
    """The fingerprint a failed push job asks the operator to check and accept, or
    None (any other outcome, a changed host key included: that one is refused)."""
    if job.get("kind") not in _PUSH_KINDS or job.get("state") != JobState.FAILED:
        return None
    found = _FIRST_CONTACT.search(str(job.get("error") or ""))
    return found.group(1) if found else None
