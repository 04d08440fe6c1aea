"""How the lab starts the agent: the one place to adapt when its command line or
configuration keys change (agent/config.py AGENT_SETTINGS)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from appliance.daemon.cli import Unavailable
from appliance.lab.procs import spawn
from appliance.lab.state import Proc


def write_agent_config(path: Path, *, machine_id: str, state_dir: Path, disks: list[str]) -> None:
    """A managed agent: no process server and no TLS material here; enrolment with the
    configuration server provides both."""
    disk_list = ", ".join(json.dumps(d) for d in disks)
    path.write_text(
        f"""[agent]
machine_id = "{machine_id}"
state_dir = "{state_dir}"
disks = [{disk_list}]
tracker = "auto"
tag_interval = 5.0
freeze_timeout = 1.0
"""
    )


def enrol_agent(config: Path, server: str, passphrase_file: Path, log: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "enroll", "--config", str(config), "--server", server,
         "--passphrase-file", str(passphrase_file)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    with log.open("a") as f:
        f.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise Unavailable(f"the agent could not enrol: {done.stderr.strip()}", f"see {log}")


def start_agent(config: Path, log: Path) -> Proc:
    return spawn("agent", [sys.executable, "-m", "agent", "run", "--config", str(config)], log)


def agent_status_file(state_dir: Path) -> Path:
    return state_dir / "status.json"


def read_agent_status(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Per disk id, the agent's status of that disk ({} if it has not written any yet).
    Accepts {"disks": {id: {...}}}, {"disks": [{"disk_id": ...}]} or {id: {...}}."""
    try:
        raw = json.loads(agent_status_file(state_dir).read_text())
    except (OSError, ValueError):
        return {}
    disks = raw.get("disks", raw) if isinstance(raw, dict) else raw
    if isinstance(disks, list):
        return {str(d.get("disk_id")): d for d in disks if isinstance(d, dict)}
    if isinstance(disks, dict):
        return {k: v for k, v in disks.items() if isinstance(v, dict) and "device" in v}
    return {}
