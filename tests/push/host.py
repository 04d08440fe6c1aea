"""A "source host" for push-install tests: a network namespace joined to this one by a
veth pair, running Debian's real sshd with its own config and host keys.

The namespace shares this machine's filesystem, so the tests point every install path
at a temp root (push_install's `prefix`). `Relay` makes a TCP port of the root
namespace's loopback (configd) reachable at the veth address from inside.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_numbers = itertools.count()
#: Users of the source host besides root, with their sudo rights; all of them (and
#: root) log in with the test key or PASSWORD.
USERS = {"pushsudo": "NOPASSWD: ALL", "pushpw": "ALL", "pushnone": ""}
PASSWORD = "correct horse 'battery' $taple"  # quotes and $: the askpass must pass it intact


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=check)


def keypair(path: Path) -> Path:
    """A fresh ed25519 key at `path` (public half at path.pub)."""
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "push-test", "-f", str(path))
    return path


@dataclass
class SourceHost:
    tmp: Path
    authorized_key: Path  # public key file root may log in with
    n: int = field(default_factory=lambda: next(_numbers) + os.getpid() % 200 * 10)
    sshd: subprocess.Popen[bytes] | None = None
    port: int = 22
    keys_generation: int = 0
    public: Path | None = None  # a directory every user may read
    #: Names that resolve to `outside` on the host (its /etc/hosts): TLS names of
    #: daemons in this namespace, reached through a Relay.
    outside_names: tuple[str, ...] = ()

    @property
    def ns(self) -> str:
        return f"sspush{self.n}"

    @property
    def host_if(self) -> str:
        return f"vsp{self.n}h"

    @property
    def addr(self) -> str:  # sshd, inside
        return f"10.231.{self.n % 250}.2"

    @property
    def outside(self) -> str:  # this namespace's end
        return f"10.231.{self.n % 250}.1"

    def up(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0",
           "netns", self.ns)  # fmt: skip
        sh("ip", "addr", "add", f"{self.outside}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.addr}/24", "dev", "eth0")
        sh("ip", "-n", self.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")

    def down(self) -> None:
        self.stop_sshd()
        sh("ip", "netns", "del", self.ns, check=False)  # takes the veth pair with it
        sh("ip", "link", "del", self.host_if, check=False)
        if self.public is not None:
            shutil.rmtree(self.public, ignore_errors=True)

    def start_sshd(self, *, new_keys: bool = False) -> None:
        """(Re)start sshd; `new_keys`: a fresh host key (a reinstalled host)."""
        self.stop_sshd()
        if new_keys or self.keys_generation == 0:
            self.keys_generation += 1
        hostkey = self.tmp / f"ssh_host_ed25519_key.{self.keys_generation}"
        if not hostkey.exists():
            keypair(hostkey)
        # sshd reads the keys as the user, who cannot see into pytest's 0700 temp dirs.
        if self.public is None:
            self.public = Path(tempfile.mkdtemp(prefix="sspush-keys."))
            self.public.chmod(0o755)
        shutil.copy(self.authorized_key, self.public / "authorized_keys")
        (self.public / "authorized_keys").chmod(0o644)
        config = self.tmp / "sshd_config"
        lines = [
            f"ListenAddress {self.addr}:{self.port}",
            f"HostKey {hostkey}",
            f"PidFile {self.tmp / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.public / 'authorized_keys'}",  # every user's
            "UsePAM no",
            "PermitRootLogin yes",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "StrictModes no",
            f"AllowUsers root {' '.join(USERS)}",
        ]
        config.write_text("\n".join(lines) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        log = (self.tmp / "sshd.log").open("ab")
        # `ip netns exec` gives sshd a mount namespace of its own (a slave of this one):
        # the users, their passwords and sudo rights are bind-mounted there only.
        binds = " && ".join(f"mount --bind {f} /etc/{f.name}" for f in self.accounts())
        self.sshd = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "sh", "-c",
             f"{binds} && exec /usr/sbin/sshd -D -e -f {config}"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((self.addr, self.port), 1):
                return
            assert self.sshd.poll() is None, (self.tmp / "sshd.log").read_text()
            time.sleep(0.1)
        raise AssertionError("sshd did not listen: " + (self.tmp / "sshd.log").read_text())

    def accounts(self) -> list[Path]:
        """passwd, shadow, sudoers with the test users (USERS) added; hosts."""
        out = self.tmp / "etc"
        out.mkdir(exist_ok=True)
        hashed = sh("openssl", "passwd", "-6", PASSWORD).stdout.strip()
        passwd = Path("/etc/passwd").read_text()
        shadow = "".join(
            f"root:{hashed}:19000:0:99999:7:::\n" if x.startswith("root:") else x + "\n"
            for x in Path("/etc/shadow").read_text().splitlines()
        )
        sudoers = "Defaults lecture=never\nroot ALL=(ALL:ALL) ALL\n"
        for uid, (user, rights) in enumerate(USERS.items(), 4301):
            passwd += f"{user}:x:{uid}:65534::/:/bin/sh\n"
            shadow += f"{user}:{hashed}:19000:0:99999:7:::\n"
            sudoers += f"{user} ALL=(ALL:ALL) {rights}\n" if rights else ""
        hosts = "".join(f"{self.outside} {n}\n" for n in self.outside_names)
        files = {"passwd": (passwd, 0o644), "shadow": (shadow, 0o640),
                 "sudoers": (sudoers, 0o440),
                 "hosts": (hosts + Path("/etc/hosts").read_text(), 0o644)}  # fmt: skip
        for name, (text, mode) in files.items():
            (out / name).write_text(text)
            (out / name).chmod(mode)
        return [out / name for name in files]

    def stop_sshd(self) -> None:
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(10)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait()
        self.sshd = None

    def host_key_fingerprint(self) -> str:
        pub = self.tmp / f"ssh_host_ed25519_key.{self.keys_generation}.pub"
        return sh("ssh-keygen", "-l", "-f", str(pub)).stdout.split()[1]


@contextlib.contextmanager
def source_host(tmp: Path, authorized_key: Path) -> Iterator[SourceHost]:
    if os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists() or not shutil.which("ip"):
        pytest.skip("needs root, iproute2 and openssh-server")
    host = SourceHost(tmp, authorized_key)
    try:
        host.up()
        host.start_sshd()
        yield host
    finally:
        host.down()


class Relay:
    """Forwards TCP connections from (listen_host, port) to (target_host, target_port)."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server((listen_host, 0))
        self.port = self.server.getsockname()[1]
        self.closing = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.server.accept()
                upstream = socket.create_connection(self.target, 10)
            except OSError:
                continue
            self.sockets += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closing = True
        self.server.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()
