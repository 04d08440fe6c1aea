"""The configuration server with everything real around it.

A private system-like D-Bus with our policy, `secondsite-configd`, a master target and
a process server that enrol with the passphrase `secondsitectl passphrase` shows, and
an agent on a mounted loop ext4 disk that enrols and is protected without any static
wiring. Then: RPO visible in `secondsitectl status --json`, an alert raised when the
master target stops for longer than the RPO threshold and cleared when it returns,
and a configuration server killed in the middle of an enable-protection job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.configsite import Site, machine
from tests.loopfs import loop_ext4

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]


def test_enrol_protect_rpo_and_alert_cycle(site: Site, tmp_path: Path) -> None:
    target, _process = site.servers(tmp_path / "datastore")
    servers = site.wait("both servers reporting", lambda: [
        s for s in site.ctl_json("servers") if s["connected"]] if len([
        s for s in site.ctl_json("servers") if s["connected"]]) == 2 else None)  # fmt: skip
    assert {s["role"] for s in servers} == {"process", "target"}

    with loop_ext4(tmp_path, 64) as (device, mnt):
        (mnt / "hello.txt").write_text("protected by secondsite\n" * 1000)
        os.sync()
        site.agent(device)
        site.wait(
            "web1 protected", lambda: (m := machine(site, "web1")) and m["state"] == "protected"
        )
        status = site.ctl_json("status")
        assert status["machines"]["by_state"].get("protected") == 1
        assert 0 <= status["worst_rpo_seconds"] < 30
        (job,) = [j for j in site.ctl_json("jobs", "--all") if j["kind"] == "protect"]
        assert job["state"] == "succeeded" and job["subject"] == "web1"
        m = machine(site, "web1")
        assert m is not None
        assert (m["process_server"], m["master_target"]) == ("process", "target")
        points = site.ctl_json("points", "web1")
        assert points and all(p["usable"] for p in points)

        # The master target goes away for longer than the threshold: an alert, then
        # it comes back and the alert clears (below 80% of the threshold).
        site.ctl("policy", "set", "default", "--rpo-threshold", "6s")
        target.stop()

        def rpo_alert() -> list[dict[str, Any]]:
            return [a for a in site.ctl_json("alerts")
                    if a["kind"] == "rpo-exceeded" and a["subject"] == "web1"]  # fmt: skip

        site.wait("an RPO alert", rpo_alert, timeout=60)
        assert machine(site, "web1")["state"] in ("rpo-exceeded", "disconnected")  # type: ignore[index]
        target.start()
        site.wait("the RPO alert cleared", lambda: not rpo_alert(), timeout=90)
        cleared = [a for a in site.ctl_json("alerts", "--all") if a["kind"] == "rpo-exceeded"]
        assert cleared and all(a.get("cleared_at") for a in cleared)
        events = site.ctl_json("events", "-n", "200")
        assert any(e["kind"] == "rpo-exceeded" for e in events)


def test_configd_killed_mid_protect_job_finishes_it_once(site: Site, tmp_path: Path) -> None:
    site.servers(tmp_path / "datastore")
    with loop_ext4(tmp_path, 32) as (device, _):
        # Enrolment starts the job; it waits for the agent, which is not running yet.
        state = tmp_path / "agent-web2"
        config = tmp_path / "agent-web2.toml"
        config.write_text(f'[agent]\nmachine_id = "web2"\nstate_dir = "{state}"\n'
                          f'disks = ["{device}"]\ntag_interval = 1.0\n')  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "agent", "enroll", "--config", str(config), "--server",
             f"127.0.0.1:{site.configd.port}", "--passphrase-file", str(site.passphrase_file)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        (job,) = site.ctl_json("jobs")
        site.wait("the job waiting for the agent",
                  lambda: site.ctl_json("job", job["id"])["step"] == "agent")  # fmt: skip
        site.configd.kill()
        site.configd.start()
        log = (tmp_path / "agent-web2.log").open("ab")
        site.agents.append(subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        ))  # fmt: skip

        def finished_job() -> dict[str, Any] | None:
            record: dict[str, Any] = site.ctl_json("job", job["id"])
            return record if record.get("finished_at") else None

        finished = site.wait("the resumed job", finished_job)
        assert finished["state"] == "succeeded", finished
        jobs = site.ctl_json("jobs", "--all")
        assert [j["id"] for j in jobs if j["kind"] == "protect"] == [job["id"]]
        site.wait(
            "web2 protected", lambda: (m := machine(site, "web2")) and m["state"] == "protected"
        )


def test_revoking_an_agent_cuts_it_off_everywhere(site: Site, tmp_path: Path) -> None:
    """The process server learns the revoked serial from its next report and cuts the
    agent's live connection; the agent's reconnects are refused at the handshake."""
    import time

    from appliance.config.ca import CertificateAuthority
    from appliance.config.model import ComponentKind
    from appliance.lab.rpc import call

    _target, process = site.servers(tmp_path / "datastore")
    ca = CertificateAuthority.open_or_create(site.configd.state_dir / "ca")
    cert, key = ca.issue_local("test-admin", ComponentKind.ADMIN, [], tmp_path / "admin")
    creds = (cert, key, ca.ca_path)

    def agent_connected() -> bool:
        disks = call(process.port, creds, "status", timeout=10)["disks"]
        return any(d["connected"] for d in disks)

    with loop_ext4(tmp_path, 32) as (device, _):
        site.agent(device)
        site.wait("web1 protected",
                  lambda: (m := machine(site, "web1")) and m["state"] == "protected")  # fmt: skip
        assert agent_connected()
        site.ctl("revoke", "web1")
        site.wait("the process server cutting the agent", lambda: not agent_connected(), 30)
        time.sleep(3)  # the agent keeps trying: every attempt is refused
        assert not agent_connected()
        assert any(e["kind"] == "revoked" for e in site.ctl_json("events", "-n", "50"))
