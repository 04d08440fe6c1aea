"""`secondsite-lab`: the whole replication pipeline on this one machine."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from appliance.daemon.cli import OperatorError, run_main
from appliance.lab import lab

PROG = "secondsite-lab"

DESCRIPTION = """\
Run the whole pipeline on this machine: a master target (secondsite-targetd), a process
server (secondsite-processd) and an agent protecting loop devices, each with a mounted
ext4 filesystem made from image files under the state directory, plus an optional churn
generator writing into them. A configuration server (secondsite-configd) on a private
D-Bus of its own holds the CA: the master target, the process server and the agent enrol
with its passphrase exactly as on real sites, and `secondsitectl --bus ADDRESS` (the
address `up` prints) manages the lab like an appliance.
"""

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)i?B?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 512M or 1G")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m[2].upper()]
    return int(float(m[1]) * scale)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the lab keeps configs, logs, images, mounts and lab.json "
        "(default: /var/lib/secondsite/lab as root, else ./.lab)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, help="as above")
        return p

    p = add("up", "start targetd, processd, loop disks with ext4 and the agent (root); "
                  "returns once all are running")  # fmt: skip
    p.add_argument("--size", type=parse_size, default=parse_size("1G"),
                   help="size of each disk, e.g. 512M, 1G (default 1G)")  # fmt: skip
    p.add_argument("--disks", type=int, default=1, help="number of disks (default 1)")
    p.add_argument("--churn", type=float, default=0.0, metavar="MBPS",
                   help="also start the churn generator at MBPS MB/s (default: none)")  # fmt: skip
    p = add("status", "per disk: device, initial-sync percent, backlog, RPO, recovery points")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("points", "the machine's recovery points on the master target (id, time, kind)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("materialize", "copy a recovery point's disk images to DIR as DISK.img files")
    p.add_argument("point", metavar="POINT", help="the recovery point's id (see 'points')")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to put them")
    p = add("churn", "restart the churn generator at --rate MB/s; --rate 0 stops it")
    p.add_argument("--rate", type=float, required=True, metavar="MBPS")
    add("down", "stop everything the lab started, unmount and detach its loop devices "
                "(also after a crash); keeps images, logs and replicas")  # fmt: skip
    return parser


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def _print_status(st: dict[str, Any]) -> None:
    procs = " ".join(f"{k}:{'up' if v else 'DOWN'}" for k, v in st["processes"].items())
    print(f"lab {st['machine_id']} in {st['state_dir']}  [{procs}]  churn {st['churn_mbps']} MB/s")
    print(f"{'DISK':<7} {'DEVICE':<12} {'INITIAL':>8} {'BACKLOG':>11} {'RPO':>8} {'POINTS':>6}")
    for d in st["disks"]:
        pct = "-" if d["initial_percent"] is None else f"{d['initial_percent']:.1f}%"
        rpo = "-" if d["rpo_seconds"] is None else f"{d['rpo_seconds']:.1f}s"
        print(
            f"{d['disk']:<7} {d['device']:<12} {pct:>8} {_fmt_bytes(d['backlog_bytes']):>11} "
            f"{rpo:>8} {d['points']:>6}"
        )
    m = st.get("machine")
    if m:
        rpo = "-" if m.get("rpo_seconds") is None else f"{m['rpo_seconds']:.1f}s"
        print(f"configuration server: {st['machine_id']} is {m.get('state')}, RPO {rpo} "
              f"(threshold {m.get('rpo_threshold_s', 0):.0f}s); "
              f"secondsitectl --bus {st['bus']} status")  # fmt: skip


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    state_dir: Path = args.state_dir or lab.default_state_dir()
    if args.command == "up":
        started = lab.up(state_dir, args.size, args.disks, args.churn)
        devices = ", ".join(f"{d.device} on {d.mount}" for d in started.disks)
        print(f"lab up in {started.state_dir}: {devices}; configd :{started.config_port}, "
              f"targetd :{started.target_port}, processd :{started.process_port}")  # fmt: skip
        print(f"manage it with: secondsitectl --bus {started.bus_address} status")
    elif args.command == "status":
        st = lab.status(state_dir)
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            _print_status(st)
    elif args.command == "points":
        pts = lab.points(state_dir)
        if args.json:
            print(json.dumps(pts, indent=2))
        else:
            for p in pts:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["time_ns"] / 1e9))
                print(f"{p['tag_id']}  {when}  {p['kind']}")
            if not pts:
                print("no recovery points yet")
    elif args.command == "materialize":
        for path in lab.materialize(state_dir, args.point, args.out):
            print(path)
    elif args.command == "churn":
        lab.set_churn(state_dir, args.rate)
    elif args.command == "down":
        for line in lab.down(state_dir):
            print(line)
    else:  # pragma: no cover - argparse rejects it
        raise OperatorError(f"unknown command {args.command}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv if argv is not None else sys.argv[1:]))
