"""Every subcommand against a stand-in for Config1Client: output, calls and exit status.

The stand-in replaces only the D-Bus client (a dependency of the CLI); the parser,
commands, renderers and error mapping are the real ones."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.ctl import cli
from appliance.ctl.commands import CtlExit

NOW = time.time()
ERR = "org.secondsite.Config1.Error."

MACHINES: list[dict[str, Any]] = [
    {
        "name": "web01",
        "hostname": "web01.example",
        "state": "protected",
        "rpo_seconds": 12.0,
        "rpo_threshold_s": 900,
        "policy": "gold",
        "process_server": "ps1",
        "master_target": "mt1",
        "initial_percent": 100.0,
        "protection_enabled": True,
    },
    {
        "name": "db01",
        "state": "rpo-exceeded",
        "rpo_seconds": 1000.0,
        "rpo_threshold_s": 900,
        "policy": "gold",
        "initial_percent": 37.5,
    },
    {"name": "new01", "state": "registered"},  # the core may leave keys out
]
SERVERS = [
    {
        "name": "ps1",
        "role": "process",
        "address": "10.0.0.5:7400",
        "last_seen": NOW - 4,
        "machines": 2,
        "free_bytes": 50 * 2**30,
        "capacity_bytes": 100 * 2**30,
        "backlog_bytes": 1536,
        "connected": True,
    }
]
JOBS = [
    {
        "id": "j-7",
        "kind": "protect",
        "subject": "db01",
        "state": "running",
        "step": "initial copy",
        "percent": 37.5,
        "created_at": NOW - 60,
        "updated_at": NOW - 1,
    }
]
ALERTS = [
    {
        "id": "a-1",
        "subject": "db01",
        "kind": "rpo-exceeded",
        "severity": "critical",
        "message": "RPO 16m40s exceeds 15m",
        "raised_at": NOW - 30,
    }
]
CLEARED = [*ALERTS, {**ALERTS[0], "id": "a-0", "cleared_at": NOW - 10}]
POINT_TIME = 1_700_000_000.0
POINTS = [
    {"time": POINT_TIME, "tag": "crash-1", "kind": "crash", "usable": True},
    {"time": POINT_TIME + 5, "tag": "app-2", "kind": "app", "usable": False},
]
DISKS = [
    {
        "disk_id": "sda",
        "path": "/dev/sda",
        "size_bytes": 20 * 2**30,
        "initial_percent": 37.5,
        "initial_done": False,
        "backlog_bytes": 2**20,
        "rate_in": 2048.0,
        "rate_out": 1024.0,
        "resync_required": False,
    }
]
EVENTS = [
    {"time": NOW - 5, "severity": "info", "subject": "web01", "kind": "point", "message": "ok"}
]
POLICIES = [
    {
        "name": "gold",
        "rpo_threshold_s": 900,
        "crash_interval_s": 5,
        "app_interval_s": 3600,
        "retention_hours": 24,
        "retention_bytes": 50 * 2**30,
        "pre_script": "/opt/freeze",
    }
]
STATUS = {
    "machines": {"total": 3, "by_state": {"protected": 1, "rpo-exceeded": 1, "registered": 1}},
    "worst_rpo_seconds": 1000.0,
    "open_alerts": 1,
    "alerts": ALERTS,
    "servers": SERVERS,
    "jobs": JOBS,
    "version": "0.1.0",
}


class FakeDBusError(Exception):
    """The shape of appliance.dbus.client.DBusCallError."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def _answers() -> dict[str, Any]:
    return {
        "Status": STATUS,
        "ListMachines": MACHINES,
        "ListDisks": DISKS,
        "ListPoints": POINTS,
        "ListServers": SERVERS,
        "ListJobs": lambda all_: JOBS if not all_ else [*JOBS, {**JOBS[0], "id": "j-1"}],
        "GetJob": lambda job: {**JOBS[0], "id": job},
        "ListAlerts": lambda all_: CLEARED if all_ else ALERTS,
        "ListEvents": lambda n: EVENTS[:n],
        "ListPolicies": POLICIES,
        "SetPolicy": lambda name, settings: {"name": name, **settings},
        "AssignPolicy": None,
        "Protect": "j-8",
        "Unprotect": "j-9",
        "Resync": "j-10",
        "GetPassphrase": {"passphrase": "correct-horse", "expires_at": NOW + 3600},
        "RotatePassphrase": {"passphrase": "battery-staple"},
        "Revoke": None,
        "TestFailover": "j-20",
        "Cleanup": "j-21",
        "Failover": "j-22",
        "Commit": "j-23",
        "Cancel": "j-24",
        "Failback": "j-25",
        "SetReplica": lambda machine, settings: settings,
        "ListVCenters": [{"name": "vc-dr", "site": "dr", "address": "vc:443"}],
        "RegisterVCenter": lambda *a: {"name": a[0], "address": a[2], "thumbprint": a[5]},
        "PushInstall": "j-30",
        "PushUninstall": "j-31",
        "ListPlans": [
            {
                "name": "erp",
                "spec": {
                    "groups": [
                        {"machines": ["db01"], "wait_s": 30.0, "pre": "/srv/pre.sh"},
                        {"machines": ["web01", "web02"], "wait_s": 0.0},
                    ]
                },
            }
        ],
        "SetPlan": lambda name, spec: {"name": name, "spec": spec},
        "PlanTestFailover": "j-40",
        "PlanCleanup": "j-41",
        "PlanFailover": "j-42",
    }


