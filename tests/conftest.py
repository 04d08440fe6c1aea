"""Real components shared by the suites: TLS material, loopback ports, a private bus."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.bus import PrivateBus, start_private_bus
from tests.pki import Authority, Leaf
from tests.vcsim.fixture import vcsim  # noqa: F401 - a fresh vCenter simulator per module


@dataclass(frozen=True)
class TlsMaterial:
    """A CA with a server and a client leaf, plus a rogue CA's client and an expired leaf."""

    ca: Authority
    server: Leaf
    client: Leaf
    rogue_ca: Authority
    rogue_client: Leaf
    expired_client: Leaf


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    base = tmp_path_factory.mktemp("pki")
    ca = Authority.create(base / "ca", "Secondsite Test CA")
    rogue = Authority.create(base / "rogue", "Rogue CA")
    return TlsMaterial(
        ca=ca,
        server=ca.issue("target.test"),
        client=ca.issue("process.test"),
        rogue_ca=rogue,
        rogue_client=rogue.issue("intruder.test"),
        expired_client=ca.issue("expired.test", days=1, not_before_days=-10),
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def private_bus_factory(tmp_path: Path) -> Iterator[Callable[..., PrivateBus]]:
    """Start private system-like buses with the given policy files; all stopped at teardown."""
    buses: list[PrivateBus] = []

    def start(policies: tuple[Path, ...] = ()) -> PrivateBus:
        bus = start_private_bus(tmp_path / f"bus{len(buses)}", policies)
        buses.append(bus)
        return bus

    yield start
    for bus in buses:
        bus.stop()


@pytest.fixture
def private_bus(private_bus_factory: Callable[..., PrivateBus]) -> PrivateBus:
    return private_bus_factory()


@pytest.fixture
def sites(tmp_path: Path, tls: TlsMaterial) -> Iterator[tuple[Any, Any]]:
    """A running processd forwarding to a running targetd: (process, target) RoleDaemons."""
    from tests.integration.daemons import ProcessDaemon, TargetDaemon

    target = TargetDaemon(tmp_path / "target", free_port(), tls)
    process = ProcessDaemon(tmp_path / "process", free_port(), tls, target.port)
    for d in (target, process):
        d.state_dir.mkdir()
    target.start()
    process.start()
    yield process, target
    for d in (process, target):
        if d.process and d.process.poll() is None:
            d.kill()
