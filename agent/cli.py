"""`secondsite-agent`: the source-host agent's command line (run, status)."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from agent import status as status_file
from agent.config import (
    AGENT_SETTINGS,
    DEFAULT_CONFIG,
    DEFAULT_STATE_DIR,
    AgentConfig,
    resolve_disks,
)
from agent.disk_ids import assign as assign_disk_ids
from agent.host_facts import bios_uuid
from appliance.daemon.cli import run_main
from appliance.daemon.enrolled import enrol
from appliance.daemon.logs import setup_logging
from appliance.daemon.runner import config_path
from appliance.settings import describe

PROG = "secondsite-agent"

DESCRIPTION = """\
The Secondsite agent. It runs as root on a protected Linux host: copies each
configured whole disk once to the process server (resumable), then tracks writes
(tracefs block tracepoints, or per-chunk digest scans) and sends the changes, with a
crash-consistent recovery point every agent.tag_interval seconds taken under a
bounded filesystem freeze.
"""

EPILOG = f"""\
commands:
  run      replicate the configured disks until SIGTERM
  status   the running agent's view: initial sync, acknowledged sequence, tags
  enroll   enrol with the configuration server (its one-time passphrase), store the
           certificate under STATE/tls; `run` then protects what the server assigns

configuration file keys for `run` (TOML, [section] name = value):
{describe(AGENT_SETTINGS)}

signals (to `run`):
  SIGTERM  stop at the next safe point (never inside a freeze), saving the state
  SIGUSR1  take a crash-consistent recovery point now, whatever the schedule

files:
  {DEFAULT_CONFIG}        configuration (optional; agent.process_server is required)
  STATE/status.json        written every second by `run`, read by `status`
  STATE/DISK_ID.json       per-disk replication progress (survives restarts)
  STATE/disk-ids.json      which disk (serial, loop backing file) has which DISK_ID:
                           a disk keeps its id when its kernel name changes

exit status:
  0 stopped cleanly / the agent is running, 2 bad command line, 3 bad configuration
  (run) or the agent is not running (status), 4 a resource could not be used,
  1 other failure.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="replicate the configured disks until SIGTERM")
    run.add_argument(
        "--config", type=Path, metavar="FILE",
        help=f"configuration file (default {DEFAULT_CONFIG}, used only if it exists)",
    )  # fmt: skip
    run.add_argument("--state-dir", metavar="DIR", help="overrides agent.state_dir")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--check-config", action="store_true",
        help="print the resolved configuration as JSON and exit (disks are not checked)",
    )  # fmt: skip
    enroll = commands.add_parser(
        "enroll", help="enrol with the configuration server and store the certificate"
    )
    enroll.add_argument("--server", required=True, metavar="HOST:PORT",
                        help="the configuration server (port 9440)")  # fmt: skip
    enroll.add_argument(
        "--passphrase-file", required=True, type=Path, metavar="FILE",
        help="file with the passphrase that 'secondsitectl passphrase' shows",
    )  # fmt: skip
    enroll.add_argument(
        "--config", type=Path, metavar="FILE",
        help=f"configuration file (default {DEFAULT_CONFIG}, used only if it exists)",
    )  # fmt: skip
    enroll.add_argument("--state-dir", metavar="DIR", help="overrides agent.state_dir")
    status = commands.add_parser("status", help="the running agent's replication status")
    status.add_argument("--json", action="store_true", help="the status file plus 'running'")
    status.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
        help=f"the agent's state directory (default {DEFAULT_STATE_DIR})",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return show_status(args.state_dir, as_json=args.json)
    if args.command == "enroll":
        return enroll(args)
    setup_logging(args.log_level)
    config = AgentConfig.load(
        config_path(args.config, DEFAULT_CONFIG), {"agent.state_dir": args.state_dir}
    )
    if args.check_config:
        json.dump(config.as_dict(), sys.stdout, indent=2)
        print()
        return 0
    disks = resolve_disks(config.disks)
    from agent.daemon import run  # the replication stack, only for `run`

    return run(config, disks)


def enroll(args: argparse.Namespace) -> int:
    config = AgentConfig.load(
        config_path(args.config, DEFAULT_CONFIG), {"agent.state_dir": args.state_dir},
        enrolling=True,
    )  # fmt: skip
    disks = resolve_disks(config.disks)
    ids = assign_disk_ids(config.state_dir, config.machine_id, disks)
    facts: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "bios_uuid": bios_uuid(),  # links the machine to its VM (protect-vm)
        "disks": [{"disk_id": ids[d.name], "path": str(d.path),
                   "size_bytes": d.size, "sector_size": d.logical_sector_size}
                  for d in disks],
    }  # fmt: skip
    config.state_dir.mkdir(parents=True, exist_ok=True)
    enrolled = enrol(config.state_dir, args.server, args.passphrase_file,
                     name=config.machine_id, kind="agent", sans=[], facts=facts,
                     stem="agent")  # fmt: skip
    print(f"enrolled machine {config.machine_id} with {enrolled.config_server} "
          f"(certificate {enrolled.serial}); start `secondsite-agent run`")  # fmt: skip
    return 0


def show_status(state_dir: Path, *, as_json: bool) -> int:
    document = status_file.read(state_dir)
    alive = status_file.running(document)
    if as_json:
        json.dump(document | {"running": alive}, sys.stdout, indent=2)
        print()
        return 0 if alive else int(status_file.NotRunning.exit_code)
    if not alive:
        raise status_file.not_running(document, state_dir)
    print(status_file.render(document))
    return 0