@dataclass
class FakeClient:
    answers: dict[str, Any] = field(default_factory=_answers)
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def call(self, method: str, *args: Any) -> Any:
        self.calls.append((method, args))
        answer = self.answers[method]
        if isinstance(answer, BaseException):
            raise answer
        return answer(*args) if callable(answer) else answer

    def properties(self) -> dict[str, Any]:
        return {"Version": "0.1.0"}


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@dataclass
class Result:
    code: int
    out: str
    err: str
    client: FakeClient
    addresses: list[str | None]
    sleeps: list[float]


Run = Callable[..., Result]


@pytest.fixture
def ctl(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv(cli.BUS_ENV, raising=False)

    def run(*argv: str, client: FakeClient | None = None, out: io.StringIO | None = None) -> Result:
        fake = client or FakeClient()
        addresses: list[str | None] = []
        sleeps: list[float] = []

        def connect(address: str | None) -> FakeClient:
            addresses.append(address)
            return fake

        stream = out if out is not None else io.StringIO()
        code = cli.main(
            list(argv), connect=connect, out=stream, sleep=sleeps.append, now=lambda: NOW
        )
        captured = capsys.readouterr()
        return Result(code, stream.getvalue() + captured.out, captured.err, fake, addresses, sleeps)

    yield run


def test_help_lists_every_command_and_exit_status() -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "appliance.ctl", "--help"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    for command in (
        "status", "machines", "disks", "points", "servers", "jobs", "job", "alerts", "events",
        "policies", "protect", "unprotect", "resync", "policy", "passphrase", "revoke",
        "test-failover", "cleanup", "failover", "commit", "cancel", "failback", "replica",
        "vcenters",
        "vcenter-add",
        "vcenter-credentials", "vms", "protect-vm",
        "push-install",
        "push-uninstall",
        "plans", "plan-set", "plan-test-failover", "plan-cleanup", "plan-failover",
    ):  # fmt: skip
        # a long name gets its own line, its help on the next
        assert re.search(rf"\n    {command}[ \n]", done.stdout), command
    assert "exit status:" in done.stdout
    for code in CtlExit:
        assert f"\n  {code:d}  " in done.stdout
    assert cli.BUS_ENV in done.stdout


def test_subcommand_help(ctl: Run) -> None:
    result = ctl("policy", "set", "--help")
    assert result.code == 0
    assert "--rpo-threshold DURATION" in result.out
    assert "secondsitectl policy set gold" in result.out  # an example


def test_status_screen(ctl: Run) -> None:
    result = ctl("status")
    assert result.code == 0
    out = result.out
    assert "Version: 0.1.0" in out
    assert "3 (1 protected, 1 registered, 1 rpo-exceeded)" in out
    assert "16m40s on db01, threshold 15m00s (EXCEEDED)" in out
    assert "RPO 16m40s exceeds 15m" in out  # the open alert
    assert "ps1" in out and "4s ago" in out  # a server, last seen
    assert "initial copy" in out  # the running job


def test_no_command_is_status(ctl: Run) -> None:
    assert "Worst RPO" in ctl().out


def test_status_json_is_the_record(ctl: Run) -> None:
    result = ctl("status", "--json")
    assert json.loads(result.out) == STATUS
    assert [m for m, _ in result.client.calls] == ["Status"]


def test_status_without_points(ctl: Run) -> None:
    client = FakeClient()
    client.answers["Status"] = {**STATUS, "worst_rpo_seconds": -1.0, "alerts": [], "jobs": []}
    out = ctl("status", client=client).out
    assert "- (no recovery point yet)" in out
    assert "Jobs:" not in out


def test_machines(ctl: Run) -> None:
    result = ctl("machines")
    lines = result.out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "STATE", "RPO"]
    assert lines[1].split() == [
        "web01", "protected", "12s", "15m00s", "gold", "ps1", "mt1", "100%"
    ]  # fmt: skip
    assert lines[2].split()[-1] == "37%"
    assert lines[3].split() == ["new01", "registered", "-", "-", "-", "-", "-", "-"]
    assert lines[-1] == "3 machines listed."


