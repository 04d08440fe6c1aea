"""`secondsite-agent`: configuration errors are one line with exit 3, `status` without
a live agent is exit 3 with a hint, and `run` end to end (real processd + targetd, a
mounted ext4 loop disk) reaches a recovery point and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.config import AgentConfig, TrackerChoice, resolve_disks
from agent.status import bar, render, running
from appliance.daemon.cli import ConfigError
from appliance.settings import Setting, load
from tests.agent.helpers import write_file
from tests.agent.test_discovery import fake_host  # noqa: F401 - fixture
from tests.conftest import TlsMaterial
from tests.integration.daemons import RoleDaemon, rpc
from tests.loopfs import loop_ext4


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


# -- settings: the list kind -------------------------------------------------------


def test_list_setting_takes_an_array_of_strings(tmp_path: Path) -> None:
    table = [Setting("a.items", list, (), "things")]
    f = write_config(tmp_path / "c.toml", '[a]\nitems = ["x", "y"]\n')
    assert load(table, f)["a.items"] == ("x", "y")
    assert load(table, None)["a.items"] == ()
    f.write_text('[a]\nitems = ["x", 1]\n')
    with pytest.raises(ConfigError, match="is not a list of strings"):
        load(table, f)
    f.write_text('[a]\nitems = "x"\n')
    with pytest.raises(ConfigError, match="is not a list of strings"):
        load(table, f)


# -- run: configuration errors -----------------------------------------------------


def test_defaults_and_derived_values(tmp_path: Path) -> None:
    f = write_config(
        tmp_path / "a.toml",
        '[agent]\nprocess_server = "ps1:9441"\nstate_dir = "/s"\ndisks = ["/dev/sdb"]\n',
    )
    config = AgentConfig.load(f)
    assert (config.process_host, config.process_port, config.tls_name) == ("ps1", 9441, "ps1")
    assert config.machine_id == socket.gethostname()
    assert config.tracker is TrackerChoice.AUTO
    assert (config.tag_interval, config.freeze_timeout) == (5.0, 1.0)
    assert config.disks == (Path("/dev/sdb"),)
    assert config.tls_cert == Path("/s/tls/agent.crt")
    assert config.tls_ca == Path("/s/tls/ca.crt")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[agent]\ndisks = []\n", "process_server is not set and this agent has not enrolled"),
        ('[agent]\nprocess_server = "ps1"\n', "must be HOST:PORT"),
        ('[agent]\nprocess_server = "ps1:1"\ntracker = "inotify"\n',
         "agent.tracker = 'inotify' must be one of auto, tracefs, scan"),
        ('[agent]\nprocess_server = "ps1:1"\ndisks = "/dev/sda"\n', "is not a list of strings"),
        ('[agent]\nprocess_server = "ps1:1"\nfreeze_timeout = 0\n', "greater than zero"),
        ('[agent]\nprocess_server = "ps1:1"\ndisk = []\n', "unknown setting 'agent.disk'"),
    ],
)  # fmt: skip
def test_config_errors_are_one_line_with_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, expected: str
) -> None:
    f = write_config(tmp_path / "a.toml", body)
    code, out, err = run_cli(capsys, "run", "--config", str(f))
    assert code == 3
    assert err.count("\n") == 1 and err.startswith("secondsite-agent: error: ")
    assert expected in err
    assert "Traceback" not in err and out == ""


def test_a_disk_that_does_not_exist_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write_config(
        tmp_path / "a.toml",
        f'[agent]\nprocess_server = "ps1:1"\nstate_dir = "{tmp_path}/s"\n'
        'disks = ["/dev/no-such-disk-here"]\n',
    )
    code, _, err = run_cli(capsys, "run", "--config", str(f))
    assert code == 3 and err.count("\n") == 1
    assert "disk /dev/no-such-disk-here does not exist" in err


def test_no_disks_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"agent\.disks is empty"):
        resolve_disks([])


def test_a_partition_is_refused_naming_its_disk(
    fake_host: tuple[Path, Path],  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    sys_root, mountinfo = fake_host
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("sda", "sda1", "zram0"):
        (dev / name).touch()
    (dev / "by-id").mkdir()
    (dev / "by-id" / "disk-part1").symlink_to(dev / "sda1")
    kw: dict[str, Any] = {"sys_root": sys_root, "mountinfo": mountinfo, "dev_root": dev}
    assert [d.name for d in resolve_disks([dev / "sda"], **kw)] == ["sda"]
    with pytest.raises(ConfigError, match=r"is partition sda1 of .*/sda, not a whole disk") as exc:
        resolve_disks([dev / "by-id" / "disk-part1"], **kw)
    assert exc.value.hint is not None and exc.value.hint.endswith("/dev/sda")
    with pytest.raises(ConfigError, match=r"zram0 is not a protectable whole disk"):
        resolve_disks([dev / "zram0"], **kw)
    with pytest.raises(ConfigError, match=r"names .* twice"):
        resolve_disks([dev / "sda", dev / "sda"], **kw)


# -- status --------------------------------------------------------------------------


def test_status_without_a_status_file_is_exit_3_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra in ([], ["--json"]):
        code, out, err = run_cli(capsys, "status", "--state-dir", str(tmp_path), *extra)
        assert code == 3 and out == ""
        assert err.count("\n") == 1 and "the agent is not running (hint: start it" in err


def status_document(pid: int, age: float) -> dict[str, Any]:
    return {
        "pid": pid, "time": time.time() - age, "machine_id": "m1", "phase": "initial-sync",
        "connection": "open", "process_server": "ps1:9441",
        "disks": {"m1-sdb": {
            "device": "/dev/sdb", "size": 64 << 20, "tracker": "tracefs", "phase": "initial-sync",
            "initial": {"percent": 50.0, "done": False, "eta_seconds": 12.0},
            "acked_seq": 7, "last_tag_time": None, "tags": 0, "untagged_rounds": 2,
            "last_untagged_reason": None,
        }},
    }  # fmt: skip


def test_stale_or_dead_status_is_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "status.json").write_text(json.dumps(status_document(os.getpid(), 30)))
    code, out, err = run_cli(capsys, "status", "--state-dir", str(tmp_path))
    assert code == 3 and out == "" and err.count("\n") == 1
    assert "is 30 s old" in err and "not updating its status" in err and "hint:" in err
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / "status.json").write_text(json.dumps(status_document(int(dead.stdout), 0)))
    code, out, _ = run_cli(capsys, "status", "--state-dir", str(tmp_path), "--json")
    assert code == 3 and json.loads(out)["running"] is False


def test_fresh_status_renders_per_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "status.json").write_text(json.dumps(status_document(os.getpid(), 0.5)))
    code, out, _ = run_cli(capsys, "status", "--state-dir", str(tmp_path))
    assert code == 0
    assert "m1-sdb: /dev/sdb, 64 MiB, tracefs tracker" in out
    assert f"{bar(50.0)}  50.0%  ETA 12 s" in out
    assert "acked seq 7, last tag none yet (0 this run), untagged rounds 2" in out
    code, out, _ = run_cli(capsys, "status", "--state-dir", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["running"] is True
    assert bar(0.0).count("#") == 0 and bar(100.0).count("-") == 0
    assert "initial-sync" in render(status_document(1, 0))
    assert not running(status_document(os.getpid(), 6))


# -- run, end to end -------------------------------------------------------------------


def start_agent(config: Path, log: Path, notify_path: Path) -> subprocess.Popen[bytes]:
    """`python -m agent run` with our NOTIFY_SOCKET; returns once it sent READY=1."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.5)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1")
    with log.open("ab") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            assert agent.poll() is None, log.read_text()
            try:
                if "READY=1" in notify.recv(4096).decode().splitlines():
                    return agent
            except TimeoutError:
                continue
        raise AssertionError("the agent did not send READY=1:\n" + log.read_text())
    finally:
        notify.close()


