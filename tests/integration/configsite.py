"""A configuration-server site for integration tests: private bus, configd, and helpers
to enrol role daemons and agents through the passphrase (the `site` fixture)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.bus import PrivateBus
from tests.conftest import TlsMaterial, free_port
from tests.integration.daemons import RoleDaemon

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "units" / "dbus-1" / "system.d" / "org.secondsite.Config1.conf"


@dataclass
class Site:
    tmp: Path
    bus: PrivateBus
    configd: RoleDaemon
    passphrase_file: Path
    daemons: list[RoleDaemon]
    agents: list[subprocess.Popen[bytes]]
    tls: TlsMaterial  # unused by enrolled daemons; RoleDaemon wants one

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "appliance.ctl", "--bus", self.bus.address, *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        assert not check or done.returncode == 0, f"secondsitectl {args}: {done.stderr}"
        return done

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "--json").stdout)

    def role(self, name: str, module: str, extra: str = "") -> RoleDaemon:
        daemon = RoleDaemon(self.tmp / name, free_port(), self.tls, extra, module,
                            static_tls=False)  # fmt: skip
        daemon.state_dir.mkdir(exist_ok=True)
        self.daemons.append(daemon)
        return daemon

    def enrol(self, daemon: RoleDaemon) -> None:
        done = daemon.run("--enroll", f"127.0.0.1:{self.configd.port}",
                          "--passphrase-file", str(self.passphrase_file))  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "enrolled" in done.stdout

    def servers(self, datastore: Path) -> tuple[RoleDaemon, RoleDaemon]:
        """An enrolled master target keeping its replicas in `datastore` and an enrolled
        process server forwarding to it, both started: (target, process)."""
        target = self.role("target", "appliance.target",
                           f'[storage]\ndatastore = "{datastore}"\n')  # fmt: skip
        self.enrol(target)
        target.start()
        process = self.role("process", "appliance.process",
                            f'[target]\naddress = "127.0.0.1:{target.port}"\n')  # fmt: skip
        self.enrol(process)
        process.start()
        return target, process

    def agent(self, device: Path, name: str = "web1") -> subprocess.Popen[bytes]:
        state = self.tmp / f"agent-{name}"
        config = self.tmp / f"agent-{name}.toml"
        config.write_text(
            f'[agent]\nmachine_id = "{name}"\nstate_dir = "{state}"\n'
            f'disks = ["{device}"]\ntag_interval = 1.0\n'
        )
        done = subprocess.run(
            [sys.executable, "-m", "agent", "enroll", "--config", str(config), "--server",
             f"127.0.0.1:{self.configd.port}", "--passphrase-file", str(self.passphrase_file)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        log = (self.tmp / f"agent-{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.agents.append(proc)
        return proc

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 90.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if result := check():
                return result
            time.sleep(0.5)
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.tmp.glob("*.log"))
        )
        raise AssertionError(f"timed out waiting for {what}\n{logs}")


CONFIGD_EXTRA = """
[dbus]
bus = "{bus}"
[reports]
interval = 1.0
[health]
agent_timeout = 15.0
server_timeout = 15.0
"""


def start_site(
    tmp_path: Path, private_bus_factory: Callable[..., PrivateBus], tls: TlsMaterial
) -> Iterator[Site]:
    """Yields a Site with configd running; every process it started is stopped after."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    bus = private_bus_factory((POLICY,))
    s = Site(tmp_path, bus, None, tmp_path / "passphrase", [], [], tls)  # type: ignore[arg-type]
    s.configd = s.role("configd", "appliance.config", CONFIGD_EXTRA.format(bus=bus.address))
    s.configd.start()
    s.passphrase_file.write_text(s.ctl("passphrase").stdout.strip() + "\n")
    try:
        yield s
    finally:
        for proc in s.agents:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for daemon in reversed(s.daemons):
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.stop()


def machine(site: Site, name: str) -> dict[str, Any] | None:
    return next((m for m in site.ctl_json("machines") if m["name"] == name), None)
