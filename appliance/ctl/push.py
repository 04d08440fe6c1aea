"""secondsitectl push-install / push-uninstall: a process server installs (removes) the
agent on a host over SSH. The key's text or the password travels in the D-Bus call
(root and the secondsite group, for the console) and is held in memory by the
configuration server for the job only."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.ctl.commands import Context, CtlError, _start_job


def cmd_push_install(ctx: Context, args: argparse.Namespace) -> int:
    options = _login(args) | {"disks": args.disk}
    optional = {"machine": args.machine, "accept_fingerprint": args.accept_fingerprint,
                "server": args.server, "prefix": args.test_prefix}  # fmt: skip
    options |= {k: v for k, v in optional.items() if v}
    if args.test_without_systemd:
        options["start_without_systemd"] = True
    return _start_job(ctx, args, ctx.call("PushInstall", args.host, options))


def cmd_push_uninstall(ctx: Context, args: argparse.Namespace) -> int:
    options = _login(args)
    optional = {"machine": args.machine, "accept_fingerprint": args.accept_fingerprint,
                "prefix": args.test_prefix}  # fmt: skip
    options |= {k: v for k, v in optional.items() if v}
    return _start_job(ctx, args, ctx.call("PushUninstall", args.host, options))


def add_login_arguments(parser: argparse.ArgumentParser) -> None:
    """--user, --port, --key | --password-file, --accept-fingerprint, --machine."""
    parser.add_argument("--user", default="root",
                        help="SSH user: root, or one with sudo (default: root)")  # fmt: skip
    parser.add_argument("--port", type=int, help="SSH port (default: 22)")
    login = parser.add_mutually_exclusive_group(required=True)
    login.add_argument("--key", metavar="FILE", help="the SSH private key (no passphrase)")
    login.add_argument("--password-file", metavar="FILE",
                       help="a file holding the user's password (its first line); a "
                            "non-root user's sudo gets it too if it asks")  # fmt: skip
    parser.add_argument("--accept-fingerprint", metavar="FP", help="the host key "
                        "fingerprint you checked (trust on first use)")  # fmt: skip
    parser.add_argument("--machine", help="the machine's name (default: HOST)")
    parser.add_argument("--test-prefix", help=argparse.SUPPRESS)  # tests: paths under a root


def _login(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"user": args.user}
    if args.port is not None:
        options["port"] = args.port
    if args.key:
        options["key"] = _read(args.key, "SSH key")
    else:
        password = _read(args.password_file, "password").splitlines()
        if not password or not password[0]:
            raise CtlError(f"the password file {args.password_file} is empty")
        options["password"] = password[0]
    return options


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise CtlError(f"cannot read the {what} file {path}: {reason}") from None