def agent_status(state_dir: Path) -> tuple[int, dict[str, Any] | None]:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--json", "--state-dir", str(state_dir)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout) if done.stdout else None


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.slow
def test_run_replicates_a_disk_to_a_recovery_point_and_stops_on_sigterm(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial, tmp_path: Path
) -> None:
    process, target = sites
    state_dir = tmp_path / "agent"
    with loop_ext4(tmp_path, 64) as (device, mnt):
        for i in range(4):
            write_file(mnt, f"seed-{i}", 1 << 20)
        config = write_config(
            tmp_path / "agent.toml",
            f"""
[agent]
machine_id = "machine-cli"
state_dir = "{state_dir}"
process_server = "127.0.0.1:{process.port}"
tls_name = "localhost"
disks = ["{device}"]
tag_interval = 1.0
freeze_timeout = 5.0

[tls]
cert = "{tls.client.cert}"
key = "{tls.client.key}"
ca = "{tls.ca.cert}"
""",
        )
        log = tmp_path / "agent.log"
        agent = start_agent(config, log, tmp_path / "notify-agent")
        try:
            deadline = time.monotonic() + 30
            document: dict[str, Any] | None = None
            while time.monotonic() < deadline:
                code, document = agent_status(state_dir)
                if code == 0 and document is not None:
                    (disk,) = document["disks"].values()
                    if disk["initial"]["done"] and disk["last_tag_id"]:
                        break
                time.sleep(0.3)
            else:
                raise AssertionError(f"no synced tagged disk: {document}\n{log.read_text()}")
            assert document["running"] is True and disk["initial"]["percent"] == 100.0
            assert disk["device"] == str(device)

            async def points() -> list[dict[str, Any]]:
                async with asyncio.timeout(20):
                    while not (found := await rpc(target, tls, "points",
                                                  machine_id="machine-cli")):  # fmt: skip
                        await asyncio.sleep(0.2)
                    return found  # type: ignore[return-value]

            listed = asyncio.run(points())
            assert listed and all(p["usable"] for p in listed), listed
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=20) == 0, log.read_text()
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    code, document = agent_status(state_dir)
    assert code == 3 and document is not None and document["running"] is False
    assert document["phase"] == "stopped"


