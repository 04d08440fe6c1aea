"""One function per secondsitectl subcommand, over the org.secondsite.Config1 client.

The commands see the configuration server only through `ConfigClient` (the shape of
`appliance.dbus.client.Config1Client`), so the CLI can be tested with a stand-in and
never imports D-Bus itself. D-Bus errors become operator errors here, in one place.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Protocol, TextIO

from appliance.config.model import JobState
from appliance.ctl import render
from appliance.ctl.render import Column, fmt_duration, fmt_percent, fmt_text
from appliance.daemon.cli import ExitCode, OperatorError

POLL_S = 0.5  # GetJob polling period for --wait

_ERROR_PREFIX = "org.secondsite.Config1.Error."
_CONFIGD = "secondsite-configd"


class CtlExit(IntEnum):
    """secondsitectl's exit statuses (documented in --help)."""

    OK = 0
    FAILURE = 1
    USAGE = ExitCode.USAGE
    UNREACHABLE = ExitCode.UNAVAILABLE  # no configuration server, or the bus said no
    NOT_FOUND = 5
    REFUSED = 6  # InvalidArgument, Conflict, NotAuthorised


class CtlError(OperatorError):
    # OperatorError.exit_code is typed as the daemons' ExitCode, which an IntEnum
    # cannot extend, so secondsitectl's own statuses live beside it.
    status: ClassVar[CtlExit] = CtlExit.FAILURE


class UsageError(CtlError):
    status = CtlExit.USAGE


class Unreachable(CtlError):
    status = CtlExit.UNREACHABLE


class NotFound(CtlError):
    status = CtlExit.NOT_FOUND


class Refused(CtlError):
    status = CtlExit.REFUSED


class ConfigClient(Protocol):
    """What the commands need of `appliance.dbus.client.Config1Client`."""

    def call(self, method: str, *args: Any) -> Any: ...

    def properties(self) -> dict[str, Any]: ...


ClientFactory = Callable[[str | None], ConfigClient]

_UNREACHABLE_NAMES = frozenset(
    "org.freedesktop.DBus.Error." + name
    for name in (
        "ServiceUnknown",
        "NameHasNoOwner",
        "NoServer",
        "NoReply",
        "Timeout",
        "TimedOut",
        "Disconnected",
        "FileNotFound",
        "BadAddress",
        "NoNetwork",
        "IOError",
    )
)
_DENIED_NAMES = frozenset(
    "org.freedesktop.DBus.Error." + name for name in ("AccessDenied", "AuthFailed")
)
# Raised by appliance.dbus.client itself (not imported here: it pulls in dbus-python).
_NO_BUS = "org.secondsite.Client.Error.NoBus"
_VERSION_SKEW = frozenset(
    {"org.secondsite.Client.Error.UnknownMethod", "org.freedesktop.DBus.Error.InvalidArgs"}
)
BUS_ENV = "SECONDSITE_BUS_ADDRESS"
_REFUSED = frozenset({"InvalidArgument", "Conflict", "NotAuthorised", "EnrolmentRefused"})


def _dbus_error(exc: BaseException) -> tuple[str, str] | None:
    """(name, message) when `exc` is a D-Bus error, by shape: the client's
    DBusCallError has .name and .message; dbus-python's own has get_dbus_name()."""
    if isinstance(exc, ImportError):  # has a .name too: the module's
        return None
    name, message = getattr(exc, "name", None), getattr(exc, "message", None)
    if isinstance(name, str) and isinstance(message, str):
        return name, message
    get_name = getattr(exc, "get_dbus_name", None)
    if callable(get_name):
        name = get_name()
        if isinstance(name, str):
            return name, str(exc.args[0]) if exc.args else ""
    return None


