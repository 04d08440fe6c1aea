"""Resolved configuration of `secondsite-processd`, from /etc/secondsite/process.toml."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.settings import (
    Setting,
    host_port,
    in_range,
    load,
    non_negative,
    parse_host_port,
    positive,
)

DEFAULT_CONFIG = Path("/etc/secondsite/process.toml")
DEFAULT_STATE_DIR = Path("/var/lib/secondsite/process")
DEFAULT_PORT = 9441
MIB = 1024 * 1024


def optional_host_port(value: str) -> str | None:
    return host_port(value) if value else None


PROCESS_SETTINGS = (
    Setting("server.name", str, "", "name announced to peers (default: the host name)"),
    Setting("server.listen", str, f"0.0.0.0:{DEFAULT_PORT}", "HOST:PORT agents connect to",
            host_port),
    Setting("server.state_dir", str, str(DEFAULT_STATE_DIR), "spool, TLS material"),
    Setting("spool.directory", str, "", "the cache of received changes (default STATE/spool)"),
    Setting("spool.limit_gib", float, 8.0,
            "spool size at which agents are paused until the master target catches up",
            positive),
    Setting("spool.segment_mib", int, 16, "spool segment size", in_range(1, 1024)),
    Setting("tls.cert", str, "", "this server's certificate (default STATE/tls/process.crt)"),
    Setting("tls.key", str, "", "its private key (default STATE/tls/process.key)"),
    Setting("tls.ca", str, "", "the configuration server's CA (default STATE/tls/ca.crt)"),
    Setting("target.address", str, "",
            "HOST:PORT of the master target (empty: cache only until one is assigned)",
            optional_host_port),
    Setting("target.tls_name", str, "",
            "name the master target's certificate must carry (default: its host)"),
    Setting("stream.window_mib", int, 32, "unacknowledged MiB an agent may have per disk",
            in_range(1, 1024)),
    Setting("compression.level", int, 1, "zstd level toward the master target",
            in_range(1, 19)),
    Setting("compression.workers", int, 2, "compression threads", in_range(1, 64)),
    Setting("throttle.mbps", float, 0.0,
            "bandwidth limit toward the master target in megabit/s (0: none)", non_negative),
)  # fmt: skip


@dataclass(frozen=True)
class ProcessConfig:
    name: str
    host: str
    port: int
    state_dir: Path
    spool_dir: Path
    spool_limit_bytes: int
    segment_bytes: int
    tls_cert: Path
    tls_key: Path
    tls_ca: Path
    target: tuple[str, int] | None
    target_tls_name: str
    window_bytes: int
    compression_level: int
    compression_workers: int
    throttle_bytes_per_s: float | None

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any] | None = None) -> ProcessConfig:
        v = load(PROCESS_SETTINGS, path, overrides)
        state = Path(v["server.state_dir"])
        host, port = parse_host_port(v["server.listen"])
        target = parse_host_port(v["target.address"]) if v["target.address"] else None

        def under_state(key: str, default: Path) -> Path:
            return Path(v[key]) if v[key] else default

        mbps = v["throttle.mbps"]
        return cls(
            name=v["server.name"] or socket.gethostname(),
            host=host,
            port=port,
            state_dir=state,
            spool_dir=under_state("spool.directory", state / "spool"),
            spool_limit_bytes=int(v["spool.limit_gib"] * 1024 * MIB),
            segment_bytes=v["spool.segment_mib"] * MIB,
            tls_cert=under_state("tls.cert", state / "tls" / "process.crt"),
            tls_key=under_state("tls.key", state / "tls" / "process.key"),
            tls_ca=under_state("tls.ca", state / "tls" / "ca.crt"),
            target=target,
            target_tls_name=v["target.tls_name"] or (target[0] if target else ""),
            window_bytes=v["stream.window_mib"] * MIB,
            compression_level=v["compression.level"],
            compression_workers=v["compression.workers"],
            throttle_bytes_per_s=mbps * 1e6 / 8 if mbps else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}