def test_progress_line_weighs_disks_by_size_and_ends_when_synced() -> None:
    from agent.status import progress_line

    document = {"disks": {
        "m-a": {"size": 3 << 30, "initial": {"percent": 100.0, "done": True}},
        "m-b": {"size": 1 << 30, "initial": {"percent": 20.0, "done": False,
                                             "eta_seconds": 125}},
    }}  # fmt: skip
    line = progress_line(document, 80)
    assert line is not None and "80.0%" in line and "ETA 2 min" in line and "2 disks" in line
    assert len(line) < 80
    document["disks"]["m-b"]["initial"]["eta_seconds"] = None
    assert "ETA unknown" in str(progress_line(document))
    document["disks"]["m-b"]["initial"] = {"percent": 100.0, "done": True}
    assert progress_line(document) is None
    assert progress_line({"disks": {}}) is None


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.slow
def test_a_refused_certificate_is_named_in_status(
    sites: tuple[RoleDaemon, RoleDaemon], tls: TlsMaterial, tmp_path: Path
) -> None:
    """An agent whose certificate the process server refuses keeps retrying (it may be
    re-enrolled) and its status says why, in words the operator can act on."""
    process, _ = sites
    state_dir = tmp_path / "agent"
    with loop_ext4(tmp_path, 32) as (device, _):
        config = write_config(tmp_path / "agent.toml", f"""
[agent]
machine_id = "machine-rogue"
state_dir = "{state_dir}"
process_server = "127.0.0.1:{process.port}"
tls_name = "localhost"
disks = ["{device}"]

[tls]
cert = "{tls.rogue_client.cert}"
key = "{tls.rogue_client.key}"
ca = "{tls.ca.cert}"
""")  # fmt: skip
        log = tmp_path / "agent.log"
        agent = start_agent(config, log, tmp_path / "notify-agent")
        try:
            deadline = time.monotonic() + 30
            document: dict[str, Any] | None = None
            while time.monotonic() < deadline:
                _, document = agent_status(state_dir)
                if document and document.get("connection_error"):
                    break
                time.sleep(0.3)
            else:
                raise AssertionError(f"no connection error in {document}\n{log.read_text()}")
            assert "refuses our certificate" in document["connection_error"], document
            assert agent.poll() is None  # still running, still trying
        finally:
            agent.terminate()
            agent.wait(timeout=20)
