"""Resolved configuration of `secondsite-targetd`, from /etc/secondsite/target.toml.

Every key lives in TARGET_SETTINGS; the table also feeds `--help`. Paths left empty
derive from the state directory, so a fresh appliance needs no file at all.
"""

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

DEFAULT_CONFIG = Path("/etc/secondsite/target.toml")
DEFAULT_STATE_DIR = Path("/var/lib/secondsite/target")
DEFAULT_PORT = 9442
MIB = 1024 * 1024

TARGET_SETTINGS = (
    Setting("server.name", str, "", "name announced to peers (default: the host name)"),
    Setting("server.listen", str, f"0.0.0.0:{DEFAULT_PORT}", "HOST:PORT to serve", host_port),
    Setting("server.state_dir", str, str(DEFAULT_STATE_DIR), "catalogue, journals, TLS"),
    Setting("storage.datastore", str, "", "replica VMDK directory (default STATE/datastore)"),
    Setting("tls.cert", str, "", "this server's certificate (default STATE/tls/target.crt)"),
    Setting("tls.key", str, "", "its private key (default STATE/tls/target.key)"),
    Setting("tls.ca", str, "", "the configuration server's CA (default STATE/tls/ca.crt)"),
    Setting(
        "stream.window_mib",
        int,
        32,  # 64 took targetd past 150 MiB RSS at full rate (make bench)
        "unacknowledged MiB a sender may have per disk (it bounds targetd's memory)",
        in_range(1, 4096),
    ),
    Setting(
        "stream.checkpoint_seconds",
        float,
        1.0,
        "longest time applied data waits before it is made durable and acknowledged",
        positive,
    ),
    Setting("journal.level", int, 1, "zstd level of the undo journal", in_range(1, 19)),
    Setting("journal.segment_mib", int, 64, "undo journal segment size", in_range(1, 4096)),
    Setting("journal.batch_mib", int, 8, "bytes applied per journal fsync", in_range(1, 256)),
    Setting("retention.hours", float, 72.0, "keep recovery points this long", positive),
    Setting("retention.journal_gib", float, 64.0, "undo journal size limit per disk", positive),
    Setting(
        "retention.prune_seconds",
        float,
        60.0,
        "how often retention runs (0: never)",
        non_negative,
    ),
)


@dataclass(frozen=True)
class TargetConfig:
    name: str
    host: str
    port: int
    state_dir: Path
    datastore: Path
    tls_cert: Path
    tls_key: Path
    tls_ca: Path
    window_bytes: int
    checkpoint_seconds: float
    journal_level: int
    segment_bytes: int
    batch_bytes: int
    retention_seconds: float
    retention_bytes: int
    prune_seconds: float

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any] | None = None) -> TargetConfig:
        v = load(TARGET_SETTINGS, path, overrides)
        state = Path(v["server.state_dir"])
        host, port = parse_host_port(v["server.listen"])

        def under_state(key: str, default: Path) -> Path:
            return Path(v[key]) if v[key] else default

        return cls(
            name=v["server.name"] or socket.gethostname(),
            host=host,
            port=port,
            state_dir=state,
            datastore=under_state("storage.datastore", state / "datastore"),
            tls_cert=under_state("tls.cert", state / "tls" / "target.crt"),
            tls_key=under_state("tls.key", state / "tls" / "target.key"),
            tls_ca=under_state("tls.ca", state / "tls" / "ca.crt"),
            window_bytes=v["stream.window_mib"] * MIB,
            checkpoint_seconds=v["stream.checkpoint_seconds"],
            journal_level=v["journal.level"],
            segment_bytes=v["journal.segment_mib"] * MIB,
            batch_bytes=v["journal.batch_mib"] * MIB,
            retention_seconds=v["retention.hours"] * 3600.0,
            retention_bytes=int(v["retention.journal_gib"] * 1024 * MIB),
            prune_seconds=v["retention.prune_seconds"],
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}
