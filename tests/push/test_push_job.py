"""secondsitectl push-install / push-uninstall end to end: configd places the job on an
enrolled processd, which installs the agent over SSH on a real sshd in a network
namespace (host.py) as a user with sudo, logging in with a password; the agent enrols
and its machine reaches `protected`. The job shows the engine's steps while it runs.
Then push-uninstall removes the agent, revokes its certificates and drops the machine.
The credentials are in no job, no listing and not in the inventory's file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from appliance.push.bundle import SHIPPED_ENV, Bundle
from appliance.push.install import Step
from tests.integration.configsite import Site, machine
from tests.loopfs import loop_ext4
from tests.push.host import PASSWORD, Relay, SourceHost
from tests.push.test_push import agent_pid, kill_agent, left_behind

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]

#: The engine's steps a fresh install goes through (appliance.push.install.Step).
ENGINE_STEPS = ("host-key", "probe", "copy", "install", "configure", "enrol", "service")


def follow(site: Site, job_id: str) -> tuple[dict[str, object], set[str]]:
    """Poll `secondsitectl job ID` (text) to the end: the job, and every Detail line
    seen while it was running."""
    details: set[str] = set()

    def finished() -> dict[str, object] | None:
        text = site.ctl("job", job_id).stdout
        if "running" in text:
            details.update(x.split(":", 1)[1].strip() for x in text.splitlines()
                           if x.strip().startswith("Detail:"))  # fmt: skip
        job = site.ctl_json("job", job_id)
        return job if job["state"] in ("succeeded", "failed") else None

    return site.wait(f"job {job_id}", finished, timeout=600), details


def test_push_install_and_uninstall_jobs(  # noqa: PLR0917 - fixtures
    site: Site, host: SourceHost, bundle: Bundle, prefix: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    target = site.role("target", "appliance.target",
                       f'[storage]\ndatastore = "{tmp_path / "datastore"}"\n')  # fmt: skip
    site.enrol(target)
    target.start()
    process = site.role("process", "appliance.process",
                        f'[target]\naddress = "127.0.0.1:{target.port}"\n')  # fmt: skip
    # The agent runs in the host's namespace: it reaches processd at the veth address.
    process.config.write_text(process.config.read_text().replace(
        f'listen = "127.0.0.1:{process.port}"', f'listen = "0.0.0.0:{process.port}"'))  # fmt: skip
    done = process.run("--enroll", f"127.0.0.1:{site.configd.port}", "--passphrase-file",
                       str(site.passphrase_file), "--advertise",
                       f"{host.outside}:{process.port}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    shipped = tmp_path / "shipped"  # as the image carries them: no build, no cache
    shipped.mkdir()
    shutil.copy(bundle.path, shipped)
    monkeypatch.setenv(SHIPPED_ENV, str(shipped))
    process.start()
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    relay = Relay(host.outside, ("127.0.0.1", site.configd.port))
    # The agent checks configd's certificate: it must reach it by a name the certificate
    # carries (this machine's name), which the source host resolves to the relay.
    host.outside_names = (socket.gethostname(),)
    host.start_sshd()
    try:
        with loop_ext4(tmp_path, 32) as (device, mnt):
            (mnt / "data.txt").write_text("pushed and protected\n" * 1000)
            login = ["--user", "pushpw", "--test-prefix", str(prefix)]
            push = ["push-install", host.addr, *login, "--disk", str(device), "--machine",
                    "push1", "--server", f"{socket.gethostname()}:{relay.port}",
                    "--test-without-systemd"]  # fmt: skip
            first = site.ctl(*push, "--password-file", str(password), "--wait", check=False)
            fingerprint = host.host_key_fingerprint()
            assert first.returncode == 1, first.stderr
            assert f"--accept-fingerprint {fingerprint}" in first.stdout + first.stderr
            push += ["--accept-fingerprint", fingerprint]

            refused = site.ctl(*push, "--password-file", str(wrong), "--wait", check=False)
            assert refused.returncode == 1
            job = site.ctl_json("job", refused.stdout.splitlines()[0])
            assert job["state"] == "failed" and "authentication failed" in job["error"], job
            assert left_behind(prefix) == []

            started = site.ctl(*push, "--password-file", str(password))
            job, details = follow(site, started.stdout.strip())
            assert job["state"] == "succeeded", job
            result = job["result"]
            assert isinstance(result, dict)
            assert result["report"]["action"] == "installed"
            assert result["process_server"] == "process"
            seen = [line.split(":")[0] for line in result["steps"]]
            assert [s for s in ENGINE_STEPS if s in seen] == list(ENGINE_STEPS), seen
            # Shown while running: at least the venv install (seconds of pip) was seen, and
            # only an install's steps (the temp dir's cleanup too, when a poll catches it).
            install_steps = {str(step) for step in Step} - {Step.REMOVE}
            assert details and all(d.split(":")[0] in install_steps for d in details), details
            site.wait("push1 protected",
                      lambda: (m := machine(site, "push1")) and m["state"] == "protected",
                      timeout=180)  # fmt: skip
            pid = agent_pid(prefix)

            gone = site.ctl("push-uninstall", host.addr, *login, "--machine", "push1",
                            "--password-file", str(password), "--wait")  # fmt: skip
            job = site.ctl_json("job", gone.stdout.splitlines()[0])
            assert job["state"] == "succeeded", job
            assert job["result"]["machine"] == "push1"
            assert machine(site, "push1") is None
            assert left_behind(prefix) == []
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            with sqlite3.connect(site.configd.state_dir / "inventory.db") as db:
                rows = db.execute("SELECT revoked_at FROM certificates WHERE name = 'push1'")
                revoked = [r[0] for r in rows]
            assert revoked and all(r is not None for r in revoked), revoked

            jobs = site.ctl_json("jobs", "--all")
            assert PASSWORD not in json.dumps(jobs)
            assert all("password" not in j["params"] and "key" not in j["params"] for j in jobs)
            stored = (site.configd.state_dir / "inventory.db").read_bytes().decode("latin-1")
            assert PASSWORD not in stored
            assert PASSWORD not in process.log_path.read_text()
            assert PASSWORD not in site.configd.log_path.read_text()
    finally:
        relay.close()
        kill_agent(prefix)
        subprocess.run(["sync"], check=False)
