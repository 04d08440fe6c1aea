"""secondsitectl: the administrator's command line over D-Bus (org.secondsite.Config1).

The parser, the duration and size syntax, and the one place that turns operator
errors into one line on stderr and an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from appliance.ctl import commands, failover, groups, push, vsphere
from appliance.ctl.commands import BUS_ENV, ClientFactory, ConfigClient, Context, CtlError, CtlExit
from appliance.daemon.cli import OperatorError

PROG = "secondsitectl"

EPILOG = f"""\
examples:
  {PROG}                          same as '{PROG} status'
  {PROG} machines --json | jq '.[] | select(.state != "protected")'
  {PROG} points web01
  {PROG} protect web01 --policy gold --wait
  {PROG} policy set gold --rpo-threshold 15m --crash-interval 5s \\
        --app-interval 1h --retention-hours 24 --retention-bytes 50G
  {PROG} policy assign web01 gold
  {PROG} passphrase --rotate > /root/enrol.pass
  {PROG} test-failover web01 --point latest-app --wait && {PROG} cleanup web01
  {PROG} failover web01 --unplanned --wait && {PROG} commit web01
  {PROG} push-install 10.0.0.5 --key /root/.ssh/id_ed25519 --disk /dev/sdb --wait

options may come before or after the command; every listing takes --json, which
prints the server's records unchanged (times as Unix seconds, sizes in bytes).

durations: a number with s, m, h or d, or several (90s, 15m, 2h30m, 1d); a bare
number is seconds. sizes: bytes, or a number with K, M, G, T or P (1024-based;
KiB and KB are read the same way), e.g. 512M, 50G, 1.5T.

exit status:
  {CtlExit.OK:d}  success
  {CtlExit.FAILURE:d}  failure: a job failed, or the server failed (its journal has details)
  {CtlExit.USAGE:d}  usage: a bad command line, duration or size
  {CtlExit.UNREACHABLE:d}  the configuration server is unreachable, or the bus refused the call
  {CtlExit.NOT_FOUND:d}  not found: no such machine, job, policy or server
  {CtlExit.REFUSED:d}  refused: an invalid argument, a conflict (a job already running), or
     not authorised

environment:
  {BUS_ENV}  the D-Bus address of the configuration server
                          (default: the system bus; --bus overrides it)
