"""Commands and file copies over OpenSSH (the `ssh` client through subprocess).

Why OpenSSH and not asyncssh: it is the reference implementation every host already
speaks to, it keeps the known_hosts format and its checking (StrictHostKeyChecking)
to itself, and it adds no dependency to the appliance; the engine is blocking and runs
in a job's thread, so an asyncio SSH library buys nothing.

With a key, BatchMode=yes makes any prompt (passphrase, unknown host) a clean failure
instead of a hang. With a password, only password and keyboard-interactive are
tried, once: the client asks askpass.py's helper (SSH_ASKPASS_REQUIRE=force, OpenSSH
>= 8.4), which prints the secret from the client's environment; the secret is never
on disk. (An inherited pipe would be neater but ssh closes every fd above 2 at start.)
Through `sudo -S` (a user whose sudo needs its password), the secret is the first line
of the command's stdin: sudo reads its password byte by byte up to the newline, so the
rest reaches the command untouched.

The client reads no user configuration (-F /dev/null) and no agent (SSH_AUTH_SOCK
unset): what the engine passes is all that is used. Exit status 255 is the client's
own failure, mapped here to the errors.py leaves from its message.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from appliance.push.askpass import SECRET_ENV, helper
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
    key: Path | None  # None: log in with `password`
    known_hosts: Path
    user: str = "root"
    port: int = 22
    password: str | None = field(default=None, repr=False)

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


class Sudo(StrEnum):
    """How commands get root: as root already, `sudo -n`, or `sudo -S` fed the password."""

    NONE = ""
    NOPASSWD = "sudo -n "
    PASSWORD = "sudo -S -k -p '' "  # -k: always asks, so the password line is always read


class Ssh:
    """One host; commands run through `sudo` as the probe found it works."""

    def __init__(self, target: Target, *, sudo: Sudo = Sudo.NONE, path: str = SYSTEM_PATH) -> None:
        if sudo is Sudo.PASSWORD and not target.password:
            raise ValueError("sudo -S needs the password")
        self.target = target
        self.sudo = sudo
        self.path = path

    def args(self) -> list[str]:
        t = self.target
        auth = (
            {"BatchMode": "yes", "IdentitiesOnly": "yes", "IdentityFile": str(t.key)}
            if t.password is None
            else {  # BatchMode would disable askpass; one prompt: a wrong password fails
                "BatchMode": "no",
                "PreferredAuthentications": "password,keyboard-interactive",
                "PubkeyAuthentication": "no",
                "NumberOfPasswordPrompts": "1",
            }
        )
        options = {
            **auth,
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(t.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "UpdateHostKeys": "no",  # the known hosts file changes only through hostkeys.py
            "ConnectTimeout": str(CONNECT_TIMEOUT),
            "ServerAliveInterval": "5",  # a dead link fails a copy in ~15 s, not never
            "ServerAliveCountMax": "3",
            "LogLevel": "ERROR",
        }
        opts = [arg for k, v in options.items() for arg in ("-o", f"{k}={v}")]
        return ["ssh", "-F", "/dev/null", *opts, "-p", str(t.port), "-l", t.user, t.host]

    def command(self, script: str) -> list[str]:
        env = "env " + shlex.quote(f"PATH={self.path}") + " LC_ALL=C sh -c "
        return [*self.args(), "--", self.sudo.value + env + shlex.quote(script)]

    def env(self) -> dict[str, str]:
        """The client's environment: no agent; with a password, the askpass helper."""
        env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", SECRET_ENV)}
        env["LC_ALL"] = "C"
        if self.target.password is not None:
            env |= {"SSH_ASKPASS": str(helper()), "SSH_ASKPASS_REQUIRE": "force",
                    SECRET_ENV: self.target.password}  # fmt: skip
            env.setdefault("DISPLAY", ":0")  # OpenSSH < 9.0 wants one even when forced
        return env

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
        require_client("ssh")
        first = (self.target.password or "").encode() + b"\n" if self.sudo is Sudo.PASSWORD else b""
        try:
            if isinstance(stdin, Path) and first:
                code, out, err = _stream(self.command(script), first, stdin, timeout, self.env())
            elif isinstance(stdin, Path):  # the client reads the file itself
                with stdin.open("rb") as fh:
                    done = subprocess.run(
                        self.command(script), stdin=fh, capture_output=True,
                        timeout=timeout, env=self.env(), check=False,
                    )  # fmt: skip
                code, out, err = done.returncode, done.stdout, done.stderr
            else:
                done = subprocess.run(
                    self.command(script), input=first + (stdin or b""), capture_output=True,
                    timeout=timeout, env=self.env(), check=False,
                )  # fmt: skip
                code, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired:
            raise Unreachable(f"{self.target}: {what} timed out after {timeout:.0f} s") from None
        result = Result(code, out.decode(errors="replace"), err.decode(errors="replace"))
        if result.returncode == SSH_FAILED:
            raise ssh_error(self.target, result.stderr)
        return result

    def check(self, script: str, *, what: str, error: type[PushError], **kw: object) -> str:
        """Run `script`; a non-zero exit raises `error` (DiskFull if the host said so)."""
        result = self.run(script, what=what, **kw)  # type: ignore[arg-type]
        if result.returncode != 0:
            raise failure(f"{self.target}: {what} failed", result, error)
        return result.stdout


def require_client(program: str) -> None:
    """A clear failure where the process server has no OpenSSH client."""
    if shutil.which(program) is None:
        raise PushError(
            f"{program} is not installed on this process server",
            "install the OpenSSH client (Debian: openssh-client)",
        )


def _stream(
    command: list[str], first: bytes, path: Path, timeout: float, env: dict[str, str]
) -> tuple[int, bytes, bytes]:
    """Run `command` with `first` then the file's bytes as stdin, without reading the
    file into memory (a pipe fed by a thread; Popen.communicate would close it)."""
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(command, stdin=read_end, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)  # fmt: skip
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError), os.fdopen(write_end, "wb") as out:
            out.write(first)
            with path.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    finally:
        writer.join()
    return proc.returncode, out, err


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
            f"{target}: authentication failed ({detail})",
            f"check the user and the password of {target.user}"
            if target.password is not None
            else f"check that the key's public half is in {target.user}'s authorized_keys",
        )
    return Unreachable(f"{target}: {detail}", "check the address, the port and that sshd runs")