def test_no_legend(ctl: Run) -> None:
    lines = ctl("machines", "--no-legend").out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("web01")


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_equals_the_records(ctl: Run, where: str) -> None:
    argv = ["--json", "machines"] if where == "before" else ["machines", "--json"]
    assert json.loads(ctl(*argv).out) == MACHINES


@pytest.mark.parametrize(
    ("argv", "records"),
    [
        (["disks", "web01"], DISKS),
        (["points", "web01"], POINTS),
        (["servers"], SERVERS),
        (["jobs"], JOBS),
        (["alerts"], ALERTS),
        (["events"], EVENTS),
        (["policies"], POLICIES),
        (["policy", "list"], POLICIES),
        (["job", "j-7"], {**JOBS[0]}),
        (["passphrase"], {"passphrase": "correct-horse", "expires_at": NOW + 3600}),
    ],
)
def test_every_listing_takes_json(ctl: Run, argv: list[str], records: object) -> None:
    result = ctl(*argv, "--json")
    assert result.code == 0
    assert json.loads(result.out) == records


def test_terminal_width_is_respected(ctl: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeClient()
    client.answers["ListMachines"] = [{**m, "name": m["name"] * 12} for m in MACHINES]
    monkeypatch.setenv("COLUMNS", "60")
    lines = ctl("machines", client=client).out.splitlines()
    assert all(len(line) <= 60 for line in lines)
    assert "…" in lines[1]
    monkeypatch.setenv("COLUMNS", "60")
    assert "…" not in ctl("machines", "--full", client=client).out


def test_disks(ctl: Run) -> None:
    result = ctl("disks", "web01")
    assert result.client.calls == [("ListDisks", ("web01",))]
    assert result.out.splitlines()[1].split() == [
        "sda", "/dev/sda", "20.0", "GiB", "37%", "1.0", "MiB", "2.0", "KiB/s", "1.0", "KiB/s", "no"
    ]  # fmt: skip


def test_points_show_times_to_the_second(ctl: Run) -> None:
    lines = ctl("points", "web01").out.splitlines()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(POINT_TIME + 5))
    assert lines[2].split() == [*stamp.split(), "app-2", "app", "no"]


def test_servers(ctl: Run) -> None:
    line = ctl("servers").out.splitlines()[1]
    assert line.split()[:4] == ["ps1", "process", "10.0.0.5:7400", "yes"]
    assert "4s ago" in line and "50.0 GiB" in line and "100 GiB" in line


def test_jobs_all(ctl: Run) -> None:
    assert ctl("jobs").client.calls == [("ListJobs", (False,))]
    result = ctl("jobs", "--all")
    assert result.client.calls == [("ListJobs", (True,))]
    assert "2 jobs listed." in result.out


def test_job(ctl: Run) -> None:
    out = ctl("job", "j-7").out
    assert "State: running" in out and "Progress: 37%" in out and "Updated: 1s ago" in out


