"""Resolved configuration of `secondsite-configd`, from /etc/secondsite/config.toml."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.settings import Setting, host_port, load, parse_host_port, positive

DEFAULT_CONFIG = Path("/etc/secondsite/config.toml")
DEFAULT_STATE_DIR = Path("/var/lib/secondsite/config")
DEFAULT_PORT = 9440


def _bus(value: str) -> str | None:
    if value in ("system", "none") or "=" in value:
        return None
    return "must be system, none, or a D-Bus address such as unix:path=/run/x"


CONFIG_SETTINGS = (
    Setting("server.name", str, "", "this configuration server's name (default: host name)"),
    Setting(
        "server.listen",
        str,
        f"0.0.0.0:{DEFAULT_PORT}",
        "HOST:PORT components enrol with and report to",
        host_port,
    ),
    Setting(
        "server.names",
        list,
        (),
        "DNS names and addresses components reach it by (its certificate carries them; "
        "default: the host name and the listen address)",
    ),
    Setting(
        "server.state_dir", str, str(DEFAULT_STATE_DIR), "inventory, CA, passphrase, TLS material"
    ),
    Setting(
        "dbus.bus",
        str,
        "system",
        "bus for org.secondsite.Config1: system, none, or an address",
        _bus,
    ),
    Setting(
        "health.agent_timeout",
        float,
        60.0,
        "seconds without an agent report before a machine is disconnected",
        positive,
    ),
    Setting(
        "health.server_timeout",
        float,
        60.0,
        "seconds without a server report before it is disconnected",
        positive,
    ),
    Setting("reports.interval", float, 10.0, "seconds between components' reports", positive),
    Setting(
        "protection.auto", bool, True, "start protecting a machine as soon as its agent enrols"
    ),
)


@dataclass(frozen=True)
class ConfigdConfig:
    name: str
    host: str
    port: int
    names: tuple[str, ...]
    state_dir: Path
    bus: str
    agent_timeout: float
    server_timeout: float
    report_interval: float
    auto_protect: bool

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any] | None = None) -> ConfigdConfig:
        v = load(CONFIG_SETTINGS, path, overrides)
        host, port = parse_host_port(v["server.listen"])
        hostname = socket.gethostname()
        names = tuple(v["server.names"]) or tuple(
            dict.fromkeys(
                [
                    hostname,
                    "localhost",
                    *([host] if host not in ("0.0.0.0", "::") else ["127.0.0.1"]),
                ]
            )
        )
        return cls(
            name=(v["server.name"] or hostname).lower(),
            host=host,
            port=port,
            names=names,
            state_dir=Path(v["server.state_dir"]),
            bus=v["dbus.bus"],
            agent_timeout=v["health.agent_timeout"],
            server_timeout=v["health.server_timeout"],
            report_interval=v["reports.interval"],
            auto_protect=v["protection.auto"],
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}
