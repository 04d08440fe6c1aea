"""secondsitectl push-install: a process server installs the agent on a host over SSH."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.ctl.commands import Context, CtlError, _start_job


def cmd_push_install(ctx: Context, args: argparse.Namespace) -> int:
    try:
        key = Path(args.key).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text key file"
        raise CtlError(f"cannot read the SSH key file {args.key}: {reason}") from None
    options: dict[str, Any] = {"key": key, "disks": args.disk, "user": args.user}
    if args.port is not None:
        options["port"] = args.port
    optional = {"machine": args.machine, "accept_fingerprint": args.accept_fingerprint,
                "server": args.server, "prefix": args.test_prefix}  # fmt: skip
    options |= {k: v for k, v in optional.items() if v}
    if args.test_without_systemd:
        options["start_without_systemd"] = True
    return _start_job(ctx, args, ctx.call("PushInstall", args.host, options))
