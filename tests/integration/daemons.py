"""Run real role daemons (secondsite-targetd, -processd) for tests: start, READY, kill, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.wire.connection import open_connection
from appliance.wire.messages import Hello, Request, Response
from appliance.wire.tls import client_context
from tests.conftest import TlsMaterial


@dataclass
class RoleDaemon:
    """One role daemon (`module` is run with -m) with its own state dir and config file."""

    state_dir: Path
    port: int
    tls: TlsMaterial
    extra_config: str = ""
    module: str = "appliance.target"
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    starts: int = 0
    host: str = "127.0.0.1"  # the listen address written into the config
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", NAME]
    static_tls: bool = True  # False: the daemon uses what it enrolled (STATE/tls/)

    def __post_init__(self) -> None:
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}.log"
        self.config = self.state_dir.parent / f"{self.state_dir.name}.toml"
        # The leading sections' keys come first: extra_config may open other sections.
        tls = (
            f"""
[tls]
cert = "{self.tls.server.cert}"
key = "{self.tls.server.key}"
ca = "{self.tls.ca.cert}"
"""
            if self.static_tls
            else ""
        )
        self.config.write_text(
            f"""
[server]
name = "{self.state_dir.name}"
listen = "{self.host}:{self.port}"
state_dir = "{self.state_dir}"
{tls}
{self.extra_config}
"""
        )

    @property
    def datastore(self) -> Path:
        return self.state_dir / "datastore"

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the daemon's command with its config and `args` to completion (--enroll)."""
        return subprocess.run(
            [*self.prefix, sys.executable, "-m", self.module, "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def start(self, timeout: float = 30, extra_args: tuple[str, ...] = ()) -> None:
        """Start the daemon and wait for READY=1 on our own NOTIFY_SOCKET."""
        assert self.process is None or self.process.poll() is not None
        notify_path = self.state_dir.parent / f"notify-{self.state_dir.name}"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(0.5)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1")
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    self.module,
                    "--config",
                    str(self.config),
                    *extra_args,
                ],
                env=env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.module} exited with {self.process.returncode}:\n"
                        + self.log_path.read_text()[-3000:]
                    )
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    continue
                if "READY=1" in message.splitlines():
                    return
            raise RuntimeError(f"{self.module} did not become ready:\n" + self.log_path.read_text())
        finally:
            notify.close()
            notify_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.terminate()
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def TargetDaemon(
    state_dir: Path, port: int, tls: TlsMaterial, extra_config: str = ""
) -> RoleDaemon:
    return RoleDaemon(state_dir, port, tls, extra_config, "appliance.target")


def ProcessDaemon(
    state_dir: Path, port: int, tls: TlsMaterial, target_port: int, extra_config: str = ""
) -> RoleDaemon:
    config = f'[target]\naddress = "127.0.0.1:{target_port}"\ntls_name = "localhost"\n'
    return RoleDaemon(state_dir, port, tls, config + extra_config, "appliance.process")


async def rpc(daemon: RoleDaemon, tls: TlsMaterial, method: str, **params: object) -> Any:
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    conn = await open_connection("127.0.0.1", daemon.port, ctx, server_hostname="localhost")
    try:
        await conn.send(Hello("admin", "test"))
        await conn.recv()
        await conn.send(Request.make(1, method, **params))
        while not isinstance(reply := await conn.recv(), Response):
            pass
        assert reply.ok, reply.result
        return json.loads(reply.result)
    finally:
        conn.close()
