"""vcsim, govmomi's vSphere simulator, as a real test peer: build it, run it, stop it.

`tests/vcsim/main.go` is our vcsim command, built by `tests/vcsim/build.sh` into
`<repo>/.cache/vcsim/vcsim`. The module-scoped `vcsim` fixture starts a fresh simulator
per test module (its state accumulates) on a free loopback port with a user name and
password, and stops it with SIGTERM so that it removes its datastore directories, which
are real local directories. A test module can size the inventory by defining
`VCSIM_INVENTORY = Inventory(...)` at module level. Register the fixture in a conftest
with `from tests.vcsim.fixture import vcsim  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD_SCRIPT = HERE / "build.sh"
#: Where build.sh puts the binary; VCSIM_CACHE_DIR moves it (build.sh reads it too).
CACHE_DIR = Path(os.environ.get("VCSIM_CACHE_DIR") or REPO / ".cache" / "vcsim")
BUILD_TIMEOUT = 900.0  # a fresh machine installs ~80 MB of Debian packages first


class VcsimError(RuntimeError):
    """vcsim could not be built, started or stopped."""


@dataclass(frozen=True)
class Inventory:
    """The simulated inventory; defaults are vcsim's own vCenter model.

    Names follow the simulator: datacenters DC0.., clusters DC0_C0.., cluster hosts
    DC0_C0_H0.., standalone hosts DC0_H0.., datastores LocalDS_0.. (one directory each per
    datacenter, mounted on all its hosts), distributed port groups DC0_DVPG0.. on a switch
    DVS0, VMs DC0_H0_VM0 / DC0_C0_RP0_VM0 (on LocalDS_0). Every host also has the standard
    port group "VM Network" on vSwitch0.
    """

    datacenters: int = 1
    clusters: int = 1  # per datacenter
    hosts_per_cluster: int = 3
    standalone_hosts: int = 1  # per datacenter
    vms: int = 2  # per standalone host, per cluster (its root pool) and per vApp
    datastores: int = 1  # per datacenter
    dv_portgroups: int = 1  # per datacenter; > 0 also creates the switch DVS0
    resource_pools: int = 0  # child pools per cluster
    folders: int = 0  # datacenters placed inside a folder
    vapps: int = 0  # per cluster
    storage_pods: int = 0  # per datacenter
    autostart: bool = True  # power on the model's VMs
    esx: bool = False  # a standalone ESXi instead of a vCenter: only datastores/vms apply

    def args(self) -> list[str]:
        common = [f"-vm={self.vms}", f"-ds={self.datastores}", f"-autostart={self.autostart}"]
        if self.esx:
            return ["-esx", *common]
        return [
            f"-dc={self.datacenters}",
            f"-cluster={self.clusters}",
            f"-host={self.hosts_per_cluster}",
            f"-standalone-host={self.standalone_hosts}",
            f"-pg={self.dv_portgroups}",
            f"-pool={self.resource_pools}",
            f"-folder={self.folders}",
            f"-app={self.vapps}",
            f"-pod={self.storage_pods}",
            *common,
        ]

    @property
    def host_count(self) -> int:
        if self.esx:
            return 1
        per_dc = self.standalone_hosts + self.clusters * self.hosts_per_cluster
        return self.datacenters * per_dc

    @property
    def vm_count(self) -> int:
        if self.esx:
            return self.vms
        pools = self.standalone_hosts + self.clusters * (1 + self.vapps)
        return self.datacenters * pools * self.vms

    @property
    def datastore_count(self) -> int:
        return self.datastores * (1 if self.esx else self.datacenters)


@dataclass
class Vcsim:
    """One vcsim process. `start()` returns once it serves; `stop()` shuts it down."""

    binary: Path | None = None  # default: ensure_built()
    log_dir: Path | None = None  # default: a temporary directory removed by stop()
    url: str = ""
    host: str = ""
    port: int = 0
    user: str = ""
    password: str = ""
    #: "<datacenter>/<datastore>" -> the local directory behind it, e.g. "DC0/LocalDS_0"
    datastores: dict[str, Path] = field(default_factory=dict)
    cert_sha1: str = ""  # "AA:BB:..", as vSphere shows thumbprints
    cert_sha256: str = ""
    process: subprocess.Popen[bytes] | None = None
    _own_log_dir: bool = False

    def start(
        self,
        port: int = 0,
        user: str = "user",
        password: str = "pass",
        inventory: Inventory | None = None,
        *,
        listen_host: str = "127.0.0.1",
        cert: Path | None = None,
        key: Path | None = None,
        extra_args: tuple[str, ...] = (),
        timeout: float = 30.0,
    ) -> Vcsim:
        """Start vcsim on listen_host:port (0: any free port) and wait for its URL line."""
        if self.process is not None:
            raise VcsimError("already started")
        binary = self.binary or ensure_built()
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="vcsim-"))
            self._own_log_dir = True
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(binary),
            f"-listen={listen_host}:{port}",
            f"-username={user}",
            f"-password={password}",
            "-exit-on-stdin-eof",  # a parent that dies without stop() still cleans up
            *(inventory or Inventory()).args(),
        ]
        if cert is not None and key is not None:
            cmd += [f"-cert={cert}", f"-key={key}"]
        cmd += extra_args
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True
            )
        self.user, self.password = user, password
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def stdout_path(self) -> Path:
        assert self.log_dir is not None
        return self.log_dir / "vcsim.out"

    @property
    def stderr_path(self) -> Path:
        assert self.log_dir is not None
        return self.log_dir / "vcsim.err"

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            header = self.stdout_path.read_text(errors="replace")
            if "VCSIM_URL=" in header and header.endswith("\n"):
                break
            code = self.process.poll()
            if code is not None:
                raise VcsimError(f"vcsim exited with {code}:\n{self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise VcsimError(f"vcsim not ready after {timeout:.0f} s:\n{self.stderr_tail()}")
            time.sleep(0.02)
        self._parse_header(header)

    def _parse_header(self, header: str) -> None:
        for line in header.splitlines():
            key, _, value = line.partition("=")
            if key == "VCSIM_URL":
                self.url = value
            elif key == "VCSIM_CERT_SHA1":
                self.cert_sha1 = value
            elif key == "VCSIM_CERT_SHA256":
                self.cert_sha256 = value
            elif key == "VCSIM_DATASTORE":
                name, _, path = value.partition("=")
                self.datastores[name] = Path(path)
        hostport = self.url.split("://", 1)[1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)

    def datastore_dir(self, name: str = "LocalDS_0", datacenter: str = "DC0") -> Path:
        """The local directory behind a datastore (vcsim's ESX model: "ha-datacenter")."""
        return self.datastores[f"{datacenter}/{name}"]

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait; SIGKILL only if it does not exit (then remove its directories).

        Returns the exit status (0 after a clean SIGTERM shutdown), None if never started.
        """
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                # SIGKILL skips vcsim's own cleanup of its datastore directories.
                for path in self.datastores.values():
                    shutil.rmtree(path, ignore_errors=True)
        if proc.stdin is not None:
            proc.stdin.close()
        if self._own_log_dir and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        return proc.returncode

    def __enter__(self) -> Vcsim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def server_pem(self) -> str:
        """The certificate vcsim serves, checked against the thumbprint it printed."""
        pem = ssl.get_server_certificate((self.host, self.port), timeout=10)
        der = ssl.PEM_cert_to_DER_cert(pem)
        if thumbprint(hashlib.sha256(der).digest()) != self.cert_sha256:
            raise VcsimError(f"{self.host}:{self.port} serves a certificate vcsim did not print")
        return pem

    def ssl_context(self, cafile: Path | None = None) -> ssl.SSLContext:
        """A verifying client context for this server only (no verify-off anywhere).

        With cafile (a CA that issued -cert), trust that CA; otherwise trust exactly the
        certificate vcsim serves (Go's self-signed 127.0.0.1 test certificate by default).
        """
        if cafile is not None:
            return ssl.create_default_context(cafile=str(cafile))
        return ssl.create_default_context(cadata=self.server_pem())

    def connect(self, user: str | None = None, password: str | None = None) -> Any:
        """A pyVmomi ServiceInstance logged in (by default with the right credentials)."""
        from pyVim.connect import SmartConnect

        return SmartConnect(
            host=self.host,
            port=self.port,
            user=self.user if user is None else user,
            pwd=self.password if password is None else password,
            sslContext=self.ssl_context(),
        )


def thumbprint(digest: bytes) -> str:
    """AA:BB:.. as vSphere (and vcsim's VCSIM_CERT_* lines) write certificate digests."""
    return ":".join(f"{b:02X}" for b in digest)


@functools.cache
def ensure_built() -> Path:
    """Run build.sh once per session (a no-op when cached); returns the vcsim binary.

    VCSIM_BINARY names a prebuilt binary instead. A file lock keeps parallel sessions
    (and xdist workers) from building at the same time.
    """
    prebuilt = os.environ.get("VCSIM_BINARY")
    if prebuilt:
        return Path(prebuilt)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE_DIR / ".ensure.lock"):
        try:
            result = subprocess.run(
                ["bash", str(BUILD_SCRIPT)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise VcsimError(f"build.sh took more than {BUILD_TIMEOUT:.0f} s") from e
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise VcsimError(f"build.sh failed ({result.returncode}):\n{output}")
    binary = CACHE_DIR / "vcsim"
    if not os.access(binary, os.X_OK):
        raise VcsimError(f"build.sh did not produce {binary}")
    return binary


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[IO[bytes]]:
    with path.open("ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def vcsim(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Vcsim]:
    """A fresh vcsim for this test module on a free 127.0.0.1 port, with credentials.

    Size it with a module-level `VCSIM_INVENTORY = Inventory(...)`.
    """
    inventory = getattr(request.module, "VCSIM_INVENTORY", None) or Inventory()
    sim = Vcsim(ensure_built(), log_dir=tmp_path_factory.mktemp("vcsim"))
    sim.start(
        port=0,
        user="secondsite@vsphere.local",
        password=secrets.token_urlsafe(12),
        inventory=inventory,
    )
    yield sim
    code = sim.stop()
    if code not in (0, None):
        pytest.fail(f"vcsim exited with {code}:\n{sim.stderr_tail()}")
