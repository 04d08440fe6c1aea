"""Trust on first use of SSH host keys, in a known_hosts file the engine owns.

Before the first connection to an address the engine asks the host for its key
(ssh-keyscan, preferring ed25519, then ECDSA, then RSA). No entry yet: UnknownHostKey
carries the SHA256 fingerprint, which the operator checks and passes back as
`accept`; only then is the key stored (the file replaced atomically). An entry that
does not match the offered key: HostKeyChanged, and nothing else is attempted. The ssh
client then checks the same file itself on every connection (StrictHostKeyChecking),
so a host that shows one key to the scan and another to the session is refused too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from appliance.push.errors import HostKeyChanged, UnknownHostKey, Unreachable
from appliance.push.ssh import CONNECT_TIMEOUT, Target, require_client

PREFERENCE = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
              "ssh-rsa")  # fmt: skip


def fingerprint(key_b64: str) -> str:
    """OpenSSH's SHA256 fingerprint of a base64 public key blob."""
    try:
        blob = base64.b64decode(key_b64, validate=True)
    except binascii.Error:
        raise ValueError(f"not a base64 key: {key_b64[:20]}...") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def known_keys(known_hosts: Path, name: str) -> list[tuple[str, str]]:
    """(type, base64 key) of the plain entries for `name`."""
    try:
        lines = known_hosts.read_text().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and not line.startswith(("#", "@")) and name in fields[0].split(","):
            found.append((fields[1], fields[2]))
    return found


def scan(target: Target) -> tuple[str, str]:
    """(type, base64 key) the host offers, by preference; Unreachable if none."""
    require_client("ssh-keyscan")
    try:
        done = subprocess.run(
            ["ssh-keyscan", "-T", str(CONNECT_TIMEOUT), "-p", str(target.port),
             "-t", "ed25519,ecdsa,rsa", target.host],
            capture_output=True, text=True, timeout=CONNECT_TIMEOUT * 3 + 5, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        done = subprocess.CompletedProcess([], 1, "", "timed out")
    offered = {}
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not line.startswith("#"):
            offered[fields[1]] = fields[2]
    for kind in PREFERENCE:
        if kind in offered:
            return kind, offered[kind]
    raise Unreachable(
        f"{target.name}: no SSH host key offered (nothing answers SSH there?)",
        "check the address, the port and that sshd runs",
    )


def verify(target: Target, accept: str | None = None) -> str:
    """The trusted fingerprint of the host's key, storing it if `accept` names it."""
    kind, key = scan(target)
    offered = fingerprint(key)
    known = known_keys(target.known_hosts, target.name)
    if known:
        if (kind, key) in known:
            return offered
        raise HostKeyChanged(
            f"{target.name}: host key changed: it offers {kind} {offered}, trusted is "
            + ", ".join(f"{k} {fingerprint(b)}" for k, b in known),
            known=tuple(fingerprint(b) for _, b in known),
            offered=offered,
        )
    if accept != offered:
        raise UnknownHostKey(
            f"{target.name}: first connection, host key {kind} {offered}", fingerprint=offered
        )
    _append(target.known_hosts, f"{target.name} {kind} {key}\n")
    return offered


def forget(known_hosts: Path, name: str) -> None:
    """Drop `name`'s entries (after the operator confirmed a reinstalled host)."""
    try:
        lines = known_hosts.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = [x for x in lines if not x.split() or name not in x.split()[0].split(",")]
    _replace(known_hosts, "".join(kept))


def _append(path: Path, line: str) -> None:
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = ""
    _replace(path, old + line)


def _replace(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".known_hosts.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
