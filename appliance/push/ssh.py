"""Commands and file copies over OpenSSH (the `ssh` client through subprocess).

Why OpenSSH and not asyncssh: it is the reference implementation every host already
speaks to, it keeps the known_hosts format and its checking (StrictHostKeyChecking)
to itself, and it adds no dependency to the appliance; the engine is blocking and runs
in a job's thread, so an asyncio SSH library buys nothing. Keys only: BatchMode=yes
makes any prompt (password, passphrase, unknown host) a clean failure instead of a
hang. Passwords would go through SSH_ASKPASS (OpenSSH >= 8.4, SSH_ASKPASS_REQUIRE=force)
reading a 0600 file; not done yet.

The client reads no user configuration (-F /dev/null) and no agent (SSH_AUTH_SOCK
unset): what the engine passes is all that is used. Exit status 255 is the client's
own failure, mapped here to the errors.py leaves from its message.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.push.errors import (
    BadCredentials,
    DiskFull,
    HostKeyChanged,
    PushError,
    UnknownHostKey,
    Unreachable,
)

SSH_FAILED = 255
# Commands on the host get systemd's default PATH, not the login shell's: the agent's
# venv is made by the python3 the service manager would find (a root .bashrc may put
# pyenv shims or the like first).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONNECT_TIMEOUT = 10


@dataclass(frozen=True)
class Target:
    host: str
    key: Path
    known_hosts: Path
    user: str = "root"
    port: int = 22

    @property
    def name(self) -> str:
        """The host as known_hosts names it."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.name}"


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    def last_line(self) -> str:
        lines = [x for x in (self.stderr or self.stdout).splitlines() if x.strip()]
        return lines[-1].strip() if lines else f"exit status {self.returncode}"


class Ssh:
    """One host; with `sudo`, every command runs through `sudo -n` (checked by the probe)."""

    def __init__(self, target: Target, *, sudo: bool = False, path: str = SYSTEM_PATH) -> None:
        self.target = target
        self.sudo = sudo
        self.path = path

    def args(self) -> list[str]:
        t = self.target
        options = {
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(t.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "UpdateHostKeys": "no",  # the known hosts file changes only through hostkeys.py
            "IdentitiesOnly": "yes",
            "IdentityFile": str(t.key),
            "ConnectTimeout": str(CONNECT_TIMEOUT),
            "ServerAliveInterval": "5",  # a dead link fails a copy in ~15 s, not never
            "ServerAliveCountMax": "3",
            "LogLevel": "ERROR",
        }
        opts = [arg for k, v in options.items() for arg in ("-o", f"{k}={v}")]
        return ["ssh", "-F", "/dev/null", *opts, "-p", str(t.port), "-l", t.user, t.host]

    def command(self, script: str) -> list[str]:
        env = "env " + shlex.quote(f"PATH={self.path}") + " LC_ALL=C sh -c "
        remote = ("sudo -n " if self.sudo else "") + env + shlex.quote(script)
        return [*self.args(), "--", remote]

    def run(
        self,
        script: str,
        *,
        stdin: bytes | Path | None = None,
        timeout: float = 120.0,
        what: str = "command",
    ) -> Result:
        """Run `script` with sh on the host; SSH-level failures raise, the script's own
        exit status is the caller's to judge. `stdin` is bytes or a local file."""
        env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
        env["LC_ALL"] = "C"
        try:
            if isinstance(stdin, Path):
                with stdin.open("rb") as fh:
                    done = subprocess.run(
                        self.command(script), stdin=fh, capture_output=True,
                        timeout=timeout, env=env, check=False,
                    )  # fmt: skip
            else:
                done = subprocess.run(
                    self.command(script), input=stdin or b"", capture_output=True,
                    timeout=timeout, env=env, check=False,
                )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise Unreachable(f"{self.target}: {what} timed out after {timeout:.0f} s") from None
        result = Result(
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )
        if result.returncode == SSH_FAILED:
            raise ssh_error(self.target, result.stderr)
        return result

    def check(self, script: str, *, what: str, error: type[PushError], **kw: object) -> str:
        """Run `script`; a non-zero exit raises `error` (DiskFull if the host said so)."""
        result = self.run(script, what=what, **kw)  # type: ignore[arg-type]
        if result.returncode != 0:
            raise failure(f"{self.target}: {what} failed", result, error)
        return result.stdout


def failure(message: str, result: Result, error: type[PushError]) -> PushError:
    detail = result.last_line()
    if "No space left on device" in result.stderr + result.stdout:
        return DiskFull(f"{message}: {detail}", "free space on the host and retry")
    return error(f"{message}: {detail}")


CHANGED = re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed")
UNKNOWN = re.compile(r"No \S+ host key is known for|Host key verification failed")
DENIED = re.compile(r"Permission denied|Too many authentication failures|Invalid user")


def ssh_error(target: Target, stderr: str) -> PushError:
    """The leaf for an ssh client failure (exit 255), from what the client printed."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    detail = lines[-1] if lines else "ssh failed without a message"
    if CHANGED.search(stderr):
        return HostKeyChanged(
            f"{target}: the host key has changed since it was trusted", known=(), offered=""
        )
    if UNKNOWN.search(stderr):
        return UnknownHostKey(f"{target}: the host key is not trusted yet", fingerprint="")
    if DENIED.search(stderr):
        return BadCredentials(
            f"{target}: authentication refused ({detail})",
            f"check that the key's public half is in {target.user}'s authorized_keys",
        )
    return Unreachable(f"{target}: {detail}", "check the address, the port and that sshd runs")