def translate(exc: BaseException, bus: str | None) -> CtlError | None:
    """The operator error for a failed call, or None when it is a bug to show."""
    where = bus or "the system bus"
    if isinstance(exc, PermissionError):
        return Unreachable(f"cannot use {where}: {exc}", "run as root or a secondsite member")
    if isinstance(exc, OSError):
        return Unreachable(
            f"cannot reach {where}: {exc}", f"is dbus running? check --bus or {BUS_ENV}"
        )
    error = _dbus_error(exc)
    if error is None:
        return None
    name, message = error
    if name in _DENIED_NAMES:
        return Unreachable(
            f"the bus refused the call: {message}",
            "run as root or as a member of the secondsite group",
        )
    if name == _NO_BUS:  # the client could not connect at all; its message says where
        return Unreachable(message, f"is dbus running? check --bus or {BUS_ENV}")
    if name in _UNREACHABLE_NAMES or name.startswith("org.freedesktop.DBus.Error.Spawn"):
        return Unreachable(
            f"configuration server unreachable on {where}: {message}",
            f"is it running? systemctl status {_CONFIGD}",
        )
    short = name.removeprefix(_ERROR_PREFIX)
    if short == "NotFound":
        return NotFound(message)
    if short in _REFUSED:
        return Refused(message)
    if name.startswith(_ERROR_PREFIX):
        return CtlError(message, f"the server's journal has details: journalctl -u {_CONFIGD}")
    if name in _VERSION_SKEW or name.startswith("org.freedesktop.DBus.Error.Unknown"):
        return CtlError(f"{name}: {message}", "secondsitectl and the server differ in version")
    return CtlError(f"{name}: {message}")


@dataclass
class Context:
    """What every command gets: a lazily connected client and where to print."""

    connect: ClientFactory
    bus: str | None
    out: TextIO
    json: bool = False
    legend: bool = True
    width: int | None = None  # None: not a terminal, never truncate
    tty: bool = False
    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], float] = time.time
    _client: ConfigClient | None = field(default=None, repr=False)

    def call(self, method: str, *args: Any) -> Any:
        try:
            if self._client is None:
                self._client = self.connect(self.bus)
            return self._client.call(method, *args)
        except Exception as exc:
            error = translate(exc, self.bus)
            if error is None:
                raise
            raise error from exc

    def print(self, text: str = "") -> None:
        print(text, file=self.out)

    def records(self, method: str, *args: Any) -> list[dict[str, Any]]:
        answer = self.call(method, *args)
        # Tolerate a server that is ahead of us: skip what is not a record.
        return [r for r in answer if isinstance(r, dict)] if isinstance(answer, list) else []

    def record(self, method: str, *args: Any) -> dict[str, Any]:
        answer = self.call(method, *args)
        return answer if isinstance(answer, dict) else {}

    def time(self, value: object, *, seconds: bool = False) -> str:
        return render.fmt_time(value, self.now(), seconds=seconds)


def _listing(ctx: Context, records: list[dict[str, Any]], columns: list[Column], noun: str) -> int:
    if ctx.json:
        ctx.print(render.to_json(records))
        return CtlExit.OK
    if not records:
        if ctx.legend:
            ctx.print(f"No {noun}.")
        return CtlExit.OK
    lines = render.table(columns, records, ctx.width)
    for line in lines if ctx.legend else lines[1:]:
        ctx.print(line)
    if ctx.legend:
        n = len(records)
        one = "policy" if noun == "policies" else noun.removesuffix("s")
        ctx.print(f"\n{n} {noun if n != 1 else one} listed.")
    return CtlExit.OK


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    status = ctx.record("Status")
    if ctx.json:
        ctx.print(render.to_json(status))
        return CtlExit.OK
    machines = _mapping(status.get("machines"))
    by_state = _mapping(machines.get("by_state"))
    states = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items()))
    total = render.fmt_count(machines.get("total"))
    alerts = [a for a in status.get("alerts") or [] if isinstance(a, dict)]
    servers = [s for s in status.get("servers") or [] if isinstance(s, dict)]
    jobs = [j for j in status.get("jobs") or [] if isinstance(j, dict)]
    disconnected = sum(1 for s in servers if s.get("connected") is False)
    down = f" ({disconnected} disconnected)" if disconnected else ""
    pairs = [
        ("Version", fmt_text(status.get("version"))),
        ("Machines", f"{total}" + (f" ({states})" if states else "")),
        ("Worst RPO", _worst_rpo(ctx, status.get("worst_rpo_seconds"))),
        ("Open alerts", render.fmt_count(status.get("open_alerts"))),
        ("Servers", f"{len(servers)}{down}"),
        ("Running jobs", str(len(jobs))),
    ]
    for line in render.key_values(pairs, ctx.width):
        ctx.print(line)
    sections = [
        ("Alerts", alerts, render.alert_columns(ctx.now(), cleared=False)),
        ("Servers", servers, render.server_columns(ctx.now())),
        ("Jobs", jobs, render.job_columns(ctx.now())),
    ]
    for title, records, columns in sections:
        if records:
            ctx.print(f"\n{title}:")
            for line in render.table(columns, records, ctx.width):
                ctx.print(line)
    if status.get("groups"):
        from appliance.ctl import groups  # it imports this module

        for line in groups.status_lines(ctx):
            ctx.print(line)
    return CtlExit.OK