"""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def _whole(value: float) -> int | float:
    return int(value) if value == int(value) else value


def parse_duration(text: str) -> int | float:
    """Seconds in a duration such as 2h30m; a bare number is seconds; must be positive."""
    spec = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", spec):
        seconds = float(spec)
    elif spec and re.fullmatch(f"(?:{_DURATION.pattern})+", spec):
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION.findall(spec))
    else:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 15m, 2h30m, 1d)")
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be more than zero")
    return _whole(seconds)


def parse_size(text: str) -> int:
    """Bytes in a size such as 50G (1024-based); must be positive."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 50G, 1.5T)")
    size = int(float(match[1]) * _SIZE_UNITS[match[2].lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be more than zero")
    return size


def parse_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than zero")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors go through the same one-line report as every other error."""

    def error(self, message: str) -> NoReturn:
        raise commands.UsageError(message, f"see '{self.prog} --help'")


_FORMAT = argparse.RawDescriptionHelpFormatter


def _common() -> _Parser:
    # SUPPRESS defaults: a subcommand's copy of an option must not reset what was
    # given before the subcommand ("secondsitectl --json machines").
    common = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", help="print the raw records as JSON")
    common.add_argument("--bus", metavar="ADDRESS", help=f"D-Bus address (overrides {BUS_ENV})")
    common.add_argument(
        "--no-legend", action="store_true", help="no column headers, no footer (for scripts)"
    )
    common.add_argument("-l", "--full", action="store_true", help="never truncate or drop columns")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(
        prog=PROG,
        description="Administer a Secondsite configuration server over D-Bus.",
        epilog=EPILOG,
        formatter_class=_FORMAT,
        parents=[common],
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)

    def add(
        name: str, func: Callable[[Context, argparse.Namespace], int], text: str, example: str
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(
            name,
            help=text,
            description=f"{text}\n\nexample:\n  {PROG} {example}",
            formatter_class=_FORMAT,
            parents=[common],
        )
        command.set_defaults(func=func)
        return command

    add("status", commands.cmd_status, "one screen of health (the default command)", "status")
    add(
        "machines",
        commands.cmd_machines,
        "list machines: state, RPO against its threshold, policy, servers, initial sync",
        "machines --no-legend",
    )
    add("disks", commands.cmd_disks, "list a machine's disks", "disks web01").add_argument(
        "machine"
    )
    add(
        "points", commands.cmd_points, "list a machine's recovery points", "points web01"
    ).add_argument("machine")
    add("servers", commands.cmd_servers, "list process servers and master targets", "servers")
    add(
        "jobs", commands.cmd_jobs, "list running jobs (--all: finished ones too)", "jobs --all"
    ).add_argument("--all", action="store_true", help="include finished jobs")
    add("job", commands.cmd_job, "show one job", "job j-42").add_argument("id", metavar="ID")
    add(
        "alerts", commands.cmd_alerts, "list open alerts (--all: cleared ones too)", "alerts"
    ).add_argument("--all", action="store_true", help="include cleared alerts")
    add("events", commands.cmd_events, "show the newest events", "events -n 50").add_argument(
        "-n", "--lines", type=parse_count, default=20, metavar="N", help="how many (default 20)"
    )
    add("policies", commands.cmd_policies, "list replication policies", "policies")

    texts = {
        "protect": "start protecting a machine (prints the job id)",
        "unprotect": "stop protecting a machine (prints the job id)",
        "resync": "resynchronise a machine's disks from scratch (prints the job id)",
    }
    for name, text in texts.items():
        command = add(name, getattr(commands, f"cmd_{name}"), text, f"{name} web01 --wait")
        command.add_argument("machine")
        if name == "protect":
            command.add_argument("--policy", help="the policy to apply (default: the machine's)")
        command.add_argument(
            "--wait", action="store_true", help="follow the job; exit 1 if it fails"
        )

    _add_policy(add)
    _add_failover(add)
    add(
        "passphrase",
        commands.cmd_passphrase,
        "print the enrolment passphrase (root only)",
        "passphrase --rotate",
    ).add_argument("--rotate", action="store_true", help="replace it with a new one first")
    add(
        "revoke",
        commands.cmd_revoke,
        "revoke every certificate of a machine or server (root only)",
        "revoke web01",
    ).add_argument("name")
    parser.set_defaults(func=commands.cmd_status)
    return parser


def _add_policy(add: Callable[..., argparse.ArgumentParser]) -> None:
    policy = add(
        "policy",
        commands.cmd_policies,
        "set, assign or list policies",
        "policy set gold --rpo-threshold 15m",
    )
    actions = policy.add_subparsers(title="actions", metavar="ACTION", parser_class=_Parser)
    common = _common()
    set_ = actions.add_parser(
        "set",
        help="create or change a policy; only the options given change",
        description="Create or change a policy; only the options given are sent.\n\n"
        f"example:\n  {PROG} policy set gold --rpo-threshold 15m --retention-bytes 50G",
        formatter_class=_FORMAT,
        parents=[common],
    )
    set_.set_defaults(func=commands.cmd_policy_set)
    set_.add_argument("name")
    for flag, dest, text in (
        ("--rpo-threshold", "rpo_threshold_s", "alert when the newest point is older"),
        ("--crash-interval", "crash_interval_s", "how often to take a crash-consistent point"),
        ("--app-interval", "app_interval_s", "how often to take an application-consistent point"),
    ):
        set_.add_argument(flag, dest=dest, type=parse_duration, metavar="DURATION", help=text)
    set_.add_argument(
        "--retention-hours", type=parse_count, metavar="HOURS", help="keep points this long"
    )
    set_.add_argument(
        "--retention-bytes", type=parse_size, metavar="SIZE", help="and in at most this much space"
    )
    set_.add_argument("--pre-script", metavar="PATH", help="run on the machine before a point")
    set_.add_argument("--post-script", metavar="PATH", help="run on the machine after a point")
    assign = actions.add_parser(
        "assign",
        help="make a machine follow a policy",
        description="Make a machine follow a policy.\n\n"
        f"example:\n  {PROG} policy assign web01 gold",
        formatter_class=_FORMAT,
        parents=[common],
    )
    assign.set_defaults(func=commands.cmd_policy_assign)
    assign.add_argument("machine")
    assign.add_argument("policy")
    actions.add_parser(
        "list", help="list policies (same as 'policies')", parents=[common]
    ).set_defaults(func=commands.cmd_policies)


def _add_failover(add: Callable[..., argparse.ArgumentParser]) -> None:
    point_help = (
        "latest (default), latest-app, a tag id, or a time (Unix seconds or ISO 8601): "
        "the newest usable point at or before it"
    )

    def job(
        name: str, func: Callable[..., int], text: str, example: str
    ) -> argparse.ArgumentParser:
        command = add(name, func, text, example)
        command.add_argument("machine")
        command.add_argument(
            "--wait", action="store_true", help="follow the job; exit 1 if it fails"
        )
        return command

    drill = job(
        "test-failover", failover.cmd_test_failover,
        "start a drill: the machine's VM from a point, on an isolated network, "
        "replication keeps running", "test-failover web01 --point latest-app --wait",
    )  # fmt: skip
    drill.add_argument("--point", default="", help=point_help)
    drill.add_argument("--network", action="append", metavar="NIC=PORTGROUP",
                       help="attach NIC to this port group instead of an isolated one "
                            "(repeatable)")  # fmt: skip
    job("cleanup", failover.cmd_cleanup,
        "end a drill: remove its VM, its isolated network and its copy of the disks",
        "cleanup web01 --wait")  # fmt: skip
    real = job("failover", failover.cmd_failover,
               "fail a machine over: stop replication, roll its replica back to the point, "
               "start its VM on the production network", "failover web01 --wait")  # fmt: skip
    real.add_argument("--point", default="", help=point_help)
    real.add_argument("--unplanned", action="store_true",
                      help="the source is gone: do not wait for its agent to stop")  # fmt: skip
    job("commit", failover.cmd_commit, "make a failover final", "commit web01 --wait")
    job("cancel", failover.cmd_cancel,
        "undo a failover that is not committed: remove the VM, protect again",
        "cancel web01 --wait")  # fmt: skip
    job("failback", failover.cmd_failback,
        "after a committed failover: power the VM off, bring the original machine's disks "
        "level with it (only what differs travels), protect it again",
        "failback web01 --wait")  # fmt: skip
    _add_plans(add)
    groups.register(add, parse_duration)
    replica = add("replica", failover.cmd_replica_set,
                  "set where the machine's VM goes at failover, from a JSON file ('-': stdin; "
                  "keys in appliance/config/replica.py)", "replica web01 replica.json")  # fmt: skip
    replica.add_argument("machine")
    replica.add_argument("file", metavar="FILE")
    add("vcenters", failover.cmd_vcenters, "list registered vCenters", "vcenters")
    vc = add("vcenter-add", failover.cmd_vcenter_add,
             "register a vCenter (root only); without --thumbprint it prints the thumbprint "
             "the vCenter presents, to check and pass back",
             "vcenter-add vc-dr vc.dr.example --user administrator@vsphere.local "
             "--password-file /root/vc.pass --thumbprint AA:BB:...")  # fmt: skip
    vc.add_argument("name")
    vc.add_argument("address", help="host or host:port")
    vc.add_argument("--user", required=True)
    vc.add_argument("--password-file", required=True, metavar="FILE")
    vc.add_argument("--thumbprint", help="the SHA-256 thumbprint to trust")
    vc.add_argument("--site", help="the site it belongs to (default: secondary)")
    creds = add("vcenter-credentials", vsphere.cmd_vcenter_credentials,
                "replace the user name and password stored for a registered vCenter (root "
                "only), e.g. after its password was changed; refused unless vCenter accepts "
                "them", "vcenter-credentials vc-dr --user administrator@vsphere.local "
                "--password-file /root/vc.pass")  # fmt: skip
    creds.add_argument("name", help="the registered vCenter")
    creds.add_argument("--user", required=True)
    creds.add_argument("--password-file", required=True, metavar="FILE",
                       help="a file holding the password (its first line)")  # fmt: skip
    vsphere.add_commands(add)
    pi = add("push-install", push.cmd_push_install,
             "install the agent on a host over SSH from a process server, enrol and start it "
             "(root only: the private key or password travels to the server for the install, "
             "never stored); the first time it fails with the host key's fingerprint, to check "
             "and pass back", "push-install 10.0.0.5 --key /root/.ssh/id_ed25519 --disk /dev/sdb "
             "--accept-fingerprint SHA256:... --wait")  # fmt: skip
    pi.add_argument("host")
    push.add_login_arguments(pi)
    pi.add_argument("--disk", action="append", required=True, metavar="DEV",
                    help="a disk to protect (repeatable)")  # fmt: skip
    pi.add_argument("--server", metavar="HOST:PORT",
                    help="where the host reaches the configuration server (default: its "
                         "first name)")  # fmt: skip
    pi.add_argument("--wait", action="store_true", help="follow the job; exit 1 if it fails")
    pi.add_argument("--test-without-systemd", action="store_true", help=argparse.SUPPRESS)
    pu = add("push-uninstall", push.cmd_push_uninstall,
             "stop and remove the agent from a host over SSH (through the process server "
             "serving it), then revoke the machine's certificates and remove it from the "
             "inventory (root only; the key or password is never stored)",
             "push-uninstall 10.0.0.5 --key /root/.ssh/id_ed25519 --wait")  # fmt: skip
    pu.add_argument("host")
    push.add_login_arguments(pu)
    pu.add_argument("--wait", action="store_true", help="follow the job; exit 1 if it fails")


def _add_plans(add: Callable[..., argparse.ArgumentParser]) -> None:
    point_help = (
        "latest-group (the default when the plan's machines are one consistency group: "
        "their newest common point, refused if there is none), latest (the default "
        "otherwise) or a time (Unix seconds or ISO 8601): each machine's own newest usable "
        "point at or before it (a common time, not a coordinated point)"
    )

    def job(name: str, func: Callable[..., int], text: str) -> argparse.ArgumentParser:
        command = add(name, func, text, f"{name} erp --wait")
        command.add_argument("name", help="the plan")
        command.add_argument(
            "--wait", action="store_true", help="follow the job; exit 1 if it fails"
        )
        return command

    add("plans", failover.cmd_plans, "list recovery plans", "plans")
    spec = add("plan-set", failover.cmd_plan_set,
               "create or replace a recovery plan from a JSON file ('-': stdin): "
               '{"groups": [{"machines": [...], "wait_s": 30, "pre": CMD, "post": CMD}]}; '
               "pre/post run on the configuration server", "plan-set erp erp.json")  # fmt: skip
    spec.add_argument("name")
    spec.add_argument("file", metavar="FILE")
    drill = job("plan-test-failover", failover.cmd_plan_test_failover,
                "test-fail the plan's machines over, group by group")  # fmt: skip
    drill.add_argument("--point", default="", help=point_help)
    job("plan-cleanup", failover.cmd_plan_cleanup, "clean up the drill of every machine of a plan")
    real = job("plan-failover", failover.cmd_plan_failover,
               "fail the plan's machines over, group by group")  # fmt: skip
    real.add_argument("--point", default="", help=point_help)
    real.add_argument(
        "--unplanned", action="store_true", help="the sources are gone: do not wait for agents"
    )


def dbus_client(address: str | None) -> ConfigClient:
    """The real client, imported only when a command runs (it pulls in dbus-python)."""
    module: Any = importlib.import_module("appliance.dbus.client")
    client: ConfigClient = module.Config1Client(bus_address=address)
    return client


def _width(out: TextIO, full: bool) -> int | None:
    # Like systemctl: fit a terminal (or an explicit COLUMNS); never cut a pipe.
    if full or not (out.isatty() or os.environ.get("COLUMNS")):
        return None
    return shutil.get_terminal_size().columns


def _main(
    argv: Sequence[str] | None,
    connect: ClientFactory,
    out: TextIO,
    sleep: Callable[[float], None],
    now: Callable[[], float],
) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else CtlExit.USAGE
    ctx = Context(
        connect=connect,
        bus=getattr(args, "bus", None) or os.environ.get(BUS_ENV) or None,
        out=out,
        json=getattr(args, "json", False),
        legend=not getattr(args, "no_legend", False),
        width=_width(out, getattr(args, "full", False)),
        tty=out.isatty(),
        sleep=sleep,
        now=now,
    )
    return int(args.func(ctx, args))


def main(
    argv: Sequence[str] | None = None,
    *,
    connect: ClientFactory | None = None,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.time,
) -> int:
    """The entry point; `connect`, `out`, `sleep` and `now` are for tests."""
    stream = sys.stdout if out is None else out
    try:
        return _main(argv, connect or dbus_client, stream, sleep, now)
    except OperatorError as exc:
        # Same one line as appliance.daemon.cli.run_main, with our own statuses.
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        print(f"{PROG}: error: {exc.message}{hint}", file=sys.stderr)
        return int(exc.status if isinstance(exc, CtlError) else exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `secondsitectl events | head`: stop quietly, and keep Python's exit-time
        # flush from complaining about the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CtlExit.FAILURE