def test_alerts_all_adds_cleared(ctl: Run) -> None:
    assert "CLEARED" not in ctl("alerts").out
    result = ctl("alerts", "--all")
    assert result.client.calls == [("ListAlerts", (True,))]
    assert "CLEARED" in result.out and "10s ago" in result.out


def test_events_limit(ctl: Run) -> None:
    assert ctl("events").client.calls == [("ListEvents", (20,))]
    assert ctl("events", "-n", "5").client.calls == [("ListEvents", (5,))]


def test_policies(ctl: Run) -> None:
    line = ctl("policies").out.splitlines()[1]
    assert line.split() == [
        "gold",
        "15m00s",
        "5s",
        "1h00m",
        "1d00h",
        "50.0",
        "GiB",
        "/opt/freeze",
        "-",
    ]


def test_empty_listing(ctl: Run) -> None:
    client = FakeClient()
    client.answers["ListMachines"] = []
    assert ctl("machines", client=client).out == "No machines.\n"
    assert ctl("machines", "--no-legend", client=client).out == ""
    assert json.loads(ctl("machines", "--json", client=client).out) == []


def test_protect_prints_the_job(ctl: Run) -> None:
    result = ctl("protect", "web01")
    assert (result.code, result.out) == (0, "j-8\n")
    assert result.client.calls == [("Protect", ("web01", ""))]
    result = ctl("protect", "web01", "--policy", "gold", "--json")
    assert result.client.calls == [("Protect", ("web01", "gold"))]
    assert json.loads(result.out) == {"job": "j-8"}
    assert ctl("unprotect", "web01").out == "j-9\n"
    assert ctl("resync", "web01").client.calls == [("Resync", ("web01",))]


def _job_sequence(*states: dict[str, Any]) -> FakeClient:
    client = FakeClient()
    answers = iter(states)
    client.answers["GetJob"] = lambda job: {"id": job, "kind": "protect", **next(answers)}
    return client


RUNNING = {"state": "running", "step": "initial copy", "percent": 40.0}


def test_wait_success(ctl: Run) -> None:
    client = _job_sequence({"state": "queued", "percent": 0.0}, RUNNING, {"state": "succeeded"})
    result = ctl("protect", "web01", "--wait", client=client)
    assert result.code == 0
    assert result.sleeps == [0.5, 0.5]
    assert result.out.splitlines() == [
        "j-8",
        "queued: - (0%)",
        "running: initial copy (40%)",
        "succeeded: initial copy (100%)",
        "Job j-8 succeeded.",
    ]


def test_wait_failure(ctl: Run) -> None:
    client = _job_sequence(RUNNING, {"state": "failed", "error": "target full"})
    result = ctl("resync", "web01", "--wait", client=client)
    assert result.code == CtlExit.FAILURE
    assert result.err == (
        "secondsitectl: error: job j-10 failed: target full (hint: secondsitectl job j-10)\n"
    )


