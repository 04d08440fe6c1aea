"""`secondsite-processd`: the process server daemon."""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvloop

from appliance.daemon.cli import run_main
from appliance.daemon.enrolled import disk_space, server_reporting
from appliance.daemon.logs import setup_logging
from appliance.daemon.runner import (
    EXIT_STATUS,
    add_common_arguments,
    add_enrol_arguments,
    advertised,
    config_path,
    enrol_and_exit,
    listen,
    make_dirs,
    serve_until_stopped,
    tls_context,
)
from appliance.daemon.sdnotify import Notifier
from appliance.process.config import DEFAULT_CONFIG, PROCESS_SETTINGS, ProcessConfig
from appliance.process.forwarder import Forwarder
from appliance.process.health import Health
from appliance.process.optimize import Optimizer
from appliance.process.service import ProcessService
from appliance.process.spool import Spool, SpoolSettings
from appliance.process.throttle import FairShare, TokenBucket
from appliance.settings import describe
from appliance.wire.connection import start_server
from appliance.wire.errors import ErrorCounters
from appliance.wire.sender import StreamSender
from appliance.wire.tls import client_context

PROG = "secondsite-processd"
log = logging.getLogger("secondsite.processd")

DESCRIPTION = """\
The Secondsite process server. Agents on protected hosts stream their disks' changes
to it over TLS (mutual certificates from the configuration server's CA). It writes
every change to a crash-safe spool and fdatasyncs it before acknowledging, then
forwards the spool to the assigned master target: zero extents and identical
rewrites still in flight are not sent again, the rest is zstd-compressed when that
pays, bandwidth is throttled fairly across disks. A spool segment is deleted only
once the master target has made everything in it durable. When the spool reaches its
limit or its disk fills, agents are paused (never failed) until it drains.
"""

EPILOG = f"""\
configuration file keys (TOML, [section] name = value):
{describe(PROCESS_SETTINGS)}

files:
  {DEFAULT_CONFIG}   configuration (optional; defaults apply when absent)
  SPOOL/DISK/*.spool               spooled changes, CRC'd records
  SPOOL/DISK/meta.json             the disk's identity and forwarding progress

{EXIT_STATUS}

Under systemd (Type=notify) it sends READY=1 once serving, STATUS= lines with the
spool size and health, and WATCHDOG=1 when WatchdogSec= is set.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser, DEFAULT_CONFIG)
    parser.add_argument("--target", metavar="HOST:PORT", help="overrides target.address")
    add_enrol_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    config = ProcessConfig.load(
        config_path(args.config, DEFAULT_CONFIG),
        {
            "server.state_dir": args.state_dir,
            "server.listen": args.listen,
            "target.address": args.target,
        },
    )
    if args.check_config:
        json.dump(config.as_dict(), sys.stdout, indent=2)
        print()
        return 0
    if args.enroll:
        facts = {"address": advertised(args.advertise, config.host, config.port)}
        if config.target is not None:
            facts["target"] = "{}:{}".format(*config.target)
        return enrol_and_exit(args, config.state_dir, config.name, "process", facts)
    server_ssl = tls_context(config.tls_cert, config.tls_key, config.tls_ca)
    client_ssl = client_context(config.tls_cert, config.tls_key, config.tls_ca)
    make_dirs(config.state_dir, config.spool_dir)
    uvloop.run(serve(config, server_ssl, client_ssl))
    return 0


async def serve(
    config: ProcessConfig,
    server_ssl: ssl.SSLContext,
    client_ssl: ssl.SSLContext,
    notifier: Notifier | None = None,
) -> None:
    notifier = notifier or Notifier()
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool")
    spool = Spool(
        config.spool_dir,
        SpoolSettings(segment_bytes=config.segment_bytes, limit_bytes=config.spool_limit_bytes),
    )
    optimizer = Optimizer(level=config.compression_level, workers=config.compression_workers)
    health = Health()
    service: ProcessService
    forwarder: Forwarder | None = None
    if config.target is not None:
        host, port = config.target
        fair = FairShare(TokenBucket(config.throttle_bytes_per_s))
        sender = StreamSender(
            host, port, client_ssl, name=config.name, role="process",
            server_hostname=config.target_tls_name,
            on_ack=lambda disk, seq: forwarder.on_ack(disk, seq) if forwarder else None,
        )  # fmt: skip
        forwarder = Forwarder(
            sender, optimizer, fair, pool, health, on_released=lambda: service.released(),  # noqa: PLW0108 - bound later
        )  # fmt: skip
    counters = ErrorCounters()
    service = ProcessService(
        spool, forwarder, name=config.name, window_bytes=config.window_bytes,
        counters=counters, pool=pool, health=health, state_dir=config.state_dir,
    )  # fmt: skip
    if forwarder is not None:
        await forwarder.sender.start()
    service.start()
    try:
        server = await listen(
            lambda: start_server(
                service.handle, config.host, config.port, server_ssl, counters=counters
            ),
            config.host,
            config.port,
        )
    except BaseException:
        await service.shutdown()
        spool.close()
        raise

    def status() -> str:
        summary = service.status()
        health = ", ".join(summary["health"]) or "healthy"
        return f"{len(summary['disks'])} disks, spool {summary['spool_bytes'] >> 20} MiB, {health}"

    background = []

    def report() -> dict[str, Any]:
        summary = service.status()
        return {
            "disks": summary["disks"], "spool_bytes": summary["spool_bytes"],
            "connections": summary["connections"], "health": summary["health"],
            "target": "{}:{}".format(*config.target) if config.target else None,
            **disk_space(config.spool_dir),
        }  # fmt: skip

    background.extend(server_reporting(config.state_dir, "process", report, server))
    log.info("serving agents on %s:%d, forwarding to %s", config.host, config.port,
             "{}:{}".format(*config.target) if config.target else "nobody yet")  # fmt: skip
    await serve_until_stopped(
        notifier, f"Serving on {config.host}:{config.port}", status, background
    )
    log.info("stopping: committing the spool")
    notifier.stopping("Committing the spool")
    server.close()
    await service.shutdown()
    optimizer.close()
    spool.close()
    pool.shutdown(wait=True)
    log.info("stopped")