def _worst_rpo(ctx: Context, worst: object) -> str:
    text = fmt_duration(worst)
    if text == render.MISSING:
        return "- (no recovery point yet)"
    # The Status record has no threshold: find the machine that has the worst RPO.
    machines = ctx.records("ListMachines")
    if not machines:
        return text
    machine = max(machines, key=_rpo)
    threshold = machine.get("rpo_threshold_s")
    text += f" on {fmt_text(machine.get('name'))}"
    if isinstance(threshold, int | float) and threshold > 0:
        exceeded = _rpo(machine) > threshold
        text += f", threshold {fmt_duration(threshold)}" + (" (EXCEEDED)" if exceeded else "")
    return text


def _rpo(machine: Mapping[str, Any]) -> float:
    value = machine.get("rpo_seconds")
    return float(value) if isinstance(value, int | float) else -1.0


def cmd_machines(ctx: Context, args: argparse.Namespace) -> int:
    return _listing(ctx, ctx.records("ListMachines"), render.machine_columns(), "machines")


def cmd_disks(ctx: Context, args: argparse.Namespace) -> int:
    return _listing(ctx, ctx.records("ListDisks", args.machine), render.disk_columns(), "disks")


def cmd_points(ctx: Context, args: argparse.Namespace) -> int:
    columns = render.point_columns()
    return _listing(ctx, ctx.records("ListPoints", args.machine), columns, "points")


def cmd_servers(ctx: Context, args: argparse.Namespace) -> int:
    return _listing(ctx, ctx.records("ListServers"), render.server_columns(ctx.now()), "servers")


def cmd_jobs(ctx: Context, args: argparse.Namespace) -> int:
    return _listing(
        ctx, ctx.records("ListJobs", bool(args.all)), render.job_columns(ctx.now()), "jobs"
    )


def cmd_job(ctx: Context, args: argparse.Namespace) -> int:
    job = ctx.record("GetJob", args.id)
    if ctx.json:
        ctx.print(render.to_json(job))
        return CtlExit.OK
    pairs = [
        ("Job", fmt_text(job.get("id"))),
        ("Kind", fmt_text(job.get("kind"))),
        ("Subject", fmt_text(job.get("subject"))),
        ("State", fmt_text(job.get("state"))),
        ("Step", fmt_text(job.get("step"))),
        ("Progress", fmt_percent(job.get("percent"))),
        *[("Detail", fmt_text(d)) for d in [(job.get("result") or {}).get("detail")] if d],
        ("Created", ctx.time(job.get("created_at"))),
        ("Updated", ctx.time(job.get("updated_at"))),
    ]
    if job.get("error"):
        pairs.append(("Error", fmt_text(job.get("error"))))
    for line in render.key_values(pairs, ctx.width):
        ctx.print(line)
    return CtlExit.OK


def cmd_alerts(ctx: Context, args: argparse.Namespace) -> int:
    records = ctx.records("ListAlerts", bool(args.all))
    return _listing(ctx, records, render.alert_columns(ctx.now(), cleared=bool(args.all)), "alerts")


def cmd_events(ctx: Context, args: argparse.Namespace) -> int:
    columns = render.event_columns()
    return _listing(ctx, ctx.records("ListEvents", args.lines), columns, "events")


def cmd_policies(ctx: Context, args: argparse.Namespace) -> int:
    columns = render.policy_columns()
    return _listing(ctx, ctx.records("ListPolicies"), columns, "policies")