def test_wait_on_a_terminal_draws_one_line(ctl: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    client = _job_sequence(RUNNING, {"state": "succeeded", "percent": 100.0})
    result = ctl("unprotect", "web01", "--wait", client=client, out=Tty())
    assert result.code == 0
    assert result.out.count("\r") == 2
    assert "[#########" in result.out and "initial copy" in result.out
    assert result.out.endswith("\nJob j-9 succeeded.\n")


def test_wait_json_prints_the_final_job(ctl: Run) -> None:
    client = _job_sequence(RUNNING, {"state": "succeeded", "percent": 100.0})
    result = ctl("protect", "web01", "--wait", "--json", client=client)
    assert json.loads(result.out)["state"] == "succeeded"


def test_policy_set_sends_only_given_options_in_seconds_and_bytes(ctl: Run) -> None:
    result = ctl(
        "policy", "set", "gold",
        "--rpo-threshold", "15m", "--crash-interval", "5s", "--app-interval", "1h",
        "--retention-hours", "24", "--retention-bytes", "50G",
        "--pre-script", "/opt/freeze", "--post-script", "/opt/thaw",
    )  # fmt: skip
    assert result.code == 0
    settings = {
        "rpo_threshold_s": 900,
        "crash_interval_s": 5,
        "app_interval_s": 3600,
        "retention_hours": 24,
        "retention_bytes": 50 * 2**30,
        "pre_script": "/opt/freeze",
        "post_script": "/opt/thaw",
    }
    assert result.client.calls == [("SetPolicy", ("gold", settings))]
    assert result.out == "Policy gold saved.\n"
    result = ctl("policy", "set", "silver", "--rpo-threshold", "2h30m", "--json")
    assert result.client.calls == [("SetPolicy", ("silver", {"rpo_threshold_s": 9000}))]
    assert json.loads(result.out) == {"name": "silver", "rpo_threshold_s": 9000}


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("1.5h", 5400), ("1d2h", 93600), ("0.5s", 0.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("512M", 512 * 2**20),
        ("50G", 50 * 2**30),
        ("1.5TiB", 3 * 2**39),
        ("2kb", 2048),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert cli.parse_size(text) == size


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["policy", "set", "g", "--rpo-threshold", "5x"], "'5x' is not a duration"),
        (["policy", "set", "g", "--crash-interval", "0s"], "must be more than zero"),
        (["policy", "set", "g", "--app-interval", "m5"], "'m5' is not a duration"),
        (["policy", "set", "g", "--retention-bytes", "lots"], "'lots' is not a size"),
        (["policy", "set", "g", "--retention-bytes", "0G"], "a size must be more than zero"),
        (["policy", "set", "g", "--retention-hours", "1.5"], "'1.5' is not a whole number"),
        (["events", "-n", "0"], "must be more than zero"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["disks"], "the following arguments are required: machine"),
    ],
)
def test_usage_errors(ctl: Run, argv: list[str], message: str) -> None:
    result = ctl(*argv)
    assert result.code == CtlExit.USAGE
    assert result.code == 2
    assert result.err.count("\n") == 1  # one line, no usage dump, no traceback
    assert result.err.startswith("secondsitectl: error: ")
    assert message in result.err
    assert "(hint: see 'secondsitectl" in result.err
    assert result.addresses == []  # never reached for the bus


def test_policy_assign_passphrase_revoke(ctl: Run) -> None:
    result = ctl("policy", "assign", "web01", "gold")
    assert result.client.calls == [("AssignPolicy", ("web01", "gold"))]
    assert result.code == 0
    assert ctl("passphrase").out == "correct-horse\n"
    result = ctl("passphrase", "--rotate")
    assert (result.out, result.client.calls) == ("battery-staple\n", [("RotatePassphrase", ())])
    result = ctl("revoke", "web01")
    assert result.client.calls == [("Revoke", ("web01",))]
    assert "web01" in result.out


@pytest.mark.parametrize(
    ("name", "code", "hint"),
    [
        (ERR + "NotFound", CtlExit.NOT_FOUND, None),
        (ERR + "InvalidArgument", CtlExit.REFUSED, None),
        (ERR + "Conflict", CtlExit.REFUSED, None),
        (ERR + "NotAuthorised", CtlExit.REFUSED, None),
        (ERR + "Failed", CtlExit.FAILURE, "journalctl -u secondsite-configd"),
        ("org.freedesktop.DBus.Error.ServiceUnknown", CtlExit.UNREACHABLE, "systemctl status"),
        ("org.freedesktop.DBus.Error.AccessDenied", CtlExit.UNREACHABLE, "secondsite group"),
        ("org.freedesktop.DBus.Error.UnknownMethod", CtlExit.FAILURE, "differ in version"),
        ("com.example.Weird", CtlExit.FAILURE, None),
        ("org.secondsite.Client.Error.NoBus", CtlExit.UNREACHABLE, "is dbus running?"),
        ("org.secondsite.Client.Error.UnknownMethod", CtlExit.FAILURE, "differ in version"),
    ],
)
def test_dbus_errors(ctl: Run, name: str, code: CtlExit, hint: str | None) -> None:
    client = FakeClient()
    client.answers["GetMachine"] = client.answers["ListDisks"] = FakeDBusError(name, "no 'web02'")
    result = ctl("disks", "web02", client=client)
    assert result.code == code
    assert result.err.count("\n") == 1
    assert result.err.startswith("secondsitectl: error: ")
    assert "no 'web02'" in result.err
    assert "Traceback" not in result.err
    if hint:
        assert hint in result.err.partition("(hint: ")[2]


