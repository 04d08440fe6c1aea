"""Resolved configuration of `secondsite-agent run`, from /etc/secondsite/agent.toml.

The disk paths are only checked for form here; `resolve_disks` matches them against
discovery (whole disks only) when the agent starts.
"""

from __future__ import annotations

import os
import shlex
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.discovery import Disk, discover, skip_reason
from appliance.daemon.cli import ConfigError
from appliance.settings import (
    Setting,
    host_port,
    load,
    non_negative,
    parse_host_port,
    positive,
)

DEFAULT_CONFIG = Path("/etc/secondsite/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/secondsite/agent")


class TrackerChoice(StrEnum):
    AUTO = "auto"  # tracefs, else scan (logged once, with the reason)
    TRACEFS = "tracefs"
    SCAN = "scan"


def _tracker(value: str) -> str | None:
    choices = [c.value for c in TrackerChoice]
    return None if value in choices else f"must be one of {', '.join(choices)}"


def _process_server(value: str) -> str | None:
    return host_port(value) if value else None  # empty: reported with a hint at load


def _disk_paths(value: tuple[str, ...]) -> str | None:
    bad = [p for p in value if not p.startswith("/")]
    return f"must be absolute device paths (not {', '.join(bad)})" if bad else None


AGENT_SETTINGS = (
    Setting("agent.machine_id", str, "",
            "this machine's id at the target (default: the host name)"),
    Setting("agent.state_dir", str, str(DEFAULT_STATE_DIR),
            "replication state, status.json, TLS material"),
    Setting("agent.process_server", str, "",
            "HOST:PORT of the process server (empty: the configuration server assigns it)",
            _process_server),
    Setting("agent.tls_name", str, "",
            "name the process server's certificate must carry (default: its host)"),
    Setting("agent.disks", list, (), "whole disks to protect, e.g. [\"/dev/sdb\"]", _disk_paths),
    Setting("agent.tracker", str, "auto",
            "change tracker: auto (tracefs, else scan), tracefs or scan", _tracker),
    Setting("agent.tag_interval", float, 5.0,
            "seconds between crash-consistent tags (enrolled: the policy's)", positive),
    Setting("agent.app_interval", float, 3600.0,
            "seconds between app-consistent tags (0: none); the policy's when enrolled",
            non_negative),
    Setting("agent.pre_script", str, "",
            "command run before an app-consistent freeze (a non-zero exit skips that point)"),
    Setting("agent.post_script", str, "", "command run after an app-consistent thaw"),
    Setting("agent.freeze_timeout", float, 1.0, "hard bound of a filesystem freeze, seconds",
            positive),
    Setting("tls.cert", str, "", "this agent's certificate (default STATE/tls/agent.crt)"),
    Setting("tls.key", str, "", "its private key (default STATE/tls/agent.key)"),
    Setting("tls.ca", str, "", "the configuration server's CA (default STATE/tls/ca.crt)"),
)  # fmt: skip


@dataclass(frozen=True)
class AgentConfig:
    machine_id: str
    state_dir: Path
    process_host: str
    process_port: int
    tls_name: str
    disks: tuple[Path, ...]
    tracker: TrackerChoice
    tag_interval: float
    app_interval: float | None  # None: no app-consistent tags
    pre_script: tuple[str, ...]
    post_script: tuple[str, ...]
    freeze_timeout: float
    tls_cert: Path
    tls_key: Path
    tls_ca: Path
    managed: bool = False  # the configuration server says what to protect, and where

    @classmethod
    def load(
        cls, path: Path | None, overrides: dict[str, Any] | None = None, *, enrolling: bool = False
    ) -> AgentConfig:
        """The configuration; without agent.process_server the agent must have enrolled
        (the configuration server then assigns the process server) or be enrolling."""
        v = load(AGENT_SETTINGS, path, overrides)
        state = Path(v["agent.state_dir"])
        managed = not v["agent.process_server"]
        if managed and not enrolling and not (state / "enrolment.json").exists():
            where = f"{path}: " if path else ""
            raise ConfigError(
                f"{where}agent.process_server is not set and this agent has not enrolled",
                "run 'secondsite-agent enroll --server HOST:9440 --passphrase-file F', or set "
                'process_server = "ps1:9441" under [agent]',
            )
        host, port = ("", 0) if managed else parse_host_port(v["agent.process_server"])

        def under_state(key: str, default: Path) -> Path:
            return Path(v[key]) if v[key] else default

        return cls(
            machine_id=v["agent.machine_id"] or socket.gethostname(),
            state_dir=state,
            process_host=host,
            process_port=port,
            tls_name=v["agent.tls_name"] or host,
            managed=managed,
            disks=tuple(Path(p) for p in v["agent.disks"]),
            tracker=TrackerChoice(v["agent.tracker"]),
            tag_interval=v["agent.tag_interval"],
            app_interval=v["agent.app_interval"] or None,
            pre_script=tuple(shlex.split(v["agent.pre_script"])),
            post_script=tuple(shlex.split(v["agent.post_script"])),
            freeze_timeout=v["agent.freeze_timeout"],
            tls_cert=under_state("tls.cert", state / "tls" / "agent.crt"),
            tls_key=under_state("tls.key", state / "tls" / "agent.key"),
            tls_ca=under_state("tls.ca", state / "tls" / "ca.crt"),
        )

    def as_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return str(value) if isinstance(value, Path) else value

        return {k: plain(v) for k, v in self.__dict__.items()}


def resolve_disks(
    paths: Sequence[Path],
    *,
    sys_root: Path = Path("/sys"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
    dev_root: Path = Path("/dev"),
) -> list[Disk]:
    """The discovered whole disks `paths` name (symlinks such as /dev/disk/by-id/…
    followed), in order; ConfigError naming the first path that is not one."""
    if not paths:
        raise ConfigError(
            "agent.disks is empty: nothing to protect",
            'list whole disks under [agent], e.g. disks = ["/dev/sdb"]',
        )
    found = discover(sys_root, mountinfo, dev_root)
    chosen: list[Disk] = []
    for path in paths:
        disk = _match(path, found, sys_root)
        if disk.name in {d.name for d in chosen}:
            raise ConfigError(f"agent.disks names {disk.path} twice (as {path})")
        chosen.append(disk)
    return chosen


def _match(path: Path, found: list[Disk], sys_root: Path) -> Disk:
    if not path.exists():
        raise ConfigError(f"disk {path} does not exist", "check agent.disks")
    real = Path(os.path.realpath(path))
    st = real.stat()
    devno = (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISBLK(st.st_mode) else None
    for disk in found:
        if real == disk.path or devno == (disk.major, disk.minor):
            return disk
        for part in disk.partitions:
            if real.name == part.name or devno == (part.major, part.minor):
                raise ConfigError(
                    f"disk {path} is partition {part.name} of {disk.path}, not a whole disk",
                    f"protect the whole disk: {disk.path}",
                )
    reason = skip_reason(sys_root, real.name) if (sys_root / "block" / real.name).exists() else None
    raise ConfigError(
        f"disk {path} is not a protectable whole disk"
        + (f" ({reason})" if reason else " (not a block device in /sys/block)"),
        "protectable disks: " + (", ".join(str(d.path) for d in found) or "none found"),
    )