def cmd_policy_set(ctx: Context, args: argparse.Namespace) -> int:
    options = (
        "rpo_threshold_s",
        "crash_interval_s",
        "app_interval_s",
        "retention_hours",
        "retention_bytes",
        "pre_script",
        "post_script",
    )
    # Only what the operator gave: the server keeps (or defaults) everything else.
    settings = {key: getattr(args, key) for key in options if getattr(args, key) is not None}
    policy = ctx.record("SetPolicy", args.name, settings)
    if ctx.json:
        ctx.print(render.to_json(policy))
        return CtlExit.OK
    ctx.print(f"Policy {fmt_text(policy.get('name', args.name))} saved.")
    return CtlExit.OK


def cmd_policy_assign(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("AssignPolicy", args.machine, args.policy)
    if not ctx.json:
        ctx.print(f"Machine {args.machine} now follows policy {args.policy}.")
    return CtlExit.OK


def cmd_protect(ctx: Context, args: argparse.Namespace) -> int:
    return _start_job(ctx, args, ctx.call("Protect", args.machine, args.policy or ""))


def cmd_unprotect(ctx: Context, args: argparse.Namespace) -> int:
    return _start_job(ctx, args, ctx.call("Unprotect", args.machine))


def cmd_resync(ctx: Context, args: argparse.Namespace) -> int:
    return _start_job(ctx, args, ctx.call("Resync", args.machine))


def _start_job(ctx: Context, args: argparse.Namespace, job_id: object) -> int:
    job = str(job_id)
    if not args.wait:
        ctx.print(render.to_json({"job": job}) if ctx.json else job)
        return CtlExit.OK
    if not ctx.json:
        ctx.print(job)
    return follow_job(ctx, job)


_FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


def follow_job(ctx: Context, job_id: str) -> int:
    """Poll GetJob until the job finishes; show progress unless --json."""
    shown: tuple[object, ...] | None = None
    seen: dict[str, Any] = {}
    while True:
        job = ctx.record("GetJob", job_id)
        state = job.get("state")
        if not ctx.json:
            # A finished job may drop its step or percent; keep showing the last ones.
            seen = {**seen, **{k: v for k, v in job.items() if v is not None}}
            if state == JobState.SUCCEEDED and "percent" not in job:
                seen["percent"] = 100.0
            shown = _show_progress(ctx, seen, shown)
        if state in _FINISHED:
            break
        ctx.sleep(POLL_S)
    if ctx.tty and not ctx.json:
        ctx.print()  # end the progress line
    if ctx.json:
        ctx.print(render.to_json(job))
    if state == JobState.SUCCEEDED:
        if not ctx.json:
            ctx.print(f"Job {job_id} succeeded.")
        return CtlExit.OK
    reason = fmt_text(job.get("error")) if job.get("error") else "no error recorded"
    raise CtlError(f"job {job_id} {state}: {reason}", f"secondsitectl job {job_id}")


def _show_progress(
    ctx: Context, job: Mapping[str, Any], shown: tuple[object, ...] | None
) -> tuple[object, ...]:
    state, step, percent = job.get("state"), job.get("step"), job.get("percent")
    pct = fmt_percent(percent)
    if ctx.tty:
        # One line, redrawn in place; \x1b[K clears what a longer line left behind.
        width = ctx.width or 80
        bar = render.progress_bar(percent, min(32, max(width // 3, 10)))
        line = f"{fmt_text(state)} {bar} {pct:>4} {fmt_text(step)}"
        ctx.out.write("\r" + render.truncate(line, width - 1) + "\x1b[K")
        ctx.out.flush()
        return (state, step, percent)
    # A log (a pipe, the journal): one line per change, percent in steps of 10.
    bucket = percent // 10 if isinstance(percent, int | float) else None
    key = (state, step, bucket)
    if key != shown:
        ctx.print(f"{fmt_text(state)}: {fmt_text(step)} ({pct})")
    return key


def cmd_passphrase(ctx: Context, args: argparse.Namespace) -> int:
    record = ctx.record("RotatePassphrase" if args.rotate else "GetPassphrase")
    if ctx.json:
        ctx.print(render.to_json(record))
        return CtlExit.OK
    passphrase = record.get("passphrase")
    if not isinstance(passphrase, str) or not passphrase:
        raise CtlError("the server returned no passphrase", "try --json to see its answer")
    ctx.print(passphrase)  # alone on stdout, so scripts can capture it
    return CtlExit.OK


def cmd_revoke(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("Revoke", args.name)
    if not ctx.json:
        ctx.print(f"Revoked every certificate of {args.name}.")
    return CtlExit.OK