def test_missing_bus_is_unreachable(ctl: Run, capsys: pytest.CaptureFixture[str]) -> None:
    def connect(address: str | None) -> FakeClient:
        raise FileNotFoundError(2, "No such file or directory")

    code = cli.main(["--bus", "unix:path=/nonexistent", "machines"], connect=connect)
    err = capsys.readouterr().err
    assert code == CtlExit.UNREACHABLE
    assert code == 4
    assert err.startswith("secondsitectl: error: cannot reach unix:path=/nonexistent")
    assert "(hint: is dbus running?" in err


def test_a_bug_keeps_its_traceback(ctl: Run) -> None:
    client = FakeClient()
    client.answers["ListMachines"] = RuntimeError("a bug in the client")
    with pytest.raises(RuntimeError):
        ctl("machines", client=client)


def test_bus_address(ctl: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ctl("machines").addresses == [None]  # the client's default: the system bus
    monkeypatch.setenv(cli.BUS_ENV, "unix:path=/env")
    assert ctl("machines").addresses == ["unix:path=/env"]
    assert ctl("--bus", "unix:path=/flag", "machines").addresses == ["unix:path=/flag"]
    assert ctl("machines", "--bus", "unix:path=/flag").addresses == ["unix:path=/flag"]


def test_failover_family(ctl: Run, tmp_path: Path) -> None:
    result = ctl("test-failover", "web01")
    assert (result.code, result.out) == (0, "j-20\n")
    assert result.client.calls == [("TestFailover", ("web01", "", {}))]
    result = ctl("test-failover", "web01", "--point", "t-9", "--network", "eth0=VM Network")
    assert result.client.calls == [("TestFailover", ("web01", "t-9", {"eth0": "VM Network"}))]
    bad = ctl("test-failover", "web01", "--network", "eth0")
    assert bad.code == CtlExit.USAGE and "NIC=PORTGROUP" in bad.err and not bad.client.calls
    assert ctl("failover", "web01").client.calls == [("Failover", ("web01", "", "planned"))]
    result = ctl("failover", "web01", "--unplanned", "--point", "latest-app")
    assert result.client.calls == [("Failover", ("web01", "latest-app", "unplanned"))]
    for command, job in (
        ("cleanup", "j-21"), ("commit", "j-23"), ("cancel", "j-24"), ("failback", "j-25"),
    ):  # fmt: skip
        assert ctl(command, "web01").out == f"{job}\n"


def test_plans(ctl: Run, tmp_path: Path) -> None:
    out = ctl("plans").out
    assert "erp  1: db01 (pre '/srv/pre.sh', then wait 30 s); 2: web01 web02" in out
    assert json.loads(ctl("plans", "--json").out)[0]["name"] == "erp"
    spec = {"groups": [{"machines": ["db01"], "post": "true"}]}
    (tmp_path / "erp.json").write_text(json.dumps(spec))
    result = ctl("plan-set", "erp", str(tmp_path / "erp.json"))
    assert (result.code, result.out) == (0, "Plan erp set.\n")
    assert result.client.calls == [("SetPlan", ("erp", spec))]
    (tmp_path / "list.json").write_text("[]")
    bad = ctl("plan-set", "erp", str(tmp_path / "list.json"))
    assert bad.code == CtlExit.USAGE and "a plan spec must be a JSON object" in bad.err
    result = ctl("plan-test-failover", "erp", "--point", "1700000000")
    assert (result.code, result.out) == (0, "j-40\n")
    assert result.client.calls == [("PlanTestFailover", ("erp", "1700000000"))]
    assert ctl("plan-cleanup", "erp").client.calls == [("PlanCleanup", ("erp",))]
    result = ctl("plan-failover", "erp")
    assert result.client.calls == [("PlanFailover", ("erp", "", "planned"))]
    result = ctl("plan-failover", "erp", "--unplanned", "--point", "2026-11-26T03:00:00")
    assert result.client.calls == [("PlanFailover", ("erp", "2026-11-26T03:00:00", "unplanned"))]
    assert result.out == "j-42\n"


def test_replica_and_vcenters(ctl: Run, tmp_path: Path) -> None:
    settings = tmp_path / "replica.json"
    settings.write_text(json.dumps({"vcenter": "vc-dr", "cpus": 2}))
    result = ctl("replica", "web01", str(settings), "--json")
    assert result.client.calls == [("SetReplica", ("web01", {"vcenter": "vc-dr", "cpus": 2}))]
    assert json.loads(result.out) == {"vcenter": "vc-dr", "cpus": 2}
    (tmp_path / "list.json").write_text("[1]")
    assert ctl("replica", "web01", str(tmp_path / "list.json")).code == CtlExit.USAGE
    assert ctl("replica", "web01", str(tmp_path / "missing.json")).code == CtlExit.USAGE
    assert "vc-dr  dr  vc:443" in ctl("vcenters").out
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    result = ctl("vcenter-add", "vc-dr", "vc:443", "--user", "admin", "--password-file",
                 str(password), "--thumbprint", "AA:BB")  # fmt: skip
    assert result.code == 0
    assert result.client.calls == [
        ("RegisterVCenter", ("vc-dr", "", "vc:443", "admin", "s3cret", "AA:BB"))
    ]
    missing = ctl("vcenter-add", "vc", "vc:443", "--user", "a", "--password-file", "/nope")
    assert missing.code == CtlExit.FAILURE and "cannot read the password file" in missing.err


def test_push_install(ctl: Run, tmp_path: Path) -> None:
    key = tmp_path / "id_push"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n")
    result = ctl("push-install", "10.0.0.5", "--key", str(key), "--disk", "/dev/sdb")
    assert (result.code, result.out) == (0, "j-30\n")
    options = {"key": key.read_text(), "disks": ["/dev/sdb"], "user": "root"}
    assert result.client.calls == [("PushInstall", ("10.0.0.5", options))]
    result = ctl("push-install", "h1", "--key", str(key), "--disk", "/dev/sdb", "--disk",
                 "/dev/sdc", "--user", "admin", "--port", "2222", "--machine", "db1",
                 "--accept-fingerprint", "SHA256:x", "--server", "cs:9440")  # fmt: skip
    assert result.client.calls == [("PushInstall", ("h1", {
        **options, "disks": ["/dev/sdb", "/dev/sdc"], "user": "admin", "port": 2222,
        "machine": "db1", "accept_fingerprint": "SHA256:x", "server": "cs:9440",
    }))]  # fmt: skip
    missing = ctl("push-install", "h1", "--key", str(tmp_path / "nope"), "--disk", "/dev/sdb")
    assert missing.code == CtlExit.FAILURE and "cannot read the SSH key file" in missing.err
    assert not missing.client.calls
    no_disk = ctl("push-install", "h1", "--key", str(key))
    assert no_disk.code == CtlExit.USAGE and not no_disk.client.calls


def test_push_with_a_password_and_uninstall(ctl: Run, tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("s3cret pass\nignored\n")
    result = ctl("push-install", "h1", "--password-file", str(password), "--user", "admin",
                 "--disk", "/dev/sdb")  # fmt: skip
    assert result.code == 0
    options = {"password": "s3cret pass", "disks": ["/dev/sdb"], "user": "admin"}
    assert result.client.calls == [("PushInstall", ("h1", options))]
    both = ctl("push-install", "h1", "--password-file", str(password), "--key", str(password),
               "--disk", "/dev/sdb")  # fmt: skip
    assert both.code == CtlExit.USAGE and not both.client.calls
    neither = ctl("push-uninstall", "h1")
    assert neither.code == CtlExit.USAGE and not neither.client.calls
    (tmp_path / "empty").write_text("\n")
    empty = ctl("push-uninstall", "h1", "--password-file", str(tmp_path / "empty"))
    assert empty.code == CtlExit.FAILURE and "is empty" in empty.err
    result = ctl("push-uninstall", "h1", "--password-file", str(password), "--machine", "db1",
                 "--accept-fingerprint", "SHA256:x")  # fmt: skip
    assert (result.code, result.out) == (0, "j-31\n")
    assert result.client.calls == [("PushUninstall", ("h1", {
        "password": "s3cret pass", "user": "root", "machine": "db1",
        "accept_fingerprint": "SHA256:x",
    }))]  # fmt: skip
