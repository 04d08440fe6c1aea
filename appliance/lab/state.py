"""STATE/lab.json: everything `up` started, so that `down` can undo it even after a crash."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.storage.atomic import atomic_write

LAB_FILE = "lab.json"


@dataclass
class Proc:
    name: str
    pid: int
    argv: list[str]
    log: str


@dataclass
class LabDisk:
    name: str  # disk0, disk1, ... (materialised images are named after it)
    image: str
    device: str = ""  # /dev/loopN once attached
    mount: str = ""  # the mountpoint once mounted


@dataclass
class LabState:
    state_dir: str
    machine_id: str = "lab"
    size: int = 0
    config_port: int = 0
    target_port: int = 0
    process_port: int = 0
    bus_address: str = ""  # the lab's private system-like bus (secondsitectl --bus)
    pki: dict[str, str] = field(default_factory=dict)  # ca, admin_cert, admin_key
    procs: dict[str, Proc] = field(default_factory=dict)
    disks: list[LabDisk] = field(default_factory=list)
    churn_mbps: float = 0.0

    @property
    def path(self) -> Path:
        return Path(self.state_dir) / LAB_FILE

    def save(self) -> None:
        """Atomically: a crash leaves the old file or the new one, never half of one."""
        atomic_write(self.path, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, state_dir: Path) -> LabState | None:
        try:
            raw: dict[str, Any] = json.loads((state_dir / LAB_FILE).read_text())
        except FileNotFoundError:
            return None
        procs = {k: Proc(**v) for k, v in raw.pop("procs", {}).items()}
        disks = [LabDisk(**d) for d in raw.pop("disks", [])]
        return cls(**raw, procs=procs, disks=disks)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
